"""Paired comparison of two recipes' out-of-fold predictions on the same studies and folds.

Two CVs of the same data on the same folds differ by the recipe and by noise: which studies a fold holds, how
training went. Pairing removes the first (both predict the very same studies) and leaves the second, so a delta
is judged against two standard errors, and the larger one decides:

- ``se_folds``: the spread of the per-fold deltas over the folds (``sd / sqrt(k)``): it sees training noise, but
  with 3-5 folds it is itself a rough estimate;
- ``se_studies``: a paired bootstrap over studies of the whole out-of-fold delta: tight, but blind to how a
  retrained model would differ.

A delta is *significant* when it clears both: ``t(0.975, k - 1)`` fold standard errors (with 3 folds that is
4.3 of them, not 2: the fold SE rests on k - 1 degrees of freedom) and two study standard errors. ``z`` is the
delta over the larger standard error, for reading. Pure numpy and scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from lumbar_ray.metrics import score_arrays

TERMS = ("total", "spinal", "foraminal", "subarticular", "any_severe_spinal")
BOOTSTRAP_SAMPLES = 500


def _score(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return score_arrays(labels, probs).to_dict()


def fold_scores(labels: np.ndarray, probs: np.ndarray, fold_of: np.ndarray) -> pd.DataFrame:
    """The official score of each fold's studies: rows ``fold``, columns :data:`TERMS`."""
    rows = {int(k): _score(labels[fold_of == k], probs[fold_of == k]) for k in np.unique(fold_of)}
    return pd.DataFrame.from_dict(rows, orient="index")[list(TERMS)].rename_axis("fold")


def bootstrap_se(
    labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, float]:
    """Standard error of each term's delta (b - a) under a paired resampling of studies."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    deltas = {term: [] for term in TERMS}
    for _ in range(samples):
        pick = rng.integers(0, n, size=n)
        a, b = _score(labels[pick], probs_a[pick]), _score(labels[pick], probs_b[pick])
        for term in TERMS:
            deltas[term].append(b[term] - a[term])
    return {term: float(np.nanstd(values, ddof=1)) for term, values in deltas.items()}


@dataclass
class PairedComparison:
    """Recipe ``b`` against recipe ``a`` on the same studies and folds (lower scores are better).

    Attributes:
        table: one row per term of :data:`TERMS`: ``a``, ``b`` (whole out-of-fold scores), ``delta`` (b - a),
            ``se_folds``, ``se_studies``, ``se`` (the larger), ``z`` (delta / se), ``significant``.
        folds: per-fold deltas of every term (rows ``fold``).
    """

    table: pd.DataFrame
    folds: pd.DataFrame

    def format(self, name_a: str = "a", name_b: str = "b") -> str:
        """A small text table: each term's scores, delta, standard errors and verdict."""
        lines = [f"  {'term':<18} {name_a[:10]:>10} {name_b[:10]:>10} {'delta':>9} {'se_folds':>9} "
                 f"{'se_studies':>10} {'z':>6}"]  # fmt: skip
        for term, row in self.table.iterrows():
            verdict = ("worse" if row["delta"] > 0 else "better") if row["significant"] else "no difference"
            lines.append(f"  {term:<18} {row['a']:>10.5f} {row['b']:>10.5f} {row['delta']:>+9.5f} "
                         f"{row['se_folds']:>9.5f} {row['se_studies']:>10.5f} {row['z']:>6.1f}  {verdict}")  # fmt: skip
        per_fold = ", ".join(f"{fold}: {value:+.4f}" for fold, value in self.folds["total"].items())
        lines.append(f"  per-fold total deltas: {per_fold}")
        return "\n".join(lines)


def compare_paired(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    fold_of: np.ndarray,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Compare two recipes' out-of-fold predictions of the same studies.

    Args:
        labels: ``(n, 25)`` class ids (IGNORE_INDEX where empty).
        probs_a: ``(n, 25, 3)`` recipe a's out-of-fold probabilities, aligned with ``labels``.
        probs_b: the same for recipe b.
        fold_of: ``(n,)`` the fold of each study (the same folds for both recipes).
        samples: bootstrap resamples of studies.
        seed: the bootstrap's seed.

    Raises:
        ValueError: on misaligned shapes or fewer than two folds.
    """
    labels, fold_of = np.asarray(labels), np.asarray(fold_of)
    if not (probs_a.shape == probs_b.shape == (*labels.shape, 3)) or len(fold_of) != len(labels):
        raise ValueError(f"misaligned inputs: labels {labels.shape}, probs {probs_a.shape} / {probs_b.shape}, "
                         f"folds {fold_of.shape}")  # fmt: skip
    if len(np.unique(fold_of)) < 2:
        raise ValueError("a paired comparison over folds needs at least two folds")
    whole_a, whole_b = _score(labels, probs_a), _score(labels, probs_b)
    per_fold = fold_scores(labels, probs_b, fold_of) - fold_scores(labels, probs_a, fold_of)
    k = len(per_fold)
    se_studies = bootstrap_se(labels, probs_a, probs_b, samples, seed)
    t_folds = float(student_t.ppf(0.975, k - 1))
    rows = {}
    for term in TERMS:
        se_folds = float(per_fold[term].std(ddof=1) / np.sqrt(k))
        se = max(se_folds, se_studies[term])
        delta = whole_b[term] - whole_a[term]
        significant = abs(delta) > max(t_folds * se_folds, 2 * se_studies[term])
        rows[term] = {"a": whole_a[term], "b": whole_b[term], "delta": delta, "se_folds": se_folds,
                      "se_studies": se_studies[term], "se": se, "z": delta / se if se > 0 else np.nan,
                      "significant": bool(significant)}  # fmt: skip
    return PairedComparison(pd.DataFrame.from_dict(rows, orient="index"), per_fold)
