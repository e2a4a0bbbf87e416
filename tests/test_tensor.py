"""`FP8Tensor`: what it reports, how it is built (and what it refuses), copies, its repr, torch.compile, views."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
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
