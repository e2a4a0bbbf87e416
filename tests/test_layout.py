"""`FP8Layout`: the one scheme object — its fields are checked, its scale shapes match the numerics, and what
it writes for a file reads back (or is refused naming the field)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fp8ctx import FP8Error, FP8Layout
from fp8ctx._layout import Granularity

GOOD = {"granularity": "block", "block_size": 64, "channel_axis": 1, "storage_dtype": "e5m2"}


def test_fields_are_normalised_from_their_spellings():
    layout = FP8Layout("channel", 32, 1, "e5m2")
    assert layout.granularity is Granularity.CHANNEL and layout.storage_dtype == torch.float8_e5m2
    assert layout == FP8Layout(Granularity.CHANNEL, 32, 1, torch.float8_e5m2)
    assert layout.granularity == "channel" and str(layout.granularity) == "channel"  # a str enum
    assert FP8Layout().fp8_max == 448.0 and layout.fp8_max == 57344.0
    assert hash(layout) == hash(FP8Layout("channel", 32, 1, torch.float8_e5m2))  # torch.compile keys on it


def test_each_granularity_has_its_own_kernel_code():
    codes = [granularity.kernel_code for granularity in Granularity]
    assert sorted(codes) == [0, 1, 2]  # the integers the Triton kernels branch on
    assert Granularity.TENSOR.kernel_code == 0 and Granularity.BLOCK.kernel_code == 2


@pytest.mark.parametrize(
    "field,value",
    [
        ("granularity", "row"),
        ("granularity", None),
        ("block_size", 0),
        ("block_size", 1.5),
        ("block_size", True),
        ("channel_axis", -1),
        ("channel_axis", "0"),
        ("storage_dtype", torch.float16),
        ("storage_dtype", "e3m4"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(FP8Error, match=field):
        FP8Layout(**{field: value})
    with pytest.raises(FP8Error, match=field):
        FP8Layout().replace(**{field: value})  # a copy is validated like a new layout


# (shape, channel axis) -> (C, K) of the channel-first view, worked out by hand
MATRIX_SHAPES = [
    ((12, 20), 0, (12, 20)),
    ((8, 3, 3, 3), 0, (8, 27)),
    ((6, 10, 3, 3), 1, (10, 54)),  # ConvTranspose2d(6, 10, 3): output channels in dim 1
    ((0, 16), 0, (0, 16)),  # Linear(16, 0): no output channels
    ((3, 0, 2, 2), 1, (0, 12)),  # ConvTranspose2d(3, 0, 2)
    ((16, 0), 0, (16, 0)),  # Linear(0, 16): no inputs
    ((5,), 0, (5, 1)),
    ((), 0, (1, 1)),
]


@pytest.mark.parametrize("shape,axis,expected", MATRIX_SHAPES, ids=[str(case[:2]) for case in MATRIX_SHAPES])
def test_scale_shape_is_one_per_group_of_the_channel_first_view(shape, axis, expected):
    channels, inner = expected
    assert FP8Layout(channel_axis=axis).matrix_shape(shape) == expected
    assert FP8Layout("tensor", channel_axis=axis).scale_shape(shape) == ()
    assert FP8Layout("channel", channel_axis=axis).scale_shape(shape) == (channels,)
    assert FP8Layout("block", 4, axis).scale_shape(shape) == (math.ceil(channels / 4), math.ceil(inner / 4))


def test_to_dict_is_json_and_from_dict_reads_it_back():
    for layout in (FP8Layout(), FP8Layout("block", 64, 1, torch.float8_e5m2), FP8Layout("channel")):
        fields = json.loads(json.dumps(layout.to_dict()))
        assert FP8Layout.from_dict(fields) == layout
    assert FP8Layout.from_dict(GOOD) == FP8Layout("block", 64, 1, torch.float8_e5m2)


@pytest.mark.parametrize(
    "fields,named",
    [
        ({**GOOD, "granularity": "rows"}, "granularity"),
        ({**GOOD, "block_size": -3}, "block_size"),
        ({**GOOD, "block_size": 64.0}, "block_size"),  # JSON numbers can be floats
        ({**GOOD, "channel_axis": None}, "channel_axis"),
        ({**GOOD, "storage_dtype": "float16"}, "storage_dtype"),
        ({k: v for k, v in GOOD.items() if k != "block_size"}, "missing.*block_size"),
        ({**GOOD, "dtype": "bfloat16"}, "unknown.*dtype"),
        ([1, 2, 3], "mapping"),
        ("block", "mapping"),
    ],
    ids=["granularity", "block_size", "float-block_size", "channel_axis", "storage_dtype", "missing", "unknown", "list", "str"],
)
def test_from_dict_refuses_any_bad_field_naming_it_and_where(fields, named):
    with pytest.raises(FP8Error, match=f"layout of 'fc.weight'.*{named}"):
        FP8Layout.from_dict(fields, "layout of 'fc.weight'")


# -- batch dims: one set of scale groups per expert ------------------------------------------------------


@pytest.mark.parametrize(
    "fields,named",
    [({"batch_dims": -1}, "batch_dims"), ({"batch_dims": True}, "batch_dims"), ({"batch_dims": 1}, "channel_axis")],
)
def test_batch_dims_are_checked_and_the_channel_axis_lies_past_them(fields, named):
    with pytest.raises(FP8Error, match=named):
        FP8Layout(**fields)  # channel_axis 0 would be the expert axis


@pytest.mark.parametrize(
    "granularity,axis,expected",
    [("tensor", 1, (4,)), ("channel", 1, (4, 20)), ("channel", 2, (4, 12)), ("block", 1, (4, 3, 2)), ("block", 2, (4, 2, 3))],
)
def test_a_batched_weight_has_each_matrix_scales_behind_the_batch_dims(granularity, axis, expected):
    layout = FP8Layout(granularity, 8, axis, batch_dims=1)
    shape = (4, 20, 12)  # 4 experts of (20, 12); axis 2: each expert stored (in=20, out=12)
    assert layout.scale_shape(shape) == expected
    assert layout.batch_shape(shape) == (4,)
    assert layout.matrix().scale_shape(shape[1:]) == expected[1:]
    assert layout.matrix() == FP8Layout(granularity, 8, axis - 1)


def test_files_written_before_batch_dims_read_as_zero():
    assert FP8Layout.from_dict(GOOD) == FP8Layout.from_dict({**GOOD, "batch_dims": 0})
    assert FP8Layout.from_dict(FP8Layout("channel", channel_axis=2, batch_dims=1).to_dict()).batch_dims == 1
