"""The U-Net adapter without Ray: its shapes, the 2.5D input at the volume's edges, predictions on the cache grid,
the self-describing ``unet.pt`` and MONAI's Dice per structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumbar_ray.config import SegmentConfig
from lumbar_ray.segment.data import POINT_CLASSES, classes_for
from lumbar_ray.segment.labels import SEMANTIC_CLASSES
from lumbar_ray.segment.unet import (
    build_unet,
    dice_by_name,
    dice_score,
    load_unet,
    predict_samples,
    predict_volume,
    read_unet_meta,
    save_unet,
    series_dice,
    slab_inputs,
    unet_meta,
)


@pytest.mark.parametrize(("channels", "strides", "size"), [((8, 16, 32), None, 64), ((4, 8, 16, 32), (2, 2, 1), 48)])
def test_the_unet_maps_in_slices_channels_to_class_logits_at_its_input_size(channels, strides, size):
    cfg = SegmentConfig(channels=channels, strides=strides, image_size=size, in_slices=5)
    torch.manual_seed(0)
    model = build_unet(cfg, len(POINT_CLASSES))
    out = model(torch.rand(2, 5, size, size))
    assert out.shape == (2, 11, size, size)
    assert cfg.unet_strides == (strides or (2,) * (len(channels) - 1))
    with pytest.raises(RuntimeError):  # the input channels are the slab's slices
        model(torch.rand(1, 3, size, size))


def test_a_slab_is_the_slice_and_its_neighbours_clamped_at_the_edges_in_zero_to_one():
    volume = np.stack([np.full((40, 40), 50 * i, np.uint8) for i in range(5)])  # slice i is 50 * i everywhere
    first = slab_inputs(volume, 0, 3, 32)
    assert first.shape == (3, 32, 32) and first.dtype == np.float32
    np.testing.assert_allclose(first[:, 0, 0], [0.0, 0.0, 50 / 255])
    np.testing.assert_allclose(slab_inputs(volume, 4, 5, 16)[:, 3, 3], np.array([2, 3, 4, 4, 4]) * 50 / 255)
    np.testing.assert_allclose(slab_inputs(volume, 2, 1, 40)[0], volume[2] / 255)  # same size: unchanged
    assert slab_inputs(np.full((1, 8, 8), 255, np.uint8), 0, 3, 8).max() == 1.0


def test_predicted_volumes_are_probabilities_on_the_cache_grid_whatever_the_batch():
    cfg = SegmentConfig(image_size=32, channels=(4, 8), strides=(2,))
    torch.manual_seed(1)
    model = build_unet(cfg, 6)
    volume = np.random.default_rng(0).integers(0, 255, (7, 48, 48), dtype=np.uint8)
    probs = predict_volume(model, volume, cfg, batch=3)
    assert probs.shape == (7, 6, 48, 48) and probs.dtype == np.float32 and probs.min() >= 0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predict_volume(model, volume, cfg, batch=32), probs, atol=1e-6)
    slabs = np.stack([np.round(slab_inputs(volume, i, 3, 32) * 255).astype(np.uint8) for i in range(7)])
    at_input = predict_samples(model, slabs)
    assert at_input.shape == (7, 32, 32) and at_input.dtype == np.uint8
    same_grid = predict_volume(model, volume[:, :32, :32].copy(), cfg)  # no resize: the argmax of the same logits
    np.testing.assert_array_equal(same_grid.argmax(axis=1), predict_samples(model, np.stack(
        [np.round(slab_inputs(volume[:, :32, :32], i, 3, 32) * 255).astype(np.uint8) for i in range(7)])))  # fmt: skip


def test_unet_pt_describes_itself_and_loads_with_weights_only(tmp_path):
    cfg = SegmentConfig(source="points", image_size=32, channels=(4, 8), strides=(2,))
    torch.manual_seed(2)
    model = build_unet(cfg, len(classes_for("points")))
    path = save_unet(tmp_path / "seg" / "unet.pt", model, unet_meta(cfg, {"heldout_dice": {"canal_l1_l2": 0.7}}))
    assert [p.name for p in path.parent.iterdir()] == ["unet.pt"]  # written atomically: no partial file beside it
    torch.load(path, weights_only=True)  # plain tensors and JSON-like values: no pickled code
    loaded = load_unet(path)
    assert loaded.config == cfg and loaded.classes == POINT_CLASSES and loaded.source == "points"
    assert loaded.trained == {"heldout_dice": {"canal_l1_l2": 0.7}} and not loaded.model.training
    volume = np.random.default_rng(1).integers(0, 255, (3, 40, 40), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.predict_volume(volume), predict_volume(model, volume, cfg))
    meta = read_unet_meta(path)
    assert "state_dict" not in meta and meta["classes"] == list(POINT_CLASSES) and meta["config"]["source"] == "points"
    with pytest.raises(ValueError, match="lacks"):
        save_unet(tmp_path / "bad.pt", model, {"config": {}})


def test_dice_per_structure_counts_each_series_as_one_volume_and_skips_absent_classes():
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[0, :4, :4] = 1  # 16 pixels of class 1 on slice 0
    truth[1, 6:, 6:] = 2
    predicted = truth.copy()
    predicted[0, :4, 2:4] = 0  # 8 of them missed
    predicted[1, 0, 0] = 3  # a false positive of a class absent from the truth: not scored
    dice = series_dice([predicted], [truth], 4)
    np.testing.assert_allclose(dice[:2], [2 * 8 / (16 + 8), 1.0])
    assert np.isnan(dice[2])
    assert dice_by_name(dice, ("background", "a", "b", "c")) == pytest.approx({"a": 2 / 3, "b": 1.0})
    assert dice_score(dice) == pytest.approx(1 - (2 / 3 + 1) / 2)
    both = series_dice([predicted, truth], [truth, truth], 4)  # the mean over the series holding each class
    np.testing.assert_allclose(both[:2], [(2 / 3 + 1) / 2, 1.0])
    assert dice_score(np.full(3, np.nan)) == 1.0 and np.isnan(series_dice([], [], 3)).all()
    assert classes_for("masks") == SEMANTIC_CLASSES == classes_for("spider")
