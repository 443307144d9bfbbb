"""``train.cv.build_trainer``, the one TorchTrainer builder, without fitting (the fits are test_cv's and the
segmentation stage's): the classifier's trainer as it was, and another loop through the same settings."""

from __future__ import annotations

from lumbar_ray.config import Config
from lumbar_ray.train.cv import build_trainer
from lumbar_ray.train.worker import SCORE_ATTRIBUTE, train_fold_loop


def _settings(trainer) -> tuple:
    run = trainer.run_config
    return (trainer.scaling_config, run.name, run.storage_path, run.checkpoint_config, run.failure_config.max_failures)


def test_the_classifier_and_the_segmentation_loop_get_the_same_workers_storage_and_checkpoints(tmp_path):
    from lumbar_ray.segment.worker import train_segment_loop

    cfg = Config.model_validate({"workdir": str(tmp_path), "train": {"num_workers": 3, "cpus_per_worker": 2.0,
                                 "resources": {"big": 1.0}, "max_failures": 4}})  # fmt: skip
    classifier = build_trainer(cfg, "a fold job", "cv-x-fold0")
    assert classifier.train_loop_per_worker is train_fold_loop
    assert classifier.train_loop_config == {"cfg": cfg.model_dump(mode="json"), "job": "a fold job"}
    scaling, name, storage, checkpoints, failures = _settings(classifier)
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == (3, False, {"CPU": 2.0, "big": 1.0})
    assert (name, storage, failures) == ("cv-x-fold0", str(tmp_path / "ray_results"), 4)
    assert (checkpoints.num_to_keep, checkpoints.checkpoint_score_attribute, checkpoints.checkpoint_score_order) == (
        1, SCORE_ATTRIBUTE, "min")  # fmt: skip
    segmenter = build_trainer(cfg, "a segment job", "cv-x-fold0", loop=train_segment_loop, loop_config={"extra": 1})
    assert segmenter.train_loop_per_worker is train_segment_loop
    assert segmenter.train_loop_config == {"cfg": cfg.model_dump(mode="json"), "job": "a segment job", "extra": 1}
    assert _settings(segmenter) == _settings(classifier)
    gpu = Config.model_validate({"workdir": str(tmp_path), "train": {"use_gpu": True}})
    assert build_trainer(gpu, None, "n").scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 1}
