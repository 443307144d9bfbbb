"""``lumbar-ray``: the command line. Each command parses its options and makes one library call."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Train, tune, track and serve lumbar spine degeneration classifiers (RSNA 2024) on Ray and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="config overrides such as synth.train_studies=20", show_default=False),
]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file", exists=True)]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder to write the RSNA-format dataset into")],
    studies: Annotated[int, typer.Option(help="training studies")] = 48,
    test_studies: Annotated[int, typer.Option(help="test studies (test_images/, sample_submission.csv)")] = 4,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same bytes")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace whatever is in OUT")] = False,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Write a synthetic RSNA-format dataset of DICOM spine phantoms with planted severities."""
    from lumbar_ray.config import load_config
    from lumbar_ray.data.synthetic import write_dataset

    options = [f"synth.train_studies={studies}", f"synth.test_studies={test_studies}", f"synth.seed={seed}"]
    cfg = load_config(config, [*options, *(overrides or [])])
    result = write_dataset(out, cfg.synth, overwrite=overwrite)
    state = "reused" if result.reused else "written"
    typer.echo(f"{result.files} DICOM files of {result.train_studies}+{result.test_studies} studies {state}: {out}")


@app.command()
def report(
    data: Annotated[Path, typer.Option(help="RSNA-format folder", exists=True, file_okay=False)],
    check_images: Annotated[bool, typer.Option(help="also check that every series folder exists")] = False,
) -> None:
    """Validate an RSNA-format folder and print its data report."""
    from lumbar_ray.data.rsna import build_report, load_rsna

    typer.echo(build_report(load_rsna(data), check_images=check_images).format())


@app.command()
def baseline(
    data: Annotated[Path, typer.Option(help="RSNA-format folder with train.csv", exists=True, file_okay=False)],
    folds: Annotated[int, typer.Option(help="number of folds")] = 5,
    seed: Annotated[int, typer.Option(help="fold seed")] = 42,
    out: Annotated[Path | None, typer.Option(help="write the out-of-fold submission here")] = None,
    weighted: Annotated[bool, typer.Option(help="multiply frequencies by the metric's 1/2/4 weights")] = True,
) -> None:
    """Score the per-condition-and-level prior out of fold with the official metric."""
    from lumbar_ray.baseline import run_baseline

    result = run_baseline(data, n_folds=folds, seed=seed, out_csv=out, weighted=weighted)
    typer.echo(result.score.format())


@app.command()
def score(
    solution: Annotated[Path, typer.Option(help="train.csv-format labels", exists=True, dir_okay=False)],
    submission: Annotated[Path, typer.Option(help="competition-format predictions", exists=True, dir_okay=False)],
    drop_missing: Annotated[bool, typer.Option(help="score only the rows that have a prediction")] = False,
) -> None:
    """Score a submission against labels with the official competition metric."""
    import pandas as pd

    from lumbar_ray.metrics import score_submission

    result = score_submission(
        pd.read_csv(solution), pd.read_csv(submission), missing="drop" if drop_missing else "error"
    )
    typer.echo(result.format())


@app.command()
def preprocess(
    data: Annotated[Path, typer.Option(help="RSNA-format folder", exists=True, file_okay=False)],
    cache: Annotated[str, typer.Option(help="cache root: a folder or a URI such as s3://bucket/cache")],
    workers: Annotated[int | None, typer.Option(help="actor pool size (series decoded in parallel)")] = None,
    strict: Annotated[bool, typer.Option(help="exit 1 when any series failed")] = False,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Decode every series into the cache with Ray Data (resumable; failures tabled, never fatal)."""
    from lumbar_ray.config import load_config
    from lumbar_ray.data.preprocess import run_preprocess

    options = [f"preprocess.workers={workers}"] if workers is not None else []
    cfg = load_config(config, [*options, *(overrides or [])])
    summary = run_preprocess(data, cache, cfg.preprocess)
    typer.echo(summary.format())
    if (strict or cfg.preprocess.strict) and summary.failed:
        typer.echo(f"error: {summary.failed} series failed (--strict)", err=True)
        raise typer.Exit(1)


@app.command()
def train(
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """k-fold training on Ray Train, scored out of fold, tracked in MLflow, ensemble registered (resumable)."""
    from lumbar_ray.config import load_config, save_config
    from lumbar_ray.train.cv import run_cv

    cfg = load_config(config, overrides or [])
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.workdir) / "resolved_config.yaml")
    result = run_cv(cfg)
    typer.echo(result.format())


@app.command()
def tune(
    config: ConfigFile = None,
    overrides: Overrides = None,
    num_samples: Annotated[int | None, typer.Option(help="trials in all (overrides tune.num_samples)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the interrupted experiment tune.name")] = False,
    register_best: Annotated[bool, typer.Option(help="retrain the best config and register it")] = False,
) -> None:
    """Ray Tune + Optuna (TPE) + ASHA over the k-fold CV; writes the best config; resumable."""
    from lumbar_ray.config import load_config, save_config
    from lumbar_ray.tune.run import run_tune

    extra = [f"tune.num_samples={num_samples}"] if num_samples is not None else []
    cfg = load_config(config, [*(overrides or []), *extra])
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.workdir) / "resolved_config.yaml")
    typer.echo(run_tune(cfg, resume=resume, register_best=register_best).format())


@app.command()
def localize(
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the sagittal YOLO level detectors (Ray tasks) and measure localisation on a held-out fold (resumable)."""
    from lumbar_ray.config import load_config
    from lumbar_ray.localize.stage import run_localize

    cfg = load_config(config, overrides or [])
    typer.echo(run_localize(cfg).format())


@app.command()
def predict(
    model: Annotated[
        str | None, typer.Option(help="MLflow model URI, e.g. models:/lumbar_ray_ensemble@champion")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="RSNA-format folder", exists=True, file_okay=False)] = None,
    out: Annotated[Path | None, typer.Option(help="submission CSV to write")] = None,
    split: Annotated[str | None, typer.Option(help="test (default) or train")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Registered ensemble -> competition submission: preprocess, localise, crop, predict (Ray Data)."""
    from lumbar_ray.config import load_config
    from lumbar_ray.predict import run_predict

    options = [f"predict.{key}={value}" for key, value in (("model", model), ("data", data), ("out", out),
                                                          ("split", split)) if value is not None]  # fmt: skip
    cfg = load_config(config, [*options, *(overrides or [])])
    typer.echo(run_predict(cfg).format())


@app.command()
def quickstart(
    workdir: Annotated[Path, typer.Option(help="where data, caches, checkpoints and mlflow.db go")] = Path(
        "lumbar_ray_work"
    ),
    config: ConfigFile = None,
    overrides: Overrides = None,
    tune: Annotated[bool, typer.Option(help="end with the short tuning stage (tune.*)")] = True,
) -> None:
    """Run the pipeline end to end on synthetic data with embedded defaults (no network, CPU)."""
    from lumbar_ray.config import load_config
    from lumbar_ray.quickstart import run_quickstart

    cfg = load_config(config, [f"workdir={workdir}", *(overrides or [])])
    result = run_quickstart(cfg, tune=tune)
    typer.echo(result.report.format())
    typer.echo("")
    typer.echo(f"Prior baseline, {cfg.cv.n_folds}-fold out of fold (official metric):")
    typer.echo(result.baseline.score.format())
    typer.echo("")
    typer.echo("Preprocessing (Ray Data):")
    typer.echo(result.preprocess.format())
    typer.echo("")
    typer.echo("Localisation (YOLO level detectors + axial geometry), validation fold:")
    typer.echo(result.localize.format())
    typer.echo("")
    typer.echo("k-fold training (Ray Train), out of fold:")
    typer.echo(result.cv.format())
    typer.echo("")
    if result.points_check is not None:
        typer.echo("Predicted vs labelled points (the detectors' held-out fold, through the inference path):")
        typer.echo("  " + result.points_check.format())
        typer.echo("")
    if result.tuning is not None:
        typer.echo("Tuning (Ray Tune + Optuna + ASHA):")
        typer.echo(result.tuning.format())
        typer.echo("")
    typer.echo("Inference on the test studies (Ray Data, model pulled by alias):")
    typer.echo(result.prediction.format())
    typer.echo("")
    typer.echo(f"data:       {result.data_root}")
    typer.echo(f"workdir:    {result.workdir}")
    typer.echo(f"submission: {result.prediction.submission_path}")
    typer.echo(f"MLflow UI:  mlflow ui --backend-store-uri {result.tracking_uri}  (then http://127.0.0.1:5000)")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: input errors become one clear line on stderr and exit code 2, not a traceback.

    Args:
        argv: arguments instead of ``sys.argv[1:]`` (the ``jobs/*.py`` entrypoints pass theirs).
    """
    from lumbar_ray.config import ConfigError
    from lumbar_ray.data.dicom import DicomReadError
    from lumbar_ray.data.rsna import RsnaFormatError
    from lumbar_ray.metrics import SubmissionError

    try:
        app(argv)
    except (ConfigError, RsnaFormatError, DicomReadError, SubmissionError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
