"""`_numerics` against the formula computed independently, group by group (conftest.reference_qdq)."""

from __future__ import annotations

import pytest
import torch
from conftest import FP8_MAX, reference_qdq
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8ctx import _numerics
from fp8ctx._layout import FP8Layout

GRANULARITIES = ["tensor", "channel", "block"]
STORAGE = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
SHAPES = [
    pytest.param((64, 48), 0, id="linear"),
    pytest.param((37, 29), 0, id="linear-ragged"),
    pytest.param((12, 5, 3, 3), 0, id="conv2d"),
    pytest.param((6, 4, 3, 3, 3), 0, id="conv3d"),
    pytest.param((5, 7, 4, 4), 1, id="convtranspose2d-axis1"),
]


def qdq(weight, granularity, block_size, storage, axis):
    layout = FP8Layout(granularity, block_size, axis, storage)
    scale = _numerics.compute_scale(weight, layout)
    data = _numerics.quantize(weight, scale, layout)
    return data, scale, _numerics.dequantize(data, scale, layout, weight.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_matches_formula_bit_for_bit(granularity, storage, shape, axis, dtype, device):
    weight = (torch.randn(shape, device=device) * 0.05).to(dtype)
    data, scale, restored = qdq(weight, granularity, 16, storage, axis)
    assert data.dtype == storage and data.shape == weight.shape
    assert scale.dtype == torch.float32
    assert scale.shape == FP8Layout(granularity, 16, axis).scale_shape(weight.shape)
    assert restored.dtype == dtype
    # the formula on the same device: CPU and CUDA may round a float32 division differently in the last bit
    expected = reference_qdq(weight, granularity, 16, storage, axis)
    assert torch.equal(restored, expected)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_scale_is_amax_over_fp8_max_and_dequantize_multiplies(granularity):
    weight = torch.zeros(4, 8)
    weight[1, 2] = -3.5
    layout = FP8Layout(granularity, 4)
    scale = _numerics.compute_scale(weight, layout)
    group_of_element = {"tensor": (), "channel": (1,), "block": (0, 0)}[granularity]
    assert scale[group_of_element].item() == pytest.approx(3.5 / 448)
    data = _numerics.quantize(weight, scale, layout)
    assert data.float()[1, 2].item() == -448.0  # the amax element lands on the format's max


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_all_zero_groups_give_exact_zeros_not_nan(granularity, storage):
    weight = torch.randn(8, 8)
    weight[:4] = 0  # a zero channel and two zero 4x4 tiles
    _, scale, restored = qdq(weight, granularity, 4, storage, 0)
    assert torch.isfinite(scale).all()
    assert torch.equal(restored[:4], torch.zeros(4, 8))
    _, _, zeros = qdq(torch.zeros(3, 5), granularity, 4, storage, 0)
    assert torch.equal(zeros, torch.zeros(3, 5))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_groups_too_small_for_a_float32_scale_give_zeros_not_nan(granularity):
    weight = torch.randn(8, 8)
    weight[:4] = torch.randn(4, 8) * 1e-44  # float32 subnormals: amax / 448 underflows to zero
    assert (weight[:4] != 0).any()
    _, scale, restored = qdq(weight, granularity, 4, torch.float8_e4m3fn, 0)
    assert torch.isfinite(scale).all() and torch.isfinite(restored).all()
    assert restored[:4].abs().max() <= weight[:4].abs().max()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nan_and_inf_show_up_in_the_scale(granularity):
    for bad in (float("nan"), float("inf")):
        weight = torch.randn(6, 6)
        weight[2, 3] = bad
        scale = _numerics.compute_scale(weight, FP8Layout(granularity, 4))
        assert not torch.isfinite(scale).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dequantize_rows_equals_dequantize_then_gather(granularity, device):
    table = torch.randn(50, 20, device=device, dtype=torch.bfloat16)
    data, scale, dense = qdq(table, granularity, 8, torch.float8_e4m3fn, 0)
    indices = torch.tensor([[3, 49, 0], [8, 8, 17]], device=device)
    rows = _numerics.dequantize_rows(data, scale, indices, FP8Layout(granularity, 8), torch.bfloat16)
    assert torch.equal(rows, dense[indices])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    block=st.integers(1, 17),
    granularity=st.sampled_from(GRANULARITIES),
    magnitude=st.floats(1e-6, 1e4),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_magnitude_round_trips_within_fp8_precision(rows, cols, block, granularity, magnitude, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * magnitude
    data, scale, restored = qdq(weight, granularity, block, torch.float8_e4m3fn, 0)
    assert torch.equal(restored, reference_qdq(weight, granularity, block))
    assert data.float().abs().max() <= FP8_MAX[torch.float8_e4m3fn]
    # e4m3 keeps 3 mantissa bits: each value moves by at most 1/16 of itself, or one subnormal step
    bound = weight.abs() / 16 + scale.max() * 2.0**-9
    assert ((restored - weight).abs() <= bound * 1.0001).all()


def test_scale_from_amax_is_amax_over_max_with_one_for_zero():
    amax = torch.tensor([448.0, 3.5, 0.0, 1e-44, float("inf"), float("nan")])
    scale = _numerics.scale_from_amax(amax, 448.0)
    assert torch.equal(scale[:2], amax[:2] / 448.0)  # bit for bit
    assert scale[2] == 1 and scale[3] == 1  # an all-zero group; a group whose amax / max underflows float32
    assert scale[4] == float("inf") and scale[5].isnan()  # kept, so a NaN/Inf weight can be refused


@pytest.mark.parametrize("shape,axis", [((3, 5), 0), ((300, 7), 0), ((4, 2, 3, 3), 1), ((40,), 0)])
def test_block_larger_than_the_weight_is_one_tile_of_its_size(shape, axis):
    # padding the tile to block_size x block_size would take 2**40 float32 values here: it must not happen
    block = 2**20
    weight = torch.randn(shape, dtype=torch.bfloat16)
    data, scale, restored = qdq(weight, "block", block, torch.float8_e4m3fn, axis)
    assert torch.equal(restored, reference_qdq(weight, "block", block, torch.float8_e4m3fn, axis))
    # one tile: the whole weight, so the same scale as "tensor" granularity
    assert scale.shape == (1, 1)
    assert torch.equal(scale.reshape(()), _numerics.compute_scale(weight, FP8Layout("tensor")))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(
    "shape,axis",
    [((0, 16), 0), ((0, 4, 3, 3), 0), ((3, 0, 2, 2), 1), ((16, 0), 0), ((0, 0), 0)],
    ids=["linear-0-out", "conv-0-out", "convT-0-out", "linear-0-in", "empty"],
)
def test_weights_without_channels_or_inputs_round_trip(shape, axis, granularity):
    weight = torch.empty(shape, dtype=torch.bfloat16)
    data, scale, restored = qdq(weight, granularity, 4, torch.float8_e4m3fn, axis)
    assert data.shape == shape and data.dtype == torch.float8_e4m3fn
    assert scale.shape == FP8Layout(granularity, 4, axis).scale_shape(shape) and scale.dtype == torch.float32
    assert restored.shape == shape and restored.dtype == torch.bfloat16


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rows,cols,indices", [(0, 6, []), (5, 0, [1, 4]), (5, 6, [])], ids=["no-rows", "no-cols", "no-lookups"])
def test_dequantize_rows_of_empty_tables_and_lookups(rows, cols, indices, granularity):
    data, scale, dense = qdq(torch.randn(rows, cols), granularity, 4, torch.float8_e4m3fn, 0)
    looked_up = torch.tensor(indices, dtype=torch.long)
    out = _numerics.dequantize_rows(data, scale, looked_up, FP8Layout(granularity, 4), torch.float32)
    assert out.shape == (len(indices), cols) and torch.equal(out, dense[looked_up])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dequantize_rows_refuses_an_index_outside_the_table(granularity):
    table = torch.randn(10, 6)
    data, scale, _ = qdq(table, granularity, 4, torch.float8_e4m3fn, 0)
    with pytest.raises(IndexError):
        _numerics.dequantize_rows(data, scale, torch.tensor([10]), FP8Layout(granularity, 4), torch.float32)


@pytest.mark.parametrize("axis", [1, 2], ids=["out-in", "in-out"])
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_batched_weights_are_quantized_matrix_by_matrix(granularity, storage, axis, device):
    weight = torch.randn(5, 24, 40, device=device) * torch.logspace(-3, 1, 5, device=device).view(5, 1, 1)
    layout = FP8Layout(granularity, 16, axis, storage, batch_dims=1)
    scale = _numerics.compute_scale(weight, layout)
    restored = _numerics.dequantize(_numerics.quantize(weight, scale, layout), scale, layout, weight.dtype)
    assert scale.shape == layout.scale_shape(weight.shape) and scale.shape[0] == 5
    # each expert on its own, by the formula: its scales are its own whatever the others' magnitudes
    for e in range(5):
        assert torch.equal(restored[e], reference_qdq(weight[e], granularity, 16, storage, axis - 1))
