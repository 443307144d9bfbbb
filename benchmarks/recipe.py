"""Benchmark: does a recipe change help? Two or more configs' CVs on the same folds of the same data, paired.

The base config and each variant (the base plus a few ``key=value`` overrides) train a full CV on the same data,
the same folds (``cv.seed``) and the same training seed; each variant's out-of-fold predictions are then compared
with the base's, study by study, with :func:`lumbar_ray.paired.compare_paired`: per condition group, the delta
(variant - base; lower scores are better), its standard errors over folds and over studies, and whether it is
significant (more than two of the larger standard error). Both the honest CV (each fold's last epoch, fixed in
advance) and the best-epoch CV (picked on the scored fold) are compared; the honest one is the verdict.

Run it on the hard preset (the easy one cannot rank recipes: its Bayes floor is near zero)::

    python benchmarks/recipe.py --workdir /tmp/recipe synth.preset=hard \\
        --variant "loss.class_weights=[1,1,1]" --variant "augment.jitter_px=0 augment.jitter_slices=0"

With ``--predicted-points`` the detectors are first trained once per fold, each without that fold
(``localize.val_fold=k``), and every CV also scores each fold's last epoch at the points those detectors predict
for its held-out studies (``cv.predicted_points``): the comparison then holds at predicted points too, where a
recipe meets the localisation error it will meet at inference. Those detectors' errors on their held-out folds (all
studies, pooled) also set the training jitter of a config with ``augment.jitter_measured=true``
(:func:`lumbar_ray.pipeline.with_measured_jitter`: per series type, the 90th percentile of the in-plane and slice
errors), e.g. ``--variant "augment.jitter_measured=true model.tta_flip=true"``. The jitter is a statistic of the
detectors alone (no severity label enters it), so it does not tune on the scored folds.

With ``--calibrate`` each CV is also compared after a temperature per condition group, cross-fitted (fitted on
the other folds' out-of-fold predictions, applied to the held-out fold: :func:`lumbar_ray.calibrate.cross_fit`),
so that the calibration's gain is measured without flattering itself; the base gets a row of its own.

A rerun with the same workdir reuses every finished CV and detector (their ids hash the settings).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("recipe")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base config (and every variant)")
    parser.add_argument("--workdir", type=Path, required=True, help="data, cache, CVs and MLflow go here")
    parser.add_argument("--config", type=Path, default=None, help="base YAML (default: the embedded defaults)")
    parser.add_argument("--variant", action="append", default=[], help='overrides of one variant, e.g. "a.b=1 c=2"')
    parser.add_argument("--samples", type=int, default=500, help="bootstrap resamples of studies")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default: <workdir>/recipe.md)")
    parser.add_argument(
        "--calibrate", action="store_true", help="also compare each CV after cross-fitted temperatures per group"
    )
    parser.add_argument(
        "--predicted-points",
        action="store_true",
        help="also compare at points predicted by detectors that never saw each fold",
    )
    return parser.parse_args()


def run(cfg, name: str, errors=None):
    """One CV (resumed or reused if its run id has been trained before), its measured jitter (if it asks for it)
    from ``errors``; returns it and its wall time."""
    from lumbar_ray.pipeline import complete_cache, with_measured_jitter
    from lumbar_ray.train.cv import run_cv

    started = time.perf_counter()
    complete_cache(cfg)  # a variant may preprocess differently
    cv = run_cv(with_measured_jitter(cfg, errors))
    seconds = time.perf_counter() - started
    if cv.last_epoch_score is None:
        raise RuntimeError(f"{name}: CV {cv.run_id} was trained before last epochs were kept; use a new workdir")
    logger.info("%s: CV %s, last epoch %.5f, best epoch %.5f, %.0f s", name, cv.run_id,
                cv.last_epoch_score.total, cv.score.total, seconds)  # fmt: skip
    return cv, seconds


def predicted_points(cfg, n_folds: int, workdir: Path):
    """Every study's points from the detectors trained without its fold; returns the parquet, those detectors'
    errors on their held-out folds (every study's, pooled) and their figures."""
    import pandas as pd

    from lumbar_ray.localize.stage import run_localize
    from lumbar_ray.pipeline import complete_cache

    complete_cache(cfg)
    frames, errors, lines = [], [], []
    for fold in range(n_folds):
        result = run_localize(cfg.model_copy(update={"localize": cfg.localize.model_copy(update={"val_fold": fold})}))
        frames.append(result.val_points)
        errors.append(result.val_errors)
        lines += [f"fold {fold} held out: " + result.format()]
    path = workdir / "predicted_points.parquet"
    pd.concat(frames, ignore_index=True).to_parquet(path, index=False)
    return path, pd.concat(errors, ignore_index=True), lines


def cross_fitted_temperatures(labels: np.ndarray, probs: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """``probs`` after a temperature per condition group fitted on the other folds (each fold in turn)."""
    from lumbar_ray.calibrate import apply_group_temperatures, cross_fit, fit_group_temperatures

    fitted = cross_fit(labels, fold_of, lambda y, rows: fit_group_temperatures(y, probs[rows]),
                       lambda temperatures, rows: apply_group_temperatures(probs[rows], temperatures))  # fmt: skip
    return fitted.probs


def labels_of(cfg, study_ids: np.ndarray) -> np.ndarray:
    """The labels of ``study_ids``, in that order."""
    from lumbar_ray.data.rsna import load_rsna
    from lumbar_ray.labels import encode_labels
    from lumbar_ray.paths import data_root_for

    ids, labels = encode_labels(load_rsna(data_root_for(cfg)).train)
    position = {int(s): i for i, s in enumerate(ids)}
    return labels[[position[int(s)] for s in study_ids]]


def detectable(se: float, studies: int, target: float = 0.01) -> str:
    """Studies a run needs so that two standard errors of the delta are ``target`` (SE ~ 1/sqrt(studies))."""
    needed = int(np.ceil(studies * (2 * se / target) ** 2))
    return f"2 SE = {2 * se:.4f} at {studies} studies; {target} needs about {needed} studies"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lumbar_ray.config import load_config
    from lumbar_ray.paired import compare_paired
    from lumbar_ray.train.cv import assemble_oof

    common = [f"workdir={args.workdir}", "tracking.register_model=false", *args.overrides]
    base = load_config(args.config, common)
    localisation: list[str] = []
    errors = None
    if args.predicted_points:
        path, errors, localisation = predicted_points(base, base.cv.n_folds, args.workdir)
        common.append(f"cv.predicted_points={path}")
        base = load_config(args.config, common)
    base_cv, base_seconds = run(base, "base", errors)
    study_ids = base_cv.folds["study_id"].to_numpy()
    fold_of = base_cv.folds["fold"].to_numpy()
    labels = labels_of(base, study_ids)
    lines = [f"# Recipe comparison: base `{' '.join(args.overrides) or 'defaults'}`, {len(study_ids)} studies, "
             f"{len(np.unique(fold_of))} folds, base CV {base_seconds:.0f} s", ""]  # fmt: skip
    if localisation:
        from lumbar_ray.localize.evaluate import jitter_values

        lines += ["Detectors, one set per held-out fold:", "```", *localisation, "```", "",
                  f"`augment.jitter_measured=true` trains with {jitter_values(errors)}", ""]  # fmt: skip
    epochs = {"last": "honest CV: each fold's last epoch", "best": "best epoch, picked on the fold"}
    if args.predicted_points:
        epochs["last_predicted"] = "honest CV at predicted points: each fold's last epoch, detectors without the fold"
    if args.calibrate:
        lines.append("## the base with cross-fitted temperatures per condition group, against the base")
        for epoch, title in epochs.items():
            if epoch == "best":
                continue
            base_probs = assemble_oof(study_ids, base_cv.outcomes, epoch)
            calibrated = cross_fitted_temperatures(labels, base_probs, fold_of)
            result = compare_paired(labels, base_probs, calibrated, fold_of, samples=args.samples)
            lines += [f"{title}:", "```", result.format("base", "calibrated"), "```"]
        lines.append("")
    for variant in args.variant:
        cfg = load_config(args.config, [*common, *shlex.split(variant)])
        cv, seconds = run(cfg, variant, errors)
        if not cv.folds.set_index("study_id")["fold"].equals(base_cv.folds.set_index("study_id")["fold"]):
            raise RuntimeError(f"variant {variant!r} trained other folds: a paired comparison needs the same ones")
        lines.append(f"## `{variant}` against the base ({seconds:.0f} s)")
        for epoch, title in epochs.items():
            base_probs = assemble_oof(study_ids, base_cv.outcomes, epoch)
            variant_probs = assemble_oof(study_ids, cv.outcomes, epoch)
            result = compare_paired(labels, base_probs, variant_probs, fold_of, samples=args.samples)
            lines += [f"{title}:", "```", result.format("base", "variant"), "```"]
            if epoch == "last":
                lines.append(detectable(result.table.loc["total", "se_studies"], len(study_ids)))
            if args.calibrate and epoch != "best":
                calibrated = cross_fitted_temperatures(labels, variant_probs, fold_of)
                result = compare_paired(labels, base_probs, calibrated, fold_of, samples=args.samples)
                lines += [f"{title}, the variant with cross-fitted temperatures:", "```",
                          result.format("base", "variant+T"), "```"]  # fmt: skip
        lines.append("")
    text = "\n".join(lines)
    out = args.out or args.workdir / "recipe.md"
    out.write_text(text)
    print(text)  # a benchmark's report is its output
    logger.info("written to %s", out)


if __name__ == "__main__":
    main()
