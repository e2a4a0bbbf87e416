"""What torch functions and aten ops do with an `FP8Tensor`: plain dequantized results, refused writes, FP8 aliases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_qdq
from test_tensor import entry
from torch import nn

import fp8ctx
import fp8ctx._readonly
from fp8ctx import FP8Error, FP8Tensor, fp8_weights


# -- reading it gives plain, dequantized tensors ---------------------------------------------------------

def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A view that torch.equal can compare for every dtype (FP8 included), bit for bit."""
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor


VIEW_OPS = {"T", "index", "view"}  # views of the temporary dense copy: a read-only tensor type where fp8ctx has one
DENSE_VIEW_TYPES = (torch.Tensor, fp8ctx._readonly.ReadOnlyView)

OPS = {
    "add": lambda w: w + 1,
    "T": lambda w: w.T,
    "sum": lambda w: w.sum(),
    "matmul": lambda w: torch.matmul(w, torch.linspace(-1, 1, w.shape[1], dtype=w.dtype)),
    "clone": lambda w: w.clone(),
    "index": lambda w: w[1:3],
    "view": lambda w: w.view(-1),
    "relu": lambda w: F.relu(w),
    "cat": lambda w: torch.cat([w, w]),
    "mul-scalar": lambda w: 2 * w,
    "to-int32": lambda w: w.to(torch.int32),  # not a float dtype: dense values
    "to-float8": lambda w: w.to(torch.float8_e5m2),  # an FP8 dtype: dense values cast, not the stored codes
    "to-float8-fnuz": lambda w: w.to(torch.float8_e4m3fnuz),  # torch counts it as floating point; still dense
    "to-float8-e8m0": lambda w: w.to(torch.float8_e8m0fnu),
}


# dtypes newer than the oldest torch fp8ctx supports: there the plain tensor has no such conversion either
NEWER_DTYPES = {"to-float8-e8m0": "float8_e8m0fnu"}


def op_params() -> list:
    return [
        pytest.param(op, marks=pytest.mark.skipif(
            not hasattr(torch, NEWER_DTYPES[op]), reason=f"torch {torch.__version__} has no torch.{NEWER_DTYPES[op]}"
        )) if op in NEWER_DTYPES else op
        for op in OPS
    ]


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("op", op_params())
def test_any_op_returns_a_plain_tensor_with_dequantized_values(op, dtype):
    w, original, _ = entry("linear", dtype, granularity="channel")
    dense = reference_qdq(original, "channel")
    out = OPS[op](w)
    assert type(out) in DENSE_VIEW_TYPES if op in VIEW_OPS else type(out) is torch.Tensor, type(out)
    assert not isinstance(out, FP8Tensor)
    expected = OPS[op](dense)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert torch.equal(bits(out), bits(expected))


# float conversions keep FP8 storage (_tensor_dispatch._moved): the codes stay, the reported dtype/device change
CONVERSIONS = {
    "to-float32": (lambda w: w.to(torch.float32), torch.float32),
    "float": (lambda w: w.float(), torch.float32),
    "half": (lambda w: w.half(), torch.float16),
    "double": (lambda w: w.double(), torch.float64),
    "to-device-dtype": (lambda w: w.to("cpu", torch.float16), torch.float16),
    "cpu": (lambda w: w.cpu(), None),
    "to-same-dtype": (lambda w: w.to(w.dtype), None),
}


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("op", list(CONVERSIONS))
def test_float_conversions_keep_fp8_storage_and_give_converted_dequantized_values(op, dtype):
    w, original, _ = entry("linear", dtype, granularity="channel")
    convert, wanted = CONVERSIONS[op]
    wanted = wanted or dtype
    dense = reference_qdq(original, "channel")  # rounded to the original dtype, then converted
    out = convert(w)
    assert type(out) is FP8Tensor and out.dtype == wanted and out.shape == w.shape and out.device == w.device
    assert out.qdata.data_ptr() == w.qdata.data_ptr()  # no copy, no dense weight made
    assert torch.equal(out.dequantize(), dense.to(wanted))
    assert type(out * 1) is torch.Tensor and torch.equal(out * 1, dense.to(wanted))
    assert torch.equal(torch.tensor(out.tolist(), dtype=wanted), dense.to(wanted))
    if wanted != torch.bfloat16:  # NumPy has no bfloat16
        assert torch.equal(torch.from_numpy(out.numpy()), dense.to(wanted))
    with pytest.raises(FP8Error, match="'weight'"):
        with torch.no_grad():
            out.add_(1.0)


def test_reading_a_weight_does_not_expose_fp8_codes_inside_the_context():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12).bfloat16()
    dense = reference_qdq(layer.weight, "block", 8)
    with fp8_weights(layer, granularity="block", block_size=8):
        out = layer.weight @ torch.eye(20, dtype=torch.bfloat16)
        assert type(out) is torch.Tensor and torch.equal(out, dense)
        assert torch.equal(layer.weight.detach().to(torch.float32), dense.float())


# -- writes are refused -----------------------------------------------------------------------------------

WRITES = {
    "add_": lambda w: w.add_(1.0),
    "mul_": lambda w: w.mul_(0.5),
    "zero_": lambda w: w.zero_(),
    "fill_": lambda w: w.fill_(3.0),
    "clamp_": lambda w: w.clamp_(-0.1, 0.1),
    "copy_": lambda w: w.copy_(torch.zeros(w.shape, dtype=w.dtype)),
    "init.normal_": lambda w: nn.init.normal_(w),
    "data.copy_": lambda w: w.data.copy_(torch.zeros(w.shape, dtype=w.dtype)),
    "detach().add_": lambda w: w.detach().add_(1.0),
    "out=": lambda w: torch.mul(torch.ones(w.shape, dtype=w.dtype), 2.0, out=w),
    "iadd": lambda w: w.__iadd__(1.0),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_in_place_writes_raise_naming_the_parameter(write):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 6))).bfloat16()
    expected = reference_qdq(model[1][0].weight)
    with fp8_weights(model):
        w = model[1][0].weight
        with torch.no_grad():
            with pytest.raises(FP8Error, match=r"'1\.0\.weight'"):
                WRITES[write](w)
        assert torch.equal(w.dequantize(), expected)  # nothing was written


VIEW_WRITES = {
    "setitem": lambda w: w.__setitem__(0, 1.0),
    "view().add_": lambda w: w.view(-1).add_(1.0),
    "T.zero_": lambda w: w.T.zero_(),
    "data[0,0]=": lambda w: w.data.__setitem__((0, 0), 5.0),
    "T[0].mul_": lambda w: w.T[0].mul_(2.0),
    "view().view().add_": lambda w: w.view(-1).view(2, -1).add_(1.0),
    "split()[0].zero_": lambda w: w.split(2)[0].zero_(),
    "unbind()[1].fill_": lambda w: w.unbind(0)[1].fill_(3.0),
    "chunk()[0][0]=": lambda w: w.chunk(3)[0].__setitem__(0, 1.0),
    "data=": lambda w: setattr(w, "data", torch.zeros(w.shape, dtype=w.dtype)),
}


# found at 876d2e6: such writes landed in a temporary dense copy and were silently lost (the view op was
# dispatched first and returned a plain tensor, so _refuse_writes never saw the FP8Tensor); views now raise
@pytest.mark.parametrize("write", list(VIEW_WRITES))
def test_writes_through_views_raise_instead_of_being_lost(write):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6)).bfloat16()
    expected = reference_qdq(model[0].weight)
    with fp8_weights(model):
        w = model[0].weight
        with torch.no_grad():
            try:
                VIEW_WRITES[write](w)
            except FP8Error as error:
                assert "0.weight" in str(error)
            else:
                changed = not torch.equal(w.dequantize(), expected)
                pytest.fail(f"the write neither raised nor {'reached' if changed else 'changed'} the weight")


def test_split_unbind_and_chunk_give_the_dequantized_pieces():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6)).bfloat16()
    expected = reference_qdq(model[0].weight)
    with fp8_weights(model):
        w = model[0].weight
        for pieces, reference in ((w.split(2), expected.split(2)), (w.unbind(0), expected.unbind(0)), (w.chunk(3), expected.chunk(3))):
            assert all(torch.equal(piece, ref) for piece, ref in zip(pieces, reference, strict=True))


def test_a_converted_copy_says_how_to_get_a_writable_one():
    model = nn.Sequential(nn.Linear(4, 6)).bfloat16()
    with fp8_weights(model):
        copy = model[0].weight.float()  # still FP8 storage: module.float() inside the block relies on it
        with pytest.raises(FP8Error, match=r"dequantize\(\) or weight\.clone\(\)"):
            copy.mul_(2)
        writable = model[0].weight.clone()
        writable.mul_(2)  # a dense copy is the user's own


# -- aliases keep the FP8 form ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias",
    [
        pytest.param(lambda w: w.detach(), id="detach"),
        pytest.param(lambda w: nn.Parameter(w, requires_grad=False), id="Parameter"),
        pytest.param(lambda w: w.data, id="data"),
    ],
)
def test_detach_and_parameter_give_an_fp8_tensor_sharing_qdata(alias):
    w, original, _ = entry("conv2d-groups", torch.float16, granularity="block", block_size=4)
    other = alias(w)
    assert type(other) is FP8Tensor and other is not w
    assert other.qdata.data_ptr() == w.qdata.data_ptr() and other.scale.data_ptr() == w.scale.data_ptr()
    assert other.fp8_layout == w.fp8_layout and other.param_name == w.param_name
    assert (other.dtype, other.shape, other.device) == (w.dtype, w.shape, w.device)
    assert torch.equal(other.dequantize(), reference_qdq(original, "block", 4))


def test_a_strided_view_of_the_whole_weight_stays_fp8_and_any_other_is_a_read_only_dense_view():
    # FSDP2 makes its all-gathered parameter with torch.as_strided(gathered, size, contiguous stride, 0)
    weight = FP8Tensor.from_dense(torch.randn(6, 8), fp8ctx.FP8Layout("channel"), name="w")
    whole = torch.as_strided(weight, (6, 8), (8, 1), 0)
    assert type(whole) is FP8Tensor and whole.qdata is weight.qdata and whole.scale is weight.scale
    part = torch.as_strided(weight, (3, 8), (8, 1), 0)
    assert type(part) is not FP8Tensor and torch.equal(part, weight.dequantize()[:3])
    with pytest.raises(FP8Error):
        part.add_(1)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_views_of_a_held_convtranspose_weight_follow_its_shape(granularity):
    # ConvTranspose scales sit on axis 1: the dequantized weight must still be laid out like the original
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3)).bfloat16()
    expected = reference_qdq(model[0].weight, granularity, 2, channel_axis=1)
    with fp8_weights(model, granularity=granularity, block_size=2):
        flat = model[0].weight.detach().contiguous().reshape(-1)
        assert torch.equal(flat, expected.reshape(-1))
