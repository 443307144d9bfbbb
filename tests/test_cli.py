"""The command line, run as a user would: a real subprocess of ``python -m lumbar_ray``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lumbar_ray", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


# The quickstart trains too: keep its CV as small as a CV gets (1 worker, 1 epoch, 16 px crops). Its tuning stage is
# left out here (--no-tune): tests/tune/test_tune_resume.py runs the tuning CLI end to end.
TINY_TRAINING = (
    "--no-tune", "preprocess.image_size=96", "train.epochs=1", "train.num_workers=1", "crop.size=16", "crop.region=24",
    "localize.epochs=1", "localize.imgsz=64", "localize.width=0.0625", "localize.num_cpus=1",
)  # fmt: skip


def test_help_lists_every_command_with_help_text():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("synth", "report", "baseline", "score", "preprocess", "train", "localize", "predict", "quickstart"):
        assert command in result.stdout
    assert "Write a synthetic RSNA-format dataset" in result.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_quickstart_prints_report_and_baseline_score(tmp_path):
    workdir = tmp_path / "work"
    result = run_cli(
        "quickstart",
        "--workdir",
        str(workdir),
        "synth.train_studies=12",
        "synth.test_studies=1",
        "synth.image_sizes=[96]",
        "cv.n_folds=2",
        *TINY_TRAINING,
    )
    assert result.returncode == 0, result.stderr
    assert "RSNA data report" in result.stdout and "train: 12 studies" in result.stdout
    assert "Prior baseline, 2-fold out of fold" in result.stdout
    total = next(line for line in result.stdout.splitlines() if line.strip().startswith("total"))
    assert 0.2 < float(total.split()[-1]) < 1.2
    assert (workdir / "resolved_config.yaml").is_file() and (workdir / "baseline_oof.csv").is_file()
    assert "train_studies: 12" in (workdir / "resolved_config.yaml").read_text()
    assert "k-fold training (Ray Train)" in result.stdout and "2 trained now" in result.stdout
    assert "registered: " in result.stdout and (workdir / "mlflow.db").is_file()
    assert "Localisation (YOLO level detectors" in result.stdout and "Predicted vs labelled points" in result.stdout
    submission = workdir / "predict" / "submission.csv"
    assert f"submission: {submission}" in result.stdout and len(submission.read_text().splitlines()) == 1 + 25
    assert "MLflow UI:  mlflow ui --backend-store-uri sqlite:///" in result.stdout
    # rerun with the same config reuses the dataset instead of writing it again
    again = run_cli(
        "quickstart",
        "--workdir",
        str(workdir),
        "synth.train_studies=12",
        "synth.test_studies=1",
        "synth.image_sizes=[96]",
        "cv.n_folds=2",
        *TINY_TRAINING,
    )
    assert again.returncode == 0 and "reusing it" in again.stderr
    assert "0 trained now, 2 already done" in again.stdout  # the rerun resumed instead of training again


def test_synth_then_report_and_score(tmp_path):
    out = tmp_path / "rsna"
    result = run_cli("synth", "--out", str(out), "--studies", "3", "--test-studies", "1", "synth.image_sizes=[96]")
    assert result.returncode == 0, result.stderr
    assert (out / "train_label_coordinates.csv").is_file() and (out / "sample_submission.csv").is_file()
    report = run_cli("report", "--data", str(out), "--check-images")
    assert report.returncode == 0 and "train: 3 studies" in report.stdout
    baseline = run_cli("baseline", "--data", str(out), "--folds", "3", "--out", str(tmp_path / "oof.csv"))
    assert baseline.returncode == 0, baseline.stderr
    scored = run_cli("score", "--solution", str(out / "train.csv"), "--submission", str(tmp_path / "oof.csv"))
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.split() == baseline.stdout.split()  # same figures from the written file


def test_input_errors_are_one_clear_line(tmp_path):
    bad_key = run_cli("quickstart", "--workdir", str(tmp_path), "synth.studies=3")
    assert bad_key.returncode == 2
    assert "unknown config key 'synth.studies'" in bad_key.stderr and "Traceback" not in bad_key.stderr
    folder = tmp_path / "broken"
    folder.mkdir()
    pd.DataFrame({"study_id": [1], "series_id": [2], "series_description": ["Coronal T9"]}).to_csv(
        folder / "train_series_descriptions.csv", index=False
    )
    broken = run_cli("report", "--data", str(folder))
    assert broken.returncode == 2
    assert "train_series_descriptions.csv" in broken.stderr and "Coronal T9" in broken.stderr
