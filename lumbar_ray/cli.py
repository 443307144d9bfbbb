"""``lumbar-ray``: the command line. Each command parses its options and makes one library call.

Settings combine with one precedence, the same for every command: the embedded defaults < the ``--config``
YAML file < a command's own options (``--studies``, ``--workdir``, ...) < ``key.sub=value`` arguments. An option
or a ``key=value`` that changes a value the file set is logged, never applied silently.

Every mistake a user can make with the inputs (a bad config key, a missing data folder, a malformed CSV, an
unknown model, alias or study) ends the command with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from lumbar_ray.config import Config, ConfigError, get_path, load_config, save_config
from lumbar_ray.errors import (
    DataChangedError,
    DicomReadError,
    EnsembleError,
    ModelNotFoundError,
    RsnaFormatError,
    SubmissionError,
    UnknownStudyError,
)
from lumbar_ray.paths import RESOLVED_CONFIG
from lumbar_ray.provenance import package_version

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Train, tune, track and serve lumbar spine degeneration classifiers (RSNA 2024) on Ray and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="config overrides such as synth.train_studies=20 (they win over options)", show_default=False),
]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (options win over it)")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lumbar_ray {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def load(config: Path | None, options: dict[str, Any], overrides: list[str] | None) -> Config:
    """The resolved config: the file, then the options that were given, then the ``key=value`` overrides.

    Args:
        config: the ``--config`` file, or None.
        options: config key -> the value of a command option (None = the option was not given).
        overrides: ``key.sub=value`` arguments.
    """
    given = {key: value for key, value in options.items() if value is not None}
    overridden = {text.partition("=")[0].strip() for text in overrides or []}
    for key in sorted(given.keys() & overridden):
        logger.warning("%s is set by an option and by %s=...: the key=value argument wins", key, key)
    if config is not None and given:
        base = load_config(config)
        for key, value in given.items():
            logger.info("option sets %s=%s (the config file had %r)", key, value, get_path(base.model_dump(), key))
    return load_config(config, overrides or [], values=given)


def _save_resolved(cfg: Config) -> None:
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.workdir) / RESOLVED_CONFIG)


def _existing_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _data_root(data: str | None) -> Path | str | None:
    """``--data``: an existing local folder (a Path), or a URI as given (a missing bucket, prefix or CSV is reported,
    naming it, when the CSVs are read)."""
    from lumbar_ray.data.cache import is_uri  # pyarrow: deferred like every heavy import of the commands

    return data if data is None or is_uri(data) else _existing_folder(Path(data), "data folder")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder to write the RSNA-format dataset into")],
    studies: Annotated[int | None, typer.Option(help="training studies (synth.train_studies)")] = None,
    test_studies: Annotated[int | None, typer.Option(help="test studies (synth.test_studies)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed; same seed, same bytes (synth.seed)")] = None,
    preset: Annotated[str | None, typer.Option(help="easy (separable) or hard (reader noise; synth.preset)")] = None,
    masks: Annotated[
        bool | None, typer.Option("--masks/--no-masks", help="a label volume per sagittal series (synth.masks)")
    ] = None,
    spider: Annotated[
        Path | None, typer.Option(help="also write the training split in SPIDER's layout here (needs the masks)")
    ] = None,
    nnunet: Annotated[
        Path | None, typer.Option(help="also export the training split for nnU-Net here (needs the masks)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace whatever is in OUT")] = False,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Write a synthetic RSNA-format dataset of DICOM spine phantoms with planted severities."""
    from lumbar_ray.data.synthetic import write_dataset
    from lumbar_ray.segment.nnunet import export_nnunet
    from lumbar_ray.segment.spider import dataset_cases, write_spider

    options = {
        "synth.train_studies": studies,
        "synth.test_studies": test_studies,
        "synth.seed": seed,
        "synth.preset": preset,
        "synth.masks": True if (spider or nnunet) is not None and masks is None else masks,
    }
    cfg = load(config, options, overrides)
    if (spider or nnunet) is not None and not cfg.synth.masks:
        raise typer.BadParameter("--spider and --nnunet write the masks: drop --no-masks (or synth.masks=false)")
    result = write_dataset(out, cfg.synth, overwrite=overwrite)
    state = "reused" if result.reused else "written"
    typer.echo(f"{result.files} DICOM files of {result.train_studies}+{result.test_studies} studies {state}: {out}")
    if spider is not None:
        typer.echo(f"{write_spider(out, spider)} SPIDER-layout cases (images/, masks/): {spider}")
    if nnunet is not None:
        typer.echo(f"nnU-Net dataset (dataset.json, imagesTr/, labelsTr/): {export_nnunet(dataset_cases(out), nnunet)}")
    if result.bayes_floor is not None:
        terms = ", ".join(f"{k} {v:.4f}" for k, v in result.bayes_floor.items() if k != "total")
        typer.echo(
            f"Bayes floor (a perfect model, real label distribution): {result.bayes_floor['total']:.4f} ({terms})"
        )
        typer.echo(f"a perfect model on these training labels: {result.oracle_train['total']:.4f}")


@app.command()
def report(
    data: Annotated[Path, typer.Option(help="RSNA-format folder")],
    check_images: Annotated[bool, typer.Option(help="also check that every series folder exists")] = False,
) -> None:
    """Validate an RSNA-format folder and print its data report."""
    from lumbar_ray.data.rsna import build_report, load_rsna

    typer.echo(build_report(load_rsna(_existing_folder(data, "data folder")), check_images=check_images).format())


@app.command()
def baseline(
    data: Annotated[Path, typer.Option(help="RSNA-format folder with train.csv")],
    folds: Annotated[int, typer.Option(help="number of folds")] = 5,
    seed: Annotated[int, typer.Option(help="fold seed")] = 42,
    out: Annotated[Path | None, typer.Option(help="write the out-of-fold submission here")] = None,
    weighted: Annotated[bool, typer.Option(help="multiply frequencies by the metric's 1/2/4 weights")] = True,
) -> None:
    """Score the per-condition-and-level prior out of fold with the official metric."""
    from lumbar_ray.baseline import run_baseline

    result = run_baseline(_existing_folder(data, "data folder"), n_folds=folds, seed=seed, out_csv=out,
                          weighted=weighted)  # fmt: skip
    typer.echo(result.score.format())


@app.command()
def score(
    solution: Annotated[Path, typer.Option(help="train.csv-format labels")],
    submission: Annotated[Path, typer.Option(help="competition-format predictions")],
    drop_missing: Annotated[bool, typer.Option(help="score only the rows that have a prediction")] = False,
) -> None:
    """Score a submission against labels with the official competition metric."""
    import pandas as pd

    from lumbar_ray.metrics import score_submission

    for path in (solution, submission):
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
    result = score_submission(
        pd.read_csv(solution), pd.read_csv(submission), missing="drop" if drop_missing else "error"
    )
    typer.echo(result.format())


@app.command()
def preprocess(
    data: Annotated[str | None, typer.Option(help="RSNA-format folder or URI, e.g. s3://b/rsna (data.root)")] = None,
    cache: Annotated[str | None, typer.Option(help="cache root: a folder or a URI such as s3://bucket/cache")] = None,
    workers: Annotated[int | None, typer.Option(help="actor pool size (preprocess.workers)")] = None,
    strict: Annotated[bool, typer.Option(help="exit 1 when any series failed")] = False,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Decode every series into the cache with Ray Data (resumable; failures tabled, never fatal)."""
    options = {"data.root": _data_root(data), "preprocess.cache": cache, "preprocess.workers": workers}
    cfg = load(config, options, overrides)
    from lumbar_ray.pipeline import complete_cache

    summary = complete_cache(cfg)
    typer.echo(summary.format())
    if (strict or cfg.preprocess.strict) and summary.failed:
        typer.echo(f"error: {summary.failed} series failed (--strict)", err=True)
        raise typer.Exit(1)


@app.command()
def train(config: ConfigFile = None, overrides: Overrides = None) -> None:
    """k-fold training on Ray Train, scored out of fold, tracked in MLflow, ensemble registered (resumable; the
    cache is completed first)."""
    cfg = load(config, {}, overrides)
    from lumbar_ray.pipeline import train as run_train

    _save_resolved(cfg)
    typer.echo(run_train(cfg).format())


@app.command()
def tune(
    config: ConfigFile = None,
    overrides: Overrides = None,
    num_samples: Annotated[int | None, typer.Option(help="trials in all (tune.num_samples)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the interrupted experiment tune.name")] = False,
    register_best: Annotated[bool, typer.Option(help="retrain the best config and register it")] = False,
) -> None:
    """Ray Tune + Optuna (TPE) + ASHA over the k-fold CV; writes the best config; resumable."""
    cfg = load(config, {"tune.num_samples": num_samples}, overrides)
    from lumbar_ray.pipeline import tune as run_tune

    _save_resolved(cfg)
    typer.echo(run_tune(cfg, resume=resume, register_best=register_best).format())


@app.command()
def ensemble(
    cv: Annotated[list[str], typer.Option("--cv", help="a trained CV run id of the workdir (runs/<id>); repeat it")],
    name: Annotated[str | None, typer.Option(help="registered model name (tracking.model_name)")] = None,
    workdir: Annotated[Path | None, typer.Option(help="the workdir the CV runs were trained in (workdir)")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Combine trained CV runs (same folds; any architectures and crops) into one registered model, blended with
    weights fitted out of fold (and temperatures with calibrate.temperature=true)."""
    cfg = load(config, {"tracking.model_name": name, "workdir": workdir}, overrides)
    from lumbar_ray.pipeline import ensemble as run_ensemble

    typer.echo(run_ensemble(cfg, cv).format())


@app.command()
def localize(config: ConfigFile = None, overrides: Overrides = None) -> None:
    """Train the sagittal localisers (YOLO detectors as Ray tasks, or with localize.method=unet the U-Net of
    `segment`) and measure localisation on a held-out fold (resumable; the cache is completed first)."""
    cfg = load(config, {}, overrides)
    from lumbar_ray.pipeline import localize as run_localize

    typer.echo(run_localize(cfg).format())


@app.command()
def segment(config: ConfigFile = None, overrides: Overrides = None) -> None:
    """Train the 2.5D segmentation U-Net (MONAI, Ray Train) on masks or label-point maps and measure its Dice per
    structure on the localisation's held-out fold (resumable; the cache is completed first)."""
    cfg = load(config, {}, overrides)
    from lumbar_ray.pipeline import segment as run_segment

    typer.echo(run_segment(cfg).format())


@app.command()
def predict(
    model: Annotated[str | None, typer.Option(help="MLflow model URI: models:/<name>@<alias> (predict.model)")] = None,
    data: Annotated[str | None, typer.Option(help="RSNA-format folder or URI, e.g. s3://b/rsna (predict.data)")] = None,
    out: Annotated[Path | None, typer.Option(help="submission CSV to write (predict.out)")] = None,
    split: Annotated[str | None, typer.Option(help="test (default) or train (predict.split)")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Registered ensemble -> competition submission: preprocess, localise, crop, predict (Ray Data)."""
    options = {"predict.model": model, "predict.data": _data_root(data), "predict.out": out, "predict.split": split}
    cfg = load(config, options, overrides)
    from lumbar_ray.pipeline import predict as run_predict

    typer.echo(run_predict(cfg).format())


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="MLflow model URI: models:/<name>@<alias> (serve.model)")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP host (serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (serve.port)")] = None,
    write_config: Annotated[
        Path | None, typer.Option(help="write the Serve config (serve deploy, a RayService) here and exit")
    ] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Registered model -> HTTP: POST a study (zip or DICOM files) to /v1/studies:predict (Ray Serve)."""
    cfg = load(config, {"serve.model": model, "serve.host": host, "serve.port": port}, overrides)
    from lumbar_ray.serve import run_serve, serve_config

    if write_config is not None:
        write_config.write_text(yaml.safe_dump(serve_config(cfg), sort_keys=False))
        typer.echo(f"Serve config: {write_config} (serve deploy {write_config})")
        return
    run_serve(cfg)


@app.command()
def quickstart(
    workdir: Annotated[Path | None, typer.Option(help="where data, caches, checkpoints and mlflow.db go")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    tune: Annotated[bool, typer.Option(help="end with the short tuning stage (tune.*)")] = True,
) -> None:
    """Run the pipeline end to end on synthetic data with embedded defaults (no network, CPU)."""
    cfg = load(config, {"workdir": workdir}, overrides)
    from lumbar_ray.pipeline import run_quickstart

    result = run_quickstart(cfg, tune=tune)
    sections = [
        ("", result.report.format()),
        (f"Prior baseline, {cfg.cv.n_folds}-fold out of fold (official metric):", result.baseline.score.format()),
        ("Preprocessing (Ray Data):", result.preprocess.format()),
        ("Localisation (YOLO level detectors + axial geometry), validation fold:", result.localize.format()),
        ("k-fold training (Ray Train), out of fold:",
         result.cv.format(result.registered)),
    ]  # fmt: skip
    if result.points_check is not None:
        sections.append(("Predicted vs labelled points (the detectors' held-out fold, through the inference path):",
                         "  " + result.points_check.format()))  # fmt: skip
    if result.tuning is not None:
        sections.append(("Tuning (Ray Tune + Optuna + ASHA):", result.tuning.format()))
    sections.append(("Inference on the test studies (Ray Data, model pulled by alias):", result.prediction.format()))
    for title, body in sections:
        typer.echo(f"{title}\n{body}\n" if title else f"{body}\n")
    typer.echo(f"data:       {result.data_root}")
    typer.echo(f"workdir:    {result.workdir}")
    typer.echo(f"submission: {result.prediction.submission_path}")
    typer.echo(f"MLflow UI:  mlflow ui --backend-store-uri {result.tracking_uri}  (then http://127.0.0.1:5000)")


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, RsnaFormatError, DicomReadError, SubmissionError,
                                                ModelNotFoundError, UnknownStudyError, EnsembleError,
                                                DataChangedError, FileExistsError, FileNotFoundError)  # fmt: skip
"""The exceptions that mean bad input rather than a bug: reported as one line, exit code 2."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: input errors become one clear line on stderr and exit code 2, not a traceback.

    Usage errors (an unknown option, a missing required one) are typer's own, also with exit code 2.

    Args:
        argv: arguments instead of ``sys.argv[1:]`` (the ``jobs/*.py`` entrypoints pass theirs).
    """
    try:
        app(argv)
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
