"""Cache metadata helpers: a slice's stack, the stack's slice spacing, and the block of slices it belongs to."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.data.conftest import stacked_meta


def test_blocks_split_a_stack_at_its_gaps_and_never_cross_stacks():
    # Stack 0: two untilted per-level blocks 32 mm apart at 4 mm spacing; stack 1: a tilted block.
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0, 40.0, 44.0, 48.0]), (10.0, [0.0, 4.0, 8.0])])
    assert [meta.stack_bounds(index) for index in (0, 5, 6, 8)] == [(0, 6), (0, 6), (6, 9), (6, 9)]
    assert [meta.block_bounds(index) for index in range(9)] == [(0, 3)] * 3 + [(3, 6)] * 3 + [(6, 9)] * 3
    one_missing_slice = stacked_meta([(0.0, [0.0, 4.0, 12.0, 16.0])])  # an 8 mm gap: still one block
    assert {one_missing_slice.block_bounds(index) for index in range(4)} == {(0, 4)}


def test_stack_spacing_is_the_median_gap_else_the_dicom_tags():
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0, 40.0, 44.0, 48.0]), (10.0, [0.0])])
    assert meta.stack_spacing(2) == pytest.approx(4.0)  # the 32 mm gap between blocks is not a spacing
    assert meta.stack_spacing(6) is None  # one slice, no tag
    tagged = replace(meta, dicom={"SliceThickness": 3.5, "SpacingBetweenSlices": 4.4})
    assert tagged.stack_spacing(6) == pytest.approx(4.4)
    assert replace(meta, dicom={"SliceThickness": "3.5"}).stack_spacing(6) == pytest.approx(3.5)
    assert replace(meta, dicom={"SliceThickness": 0}).stack_spacing(6) is None
    assert replace(meta, stacks=()).stack_bounds(3) == (0, 7)  # no stack recorded: the whole volume


def test_without_positions_along_the_normal_the_block_is_the_whole_stack():
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0, 40.0, 44.0, 48.0])])
    unpositioned = replace(meta, slices=replace(meta.slices, position_along_normal=(float("nan"),) * 6))
    assert unpositioned.block_bounds(0) == (0, 6) and unpositioned.stack_spacing(0) is None
