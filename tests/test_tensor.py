"""`FP8Tensor`: what it reports, what reading it gives, that writes are refused, and torch.compile."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import fake_quantized_copy, reference_qdq, relative_error
from torch import nn

import fp8ctx
import fp8ctx._numerics
import fp8ctx._readonly
import fp8ctx._tensor
import fp8ctx.kernels
from fp8ctx import FP8Error, FP8Store, FP8Tensor, fp8_weights

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]
STORAGE = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
GRANULARITIES = ["tensor", "channel", "block"]
ALL_LAYERS = fp8ctx.DEFAULT_LAYERS + (nn.Embedding,)

# (constructor, channel axis of its weight)
LAYERS = {
    "linear": (lambda: nn.Linear(20, 12), 0),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3), 0),
    "conv2d-groups": (lambda: nn.Conv2d(6, 8, 3, groups=2), 0),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(6, 10, 3), 1),
    "convtranspose1d-groups": (lambda: nn.ConvTranspose1d(6, 4, 2, groups=2), 1),
    "embedding": (lambda: nn.Embedding(30, 7), 0),
}


def entry(kind: str = "linear", dtype=torch.bfloat16, device="cpu", **options) -> tuple[FP8Tensor, torch.Tensor, int]:
    """A store entry for one layer, its original weight (detached copy) and the channel axis."""
    torch.manual_seed(0)
    make, axis = LAYERS[kind]
    layer = make().to(device=device, dtype=dtype)
    store = FP8Store.from_module(layer, layers=ALL_LAYERS, **options)
    return store["weight"], layer.weight.detach().clone(), axis


# -- what it reports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_reports_the_original_dtype_shape_and_device(kind, dtype, device):
    w, original, _ = entry(kind, dtype, device, granularity="channel")
    assert type(w) is FP8Tensor
    assert (w.dtype, w.shape, w.device) == (original.dtype, original.shape, original.device)
    assert w.storage_dtype == torch.float8_e4m3fn and w.qdata.dtype == torch.float8_e4m3fn
    assert w.qdata.shape == original.shape and w.scale.dtype == torch.float32
    assert w.element_size() == original.element_size() and w.numel() == original.numel()
    assert not w.requires_grad and w.param_name == "weight"


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_dequantize_equals_the_reference_bit_for_bit(kind, granularity, storage, dtype, device):
    w, original, axis = entry(kind, dtype, device, granularity=granularity, block_size=4, storage_dtype=storage)
    expected = reference_qdq(original, granularity, 4, storage, axis)  # on the weight's device, as the layer runs
    assert w.dequantize().dtype == dtype and w.dequantize().device == original.device
    assert torch.equal(w.dequantize(), expected)
    # in another dtype: the values every layer computes with (rounded to the original dtype), converted
    assert torch.equal(w.dequantize(torch.float32), expected.float())
    assert relative_error(expected, original) > 1e-3  # FP8 did change the values


@pytest.mark.parametrize(
    "kind,granularity,block_size,expected",
    [
        ("linear", "tensor", 128, 12 * 20 + 4),  # one float32 scale
        ("linear", "channel", 128, 12 * 20 + 12 * 4),  # one per output row
        ("linear", "block", 4, 12 * 20 + 3 * 5 * 4),  # 3 x 5 tiles of 4 x 4
        ("linear", "block", 7, 12 * 20 + 2 * 3 * 4),  # ragged tiles: ceil(12/7) x ceil(20/7)
        ("convtranspose2d", "channel", 128, 6 * 10 * 9 + 10 * 4),  # output channels live in dim 1
        ("convtranspose1d-groups", "channel", 128, 6 * 2 * 2 + 2 * 4),  # dim 1 is out / groups
        ("conv2d-groups", "block", 8, 8 * 3 * 9 + 1 * 4 * 4),  # (8, 27) view: 1 x 4 tiles
        ("embedding", "channel", 128, 30 * 7 + 30 * 4),
    ],
    ids=["linear-tensor", "linear-channel", "linear-block4", "linear-block7", "convT2d-channel", "convT1d-groups-channel", "conv2d-block8", "embedding-channel"],
)
def test_nbytes_is_fp8_codes_plus_scales(kind, granularity, block_size, expected):
    w, original, _ = entry(kind, torch.bfloat16, granularity=granularity, block_size=block_size)
    assert w.nbytes == expected
    assert w.nbytes == w.qdata.numel() * 1 + w.scale.numel() * 4
    assert w.nbytes < original.nbytes


# -- building one from a dense tensor, or from codes and scales ---------------------------------------------


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape,axis", [((12, 20), 0), ((6, 10, 3, 3), 1), ((0, 8), 0), ((3, 0, 2), 1)], ids=["linear", "convT-axis1", "no-channels", "convT-no-channels"])
def test_from_dense_quantizes_one_tensor_without_a_module(shape, axis, granularity, storage, device):
    torch.manual_seed(0)
    weight = torch.randn(shape, device=device, dtype=torch.bfloat16)
    layout = fp8ctx.FP8Layout(granularity, 4, axis, storage)
    w = FP8Tensor.from_dense(weight, layout, name="fc.weight")
    assert type(w) is FP8Tensor and isinstance(w, nn.Parameter) and not w.requires_grad
    assert (w.shape, w.dtype, w.device, w.param_name) == (weight.shape, weight.dtype, weight.device, "fc.weight")
    assert w.fp8_layout == layout and w.storage_dtype == storage and w.qdata.dtype == storage
    assert w.scale.shape == layout.scale_shape(shape)
    assert torch.equal(w.dequantize(), reference_qdq(weight, granularity, 4, storage, axis))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_from_dense_refuses_non_finite_and_non_float_weights_naming_them(granularity, bad):
    weight = torch.randn(8, 8)
    weight[5, 6] = bad
    with pytest.raises(FP8Error, match=r"'fc.weight' contains NaN or Inf.*exclude=\['fc'\]"):
        FP8Tensor.from_dense(weight, fp8ctx.FP8Layout(granularity, 4), name="fc.weight")
    for dtype in (torch.int32, torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        with pytest.raises(FP8Error, match=f"'fc.weight'.*{dtype}"):
            FP8Tensor.from_dense(torch.zeros(4, 4).to(dtype), fp8ctx.FP8Layout(granularity), name="fc.weight")


def test_from_fp8_wraps_codes_and_scales_made_elsewhere():
    w, original, _ = entry("convtranspose2d", torch.float16, granularity="block", block_size=4)
    again = FP8Tensor.from_fp8(w.qdata, w.scale, w.fp8_layout, torch.float16, name="up.weight")
    assert type(again) is FP8Tensor and isinstance(again, nn.Parameter) and again.param_name == "up.weight"
    assert torch.equal(again.dequantize(), reference_qdq(original, "block", 4, channel_axis=1))


def _codes_scales_layout():
    layout = fp8ctx.FP8Layout("channel")
    weight = torch.randn(6, 4)
    w = FP8Tensor.from_dense(weight, layout)
    return w.qdata, w.scale, layout


MISFITS = {
    "codes-dtype": (lambda q, s, l: (q.view(torch.uint8), s, l, torch.float32), "codes must be a torch.float8_e4m3fn"),
    "codes-e5m2": (lambda q, s, l: (q.float().to(torch.float8_e5m2), s, l, torch.float32), "codes must be"),
    "scale-shape": (lambda q, s, l: (q, s[:5], l, torch.float32), r"scales must be float32 of shape \(6,\)"),
    "scale-dtype": (lambda q, s, l: (q, s.double(), l, torch.float32), "scales must be float32"),
    "scale-granularity": (lambda q, s, l: (q, s, l.replace(granularity="tensor"), torch.float32), r"scales must be float32 of shape \(\)"),
    "scale-nan": (lambda q, s, l: (q, torch.full_like(s, float("nan")), l, torch.float32), "positive and finite"),
    "scale-zero": (lambda q, s, l: (q, torch.zeros_like(s), l, torch.float32), "positive and finite"),
    "scale-negative": (lambda q, s, l: (q, -s, l, torch.float32), "positive and finite"),
    "channel-axis": (lambda q, s, l: (q, s, l.replace(channel_axis=2), torch.float32), "channel_axis 2"),
    "dtype-int": (lambda q, s, l: (q, s, l, torch.int64), "original dtype"),
    "dtype-name": (lambda q, s, l: (q, s, l, "float32"), "original dtype"),
    "codes-nan": (lambda q, s, l: (_with_code(q, 0x7F), s, l, torch.float32), "1 of 24 are NaN or Inf"),
    "codes-negative-nan": (lambda q, s, l: (_with_code(q, 0xFF), s, l, torch.float32), "NaN or Inf"),
    "codes-e5m2-inf": (
        lambda q, s, l: (_with_code(q.float().to(torch.float8_e5m2), 0x7C), s, l.replace(storage_dtype="e5m2"), torch.float32),
        "NaN or Inf",
    ),
}


def _with_code(codes, bits):
    """``codes`` with its first element's bits replaced (a NaN/Inf pattern quantizing never writes)."""
    damaged = codes.clone()
    damaged.view(torch.uint8).view(-1)[0] = bits
    return damaged


@pytest.mark.parametrize("misfit", list(MISFITS))
def test_from_fp8_refuses_codes_and_scales_that_do_not_fit_naming_the_weight(misfit):
    make, message = MISFITS[misfit]
    with pytest.raises(FP8Error, match=f"'fc.weight': .*{message}"):
        FP8Tensor.from_fp8(*make(*_codes_scales_layout()), name="fc.weight")


def test_every_meta_field_survives_copies_compile_flattening_and_shows_in_repr():
    from fp8ctx._tensor import FP8Meta

    layout = fp8ctx.FP8Layout("block", 4, 1, torch.float8_e5m2)
    values = dict(fp8_layout=layout, compute_dtype=torch.float16, param_name="up.weight", value_dtype=torch.bfloat16, compute="fp8")
    assert set(values) == {field.name for field in dataclasses.fields(FP8Meta)}  # a new field must be added here
    w = FP8Tensor(*(lambda t: (t.qdata, t.scale))(FP8Tensor.from_dense(torch.randn(6, 10, 3), layout)), FP8Meta(**values))
    inner, context = w.__tensor_flatten__()
    copies = {
        "attributes": w,
        "detach": w.detach(),
        "deepcopy": copy.deepcopy(w),
        "to_device": w.to_device("cpu"),
        "unflatten": FP8Tensor.__tensor_unflatten__({name: getattr(w, name) for name in inner}, context, w.shape, w.stride()),
    }
    for how, other in copies.items():
        assert {name: getattr(other, name) for name in values} == values, how
    assert w.half().compute_dtype == torch.float16 and w.float().compute_dtype == torch.float32
    assert {name: getattr(w.float(), name) for name in values if name != "compute_dtype"} == {k: v for k, v in values.items() if k != "compute_dtype"}
    assert w.with_compute("weight_only").compute == "weight_only" and w.with_compute("weight_only").param_name == "up.weight"
    text = repr(w)
    assert all(repr(value) in text for value in values.values()), text
    # the compile cache key: the structure, not the (cosmetic) name
    key = w._stable_hash_for_caching()
    assert FP8Tensor(w.qdata, w.scale, FP8Meta(**{**values, "param_name": "other"}))._stable_hash_for_caching() == key
    for name, changed in [("compute", "weight_only"), ("value_dtype", torch.float16), ("compute_dtype", torch.bfloat16), ("fp8_layout", layout.replace(block_size=8))]:
        assert FP8Tensor(w.qdata, w.scale, FP8Meta(**{**values, name: changed}))._stable_hash_for_caching() != key, name


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


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("op", list(OPS))
def test_any_op_returns_a_plain_tensor_with_dequantized_values(op, dtype):
    w, original, _ = entry("linear", dtype, granularity="channel")
    dense = reference_qdq(original, "channel")
    out = OPS[op](w)
    assert type(out) in DENSE_VIEW_TYPES if op in VIEW_OPS else type(out) is torch.Tensor, type(out)
    assert not isinstance(out, FP8Tensor)
    expected = OPS[op](dense)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert torch.equal(bits(out), bits(expected))


# float conversions keep FP8 storage (FP8Tensor._moved): the codes stay, the reported dtype/device change
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


def test_deepcopy_inside_the_block_copies_the_fp8_weights():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).bfloat16()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.no_grad(), fp8_weights(model) as store:
        twin = copy.deepcopy(model)
        expected = model(x)
        assert isinstance(twin[0].weight, FP8Tensor) and twin[0].weight.qdata is not store["0.weight"].qdata
        assert torch.equal(twin(x), expected)
    with torch.no_grad():
        assert torch.equal(twin(x), expected)  # the copy keeps its own FP8 weights after the block
    assert type(model[0].weight) is nn.Parameter


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


def test_store_entries_are_parameters():
    w, _, _ = entry("linear")
    assert isinstance(w, nn.Parameter) and isinstance(w, FP8Tensor)
    assert isinstance(w.to_device("cpu"), nn.Parameter)
    layer = nn.Linear(20, 12)
    layer._parameters["weight"] = w  # what the context does
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]


def test_repr_names_the_parameter_and_does_not_dequantize(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Conv1d(4, 4, 1)))
    store = FP8Store.from_module(model, granularity="channel")

    def refuse(*args, **kwargs):
        raise AssertionError("repr dequantized a weight")

    monkeypatch.setattr(fp8ctx._numerics, "dequantize", refuse)
    monkeypatch.setattr(fp8ctx.kernels, "dequantize", refuse)
    w = store["1.0.weight"]
    for text in (repr(w), str(w), f"{w}"):
        assert "1.0.weight" in text and "float8_e4m3fn" in text and "channel" in text
    assert "2 weights" in repr(store)
    with fp8_weights(model, store=store):
        assert "Conv1d(4, 4" in repr(model)


# -- torch.compile ------------------------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)]).eval()




@pytest.mark.parametrize(
    "backend,grad",
    [
        ("aot_eager", False),
        pytest.param("aot_eager", True),
        ("inductor", False),  # one inductor case keeps the suite fast
    ],
    ids=["aot_eager-no_grad", "aot_eager-grad", "inductor-no_grad"],
)
def test_torch_compile_fullgraph_matches_eager_inside_the_context(backend, grad):
    torch._dynamo.reset()
    model = mlp()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    reference = fake_quantized_copy(model, "channel")
    x_ref, x_eager, x_compiled = (x.clone().requires_grad_(grad) for _ in range(3))
    with torch.set_grad_enabled(grad):
        expected, plain = reference(x_ref), model(x)
        with fp8_weights(model, granularity="channel"):
            eager = model(x_eager)
            compiled = torch.compile(model, fullgraph=True, backend=backend)(x_compiled)
            if grad:
                for out in (expected, eager, compiled):
                    out.square().sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager, expected)
    assert relative_error(compiled.detach(), plain.detach()) > 1e-3  # the compiled graph used the FP8 weights
    if grad:
        torch.testing.assert_close(x_compiled.grad, x_eager.grad)
        torch.testing.assert_close(x_eager.grad, x_ref.grad)
    assert all(p.grad is None for name, p in model.named_parameters() if name.endswith("weight"))
    torch._dynamo.reset()


# -- kernel backend switch ------------------------------------------------------------------------------------


def test_use_backend_torch_switches_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4)).bfloat16()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = fake_quantized_copy(model, "block", 4)(x)
    initial = fp8ctx.kernels.get_backend()
    with fp8_weights(model, granularity="block", block_size=4):
        with fp8ctx.kernels.use_backend("torch"):
            assert fp8ctx.kernels.get_backend() == "torch"
            out = model(x)
        assert fp8ctx.kernels.get_backend() == initial
        with pytest.raises(RuntimeError, match="inside"):
            with fp8ctx.kernels.use_backend("torch"):
                raise RuntimeError("inside")
        assert fp8ctx.kernels.get_backend() == initial
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["triton", "", "TORCH"], ids=["triton", "empty", "uppercase"])
def test_use_backend_rejects_unknown_names(name):
    initial = fp8ctx.kernels.get_backend()
    with pytest.raises(FP8Error, match="backend must be one of"):
        with fp8ctx.kernels.use_backend(name):
            pytest.fail("the block must not run")
    assert fp8ctx.kernels.get_backend() == initial


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_an_expert_and_a_transpose_are_fp8_views_of_the_same_codes(granularity):
    experts = fp8ctx.FP8Tensor.from_dense(torch.randn(4, 12, 20), fp8ctx.FP8Layout(granularity, 8, 1, batch_dims=1), name="experts")
    dense = experts.dequantize()
    expert = experts.matrix(torch.tensor(2))
    assert isinstance(expert, fp8ctx.FP8Tensor) and expert.qdata.data_ptr() == experts.qdata[2].data_ptr()
    assert torch.equal(expert.dequantize(), dense[2])
    flipped = experts.transposed()
    assert flipped.shape == (4, 20, 12) and flipped.qdata.data_ptr() == experts.qdata.data_ptr()
    assert torch.equal(flipped.dequantize(), dense.transpose(-2, -1))
    assert torch.equal(flipped.matrix(1).transposed().dequantize(), dense[1])
    with pytest.raises(fp8ctx.FP8Error, match="batch_dims=0"):
        expert.matrix(0)
    with pytest.raises(fp8ctx.FP8Error, match="not a stack of matrices"):
        fp8ctx.FP8Tensor.from_dense(torch.randn(4, 3, 2, 2), fp8ctx.FP8Layout(granularity)).transposed()


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
