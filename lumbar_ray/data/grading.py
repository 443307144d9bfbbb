"""How readers grade: latent severities, reader noise, wrong labels, and the Bayes floor that follows.

Real severity labels are one radiologist's reading of a continuous degeneration: two readers disagree near the
class boundaries, and some labels are plainly wrong. This module is that model, for the synthetic data's hard
preset, in pure numpy:

- each target of a study has a latent severity ``z`` (standard normal, correlated within a study through a shared
  degeneration factor). In *severity units* ``x = (sqrt(1 - rho) * z - a) / (b - a)``, where ``a`` and ``b`` are
  the standard-normal quantiles of the target's real class frequencies, the moderate boundary is at 0 and the
  severe boundary at 1 for every target, so the image can show ``x`` the same way at every level;
- the reader sees ``x + sigma * e`` (``e`` standard normal, ``sigma = sqrt(rho) / (b - a)``) and cuts it at 0 and
  1; ``rho``, the share of the latent variance that is reader noise, is set per condition group. The label's
  marginal frequencies are exactly the real ones;
- a small share of labels is replaced by a draw from the target's real class frequencies (a wrong label).

The generator knows ``x``, so the posterior ``P(label | x)`` is exact, and the *Bayes floor* is the official score
of the metric-optimal prediction of each row, ``p_c ~ w_c * P(c | x)`` (the metric weights each row by its true
class, 1/2/4), estimated here by Monte Carlo over the real label distribution. It is a tight bound rather than
the exact optimum: the any-severe term takes the maximum over levels of those rows' P(severe), which is not quite
the best any-severe prediction (about 0.003 on that term, under 0.001 on the total).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
from scipy.special import ndtr

from lumbar_ray.constants import CONDITION_GROUPS, CONDITIONS, LEVELS, TARGETS, condition_group
from lumbar_ray.metrics import ScoreResult, metric_optimal, score_arrays

# Class frequencies (Normal/Mild, Moderate, Severe) per condition and level, measured on the real train.csv.
REAL_CLASS_FREQUENCIES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "spinal_canal_stenosis": (
        (0.955, 0.034, 0.011),
        (0.897, 0.076, 0.027),
        (0.822, 0.117, 0.062),
        (0.751, 0.120, 0.129),
        (0.965, 0.026, 0.010),
    ),
    "left_neural_foraminal_narrowing": (
        (0.967, 0.032, 0.001),
        (0.908, 0.087, 0.006),
        (0.771, 0.208, 0.020),
        (0.610, 0.319, 0.071),
        (0.632, 0.264, 0.104),
    ),
    "right_neural_foraminal_narrowing": (
        (0.961, 0.032, 0.007),
        (0.912, 0.085, 0.003),
        (0.769, 0.210, 0.021),
        (0.614, 0.320, 0.066),
        (0.651, 0.252, 0.097),
    ),
    "left_subarticular_stenosis": (
        (0.933, 0.051, 0.015),
        (0.821, 0.135, 0.044),
        (0.671, 0.230, 0.098),
        (0.450, 0.316, 0.234),
        (0.717, 0.208, 0.075),
    ),
    "right_subarticular_stenosis": (
        (0.926, 0.061, 0.013),
        (0.833, 0.128, 0.039),
        (0.670, 0.230, 0.100),
        (0.452, 0.315, 0.233),
        (0.711, 0.201, 0.088),
    ),
}

MANIFEST_NAME = "synthetic.json"
"""The synthetic dataset's manifest (written last: a folder holding it is complete)."""
SEVERITY_NAME = "synthetic_severity.csv"
"""Written beside train.csv by the hard preset: each training study's latent severities (severity units)."""

FLOOR_STUDIES = 100_000
"""Studies of the Monte-Carlo floor estimate (about a second): its standard error is then about 0.001."""


@dataclass(frozen=True)
class ReaderModel:
    """How noisy the readers are.

    Attributes:
        noise_share: per condition group (``spinal``, ``foraminal``, ``subarticular``), the share ``rho`` of the
            latent variance that is reader noise. 0 = readers agree with the latent exactly.
        wrong_label_rate: share of labels replaced by a draw from the target's real class frequencies.
        study_correlation: weight of the study's shared degeneration factor in every latent (0 = independent).
    """

    noise_share: dict[str, float]
    wrong_label_rate: float = 0.0
    study_correlation: float = 0.5

    def __post_init__(self) -> None:
        if set(self.noise_share) != set(CONDITION_GROUPS):
            raise ValueError(f"noise_share needs one value per group {sorted(CONDITION_GROUPS)}")
        if not all(0.0 < v < 1.0 for v in self.noise_share.values()):
            raise ValueError("noise_share values must lie in (0, 1): some reader noise, not only noise")
        if not 0.0 <= self.wrong_label_rate < 1.0 or not 0.0 <= self.study_correlation < 1.0:
            raise ValueError("wrong_label_rate and study_correlation must lie in [0, 1)")


HARD_READERS = ReaderModel(
    # Calibrated (benchmarks/README.md, "hard preset") so that the floor lies in the 0.33-0.36 the real task's
    # best CVs suggest, spinal easiest and subarticular hardest, as on the real labels.
    noise_share={"spinal": 0.06, "foraminal": 0.18, "subarticular": 0.22},
    wrong_label_rate=0.02,
)


def class_frequencies() -> np.ndarray:
    """The real class frequencies, shape (25, 3), in TARGETS order."""
    rows = []
    for target in TARGETS:
        condition, level = target[:-6], target[-5:]
        rows.append(REAL_CLASS_FREQUENCIES[condition][LEVELS.index(level)])
    frequencies = np.asarray(rows, dtype=np.float64)
    return frequencies / frequencies.sum(axis=1, keepdims=True)


def class_cuts() -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal quantiles ``(a, b)`` of each target's moderate and severe boundaries, shape (25,) each."""
    frequencies = class_frequencies()
    normal = NormalDist()
    low = np.array([normal.inv_cdf(p) for p in frequencies[:, 0]])
    high = np.array([normal.inv_cdf(min(p, 1 - 1e-9)) for p in frequencies[:, 0] + frequencies[:, 1]])
    return low, high


def _target_groups() -> list[str]:
    return [condition_group(target[:-6]) for target in TARGETS]


def noise_shares(readers: ReaderModel) -> np.ndarray:
    """``rho`` of each target, shape (25,)."""
    return np.array([readers.noise_share[group] for group in _target_groups()])


def reader_sigma(readers: ReaderModel) -> np.ndarray:
    """The reader's noise in severity units per target, shape (25,)."""
    low, high = class_cuts()
    return np.sqrt(noise_shares(readers)) / (high - low)


def sample_latents(rng: np.random.Generator, n_studies: int, correlation: float) -> np.ndarray:
    """Standard-normal latents ``z``, shape (n_studies, 25), sharing a per-study factor."""
    study_factor = rng.standard_normal((n_studies, 1))
    noise = rng.standard_normal((n_studies, len(TARGETS)))
    return correlation * study_factor + np.sqrt(1 - correlation**2) * noise


def severity_units(latents: np.ndarray, readers: ReaderModel) -> np.ndarray:
    """The latent in severity units: 0 at the moderate boundary, 1 at the severe one, for every target."""
    low, high = class_cuts()
    return (np.sqrt(1 - noise_shares(readers)) * latents - low) / (high - low)


def read_labels(rng: np.random.Generator, severity: np.ndarray, readers: ReaderModel) -> np.ndarray:
    """The reader's class ids 0/1/2 for severities in severity units, same shape as ``severity``."""
    seen = severity + reader_sigma(readers) * rng.standard_normal(severity.shape)
    labels = (seen >= 0).astype(np.int64) + (seen >= 1).astype(np.int64)
    wrong = rng.random(severity.shape) < readers.wrong_label_rate
    cumulative = np.cumsum(class_frequencies(), axis=1)
    redrawn = (rng.random(severity.shape)[..., None] >= cumulative[..., :2]).sum(axis=-1)
    return np.where(wrong, redrawn, labels)


def posterior(severity: np.ndarray, readers: ReaderModel) -> np.ndarray:
    """``P(label = c | severity)``, shape ``(*severity.shape, 3)``: what a perfect model could know."""
    sigma = reader_sigma(readers)
    below_moderate = ndtr(-severity / sigma)
    below_severe = ndtr((1.0 - severity) / sigma)
    read = np.stack([below_moderate, below_severe - below_moderate, 1.0 - below_severe], axis=-1)
    return (1 - readers.wrong_label_rate) * read + readers.wrong_label_rate * class_frequencies()


def bayes_floor(readers: ReaderModel, n_studies: int = FLOOR_STUDIES, seed: int = 0) -> ScoreResult:
    """The official score of the metric-optimal posterior, by Monte Carlo over the real label distribution.

    Args:
        readers: the reader model.
        n_studies: simulated studies (no images: only latents and labels).
        seed: the simulation's seed (the floor is a property of ``readers``, not of a dataset).
    """
    rng = np.random.default_rng(seed)
    severity = severity_units(sample_latents(rng, n_studies, readers.study_correlation), readers)
    labels = read_labels(rng, severity, readers)
    return score_arrays(labels, metric_optimal(posterior(severity, readers)))


def oracle_score(labels: np.ndarray, severity: np.ndarray, readers: ReaderModel) -> ScoreResult:
    """The score a perfect model would get on these particular labels (a dataset's own, noisier floor)."""
    return score_arrays(labels, metric_optimal(posterior(severity, readers)))


def condition_of(target_index: int) -> str:
    """The condition of a target index (TARGETS order)."""
    return CONDITIONS[target_index // len(LEVELS)]


def known_floor(root: Path, study_ids: np.ndarray, labels: np.ndarray) -> ScoreResult | None:
    """A perfect model's score on these studies' labels, where the data folder knows its latents (hard preset).

    Args:
        root: the RSNA-format folder.
        study_ids: ``(n,)`` the scored studies.
        labels: ``(n, 25)`` their labels (IGNORE_INDEX where empty).

    Returns:
        None for data without :data:`SEVERITY_NAME` (real data, the easy preset).
    """
    path = Path(root) / SEVERITY_NAME
    if not path.is_file():
        return None
    severity = pd.read_csv(path).set_index("study_id").reindex(np.asarray(study_ids, dtype=np.int64))
    if severity.isna().any().any():
        raise ValueError(f"{path} lacks latents of {int(severity.isna().any(axis=1).sum())} scored studies")
    return oracle_score(labels, severity[list(TARGETS)].to_numpy(), recorded_readers(root))


def recorded_readers(root: Path) -> ReaderModel:
    """The readers' model a hard-preset folder was written with (its ``synthetic.json``), not today's default.

    Raises:
        ValueError: if the folder does not record one.
    """
    path = Path(root) / MANIFEST_NAME
    readers = json.loads(path.read_text())["manifest"].get("readers") if path.is_file() else None
    if readers is None:
        raise ValueError(f"{path} records no readers' model: not a hard-preset dataset")
    return ReaderModel(**readers)
