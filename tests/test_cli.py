"""The command line, run as a user would: a real subprocess of ``python -m lumbar_ray``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lumbar_ray.data.grading import HARD_READERS, bayes_floor


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lumbar_ray", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a failed command (logging may write other lines to stderr before it)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# The quickstart trains too: keep its CV as small as a CV gets (1 worker, 1 epoch, 16 px crops). Its tuning stage is
# left out here (--no-tune): tests/tune/test_tune_resume.py runs the tuning CLI end to end.
TINY_TRAINING = (
    "--no-tune", "preprocess.image_size=96", "train.epochs=1", "train.num_workers=1", "crop.size=16", "crop.region=24",
    "localize.epochs=1", "localize.imgsz=64", "localize.width=0.0625", "localize.num_cpus=1",
)  # fmt: skip


def test_help_lists_every_command_with_help_text():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("synth", "report", "baseline", "score", "preprocess", "train", "localize", "segment", "predict",
                    "ensemble", "quickstart"):  # fmt: skip
        assert command in result.stdout
    assert "Write a synthetic RSNA-format dataset" in result.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_quickstart_prints_report_and_baseline_score(ray_env, tmp_path):
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
        env=ray_env,
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
    # A rerun reusing everything is the stages' own tests' (test_synthetic, test_preprocess, localize/test_stage,
    # train/test_cv): a second quickstart here would cost the suite a minute for nothing more.


def test_synth_hard_preset_prints_its_bayes_floor(tmp_path):
    result = run_cli("synth", "--out", str(tmp_path / "hard"), "--studies", "2", "--test-studies", "0",
                     "--preset", "hard", "synth.image_sizes=[96]")  # fmt: skip
    assert result.returncode == 0, result.stderr
    floor = next(line for line in result.stdout.splitlines() if line.startswith("Bayes floor"))
    assert f": {bayes_floor(HARD_READERS).total:.4f} (spinal " in floor
    assert "a perfect model on these training labels: " in result.stdout


def test_synth_writes_masks_the_spider_layout_and_an_nnunet_dataset(tmp_path):
    out, layout, nnunet = tmp_path / "rsna", tmp_path / "spider", tmp_path / "nnunet"
    args = ("synth", "--out", str(out), "--studies", "1", "--test-studies", "0", "synth.image_sizes=[64]")
    result = run_cli(*args, "--spider", str(layout), "--nnunet", str(nnunet), "synth.missing_series_rate=0")
    assert result.returncode == 0, result.stderr
    assert "2 SPIDER-layout cases" in result.stdout
    assert len(list((out / "segmentation" / "train_images").rglob("*.npz"))) == 2
    assert sorted(p.name for p in (layout / "masks").iterdir()) == sorted(p.name for p in (layout / "images").iterdir())
    (dataset,) = nnunet.iterdir()
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    assert len(list((dataset / "imagesTr").iterdir())) == len(list((dataset / "labelsTr").iterdir())) == 2
    refused = run_cli(*args, "--nnunet", str(nnunet), "--no-masks")
    assert refused.returncode == 2 and "--nnunet write the masks" in refused.stderr


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


def test_ensemble_of_an_unknown_cv_run_is_one_line(tmp_path):
    result = run_cli("ensemble", "--cv", "cv-nope", "--workdir", str(tmp_path), "--name", "ens")
    assert error_lines(result) == [f"error: no trained CV run 'cv-nope' in {tmp_path / 'runs'} (no config.yaml and "
                                   f"folds.csv in {tmp_path / 'runs' / 'cv-nope'})"]  # fmt: skip


def test_version_and_missing_data_folder_are_one_line(tmp_path):
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("lumbar_ray ")
    commands = (("report",), ("baseline",), ("predict", f"workdir={tmp_path}"), ("preprocess", f"workdir={tmp_path}"))
    for command in commands:
        missing = run_cli(command[0], "--data", str(tmp_path / "nowhere"), *command[1:])
        assert error_lines(missing) == [f"error: data folder not found: {tmp_path / 'nowhere'}"], command


def test_segment_refuses_a_source_it_cannot_train_from_before_writing_anything(tmp_path):
    spider = run_cli("segment", f"workdir={tmp_path}", "segment.source=spider", f"segment.spider_dir={tmp_path}")
    assert error_lines(spider) == [f"error: {tmp_path} is not a SPIDER folder: it needs images/ and masks/"]
    no_masks = run_cli("segment", f"workdir={tmp_path}")
    assert error_lines(no_masks) == ["error: segment.source=masks on the built-in synthetic data needs its masks: set "
                                     "synth.masks=true (or segment.source=points)"]  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # refused before the dataset was written or cached


def test_options_sit_between_the_config_file_and_key_value_overrides(tmp_path):
    """Precedence: config file < command option < key=value; a conflict is logged, never silent."""
    config = tmp_path / "cfg.yaml"
    config.write_text("synth:\n  train_studies: 2\n  test_studies: 1\n  image_sizes: [64]\n")
    from_file = run_cli("synth", "--out", str(tmp_path / "a"), "--config", str(config))
    assert from_file.returncode == 0, from_file.stderr
    assert "of 2+1 studies" in from_file.stdout  # the file's value: no option default overrides it silently
    option = run_cli("synth", "--out", str(tmp_path / "b"), "--config", str(config), "--studies", "3")
    assert "of 3+1 studies" in option.stdout and "synth.train_studies=3 (the config file had 2)" in option.stderr
    both = run_cli("synth", "--out", str(tmp_path / "c"), "--config", str(config), "--studies", "3",
                   "synth.train_studies=4")  # fmt: skip
    assert "of 4+1 studies" in both.stdout and "the key=value argument wins" in both.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_registry_user_errors_are_one_line(trained_pipeline, tmp_path, capsys):
    """The mistakes a registry user makes first: an unknown model, alias, version or study id. In-process (the
    console entry point itself): the shared pipeline's store is already open, a subprocess would re-import it all."""
    from lumbar_ray.cli import main

    cfg, result = trained_pipeline
    common = ["predict", f"workdir={tmp_path}", f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
              "predict.split=train", f"predict.data={result.data_root}"]  # fmt: skip

    def error_of(*extra: str) -> list[str]:
        with pytest.raises(SystemExit) as exited:
            main([*common, *extra])
        stderr = capsys.readouterr().err
        assert exited.value.code == 2 and "Traceback" not in stderr
        return [line for line in stderr.splitlines() if line.startswith("error:")]

    cases = {
        "models:/no_such_model@champion": "no registered model named 'no_such_model'",
        "models:/pipeline_ensemble@no_such_alias": "registered model 'pipeline_ensemble' has no alias 'no_such_alias'",
        "models:/pipeline_ensemble/99": "registered model 'pipeline_ensemble' has no version '99'",
    }
    for model, message in cases.items():
        lines = error_of(f"predict.model={model}")
        assert len(lines) == 1 and lines[0].startswith(f"error: {model}: {message}"), lines
    unknown = error_of("predict.model=models:/pipeline_ensemble@champion", "predict.study_ids=[424242]")
    assert unknown == ["error: studies [424242] are not in the train split of the data"]
