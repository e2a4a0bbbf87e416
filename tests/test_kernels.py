"""The kernel dispatch point: the pure-torch path everywhere, the fused GPU path where it applies, and
CUDA-graph capture of a forward inside the context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from fp8ctx import FP8Error, FP8Store, _numerics, fp8_weights, functional_call, kernels
from fp8ctx._layout import FP8Layout

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GRANULARITIES = ["tensor", "channel", "block"]


def entry_for(weight: torch.Tensor, granularity: str, block_size: int = 128):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return FP8Store.from_module(layer, granularity=granularity, block_size=block_size)["weight"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_torch_path_is_dequantize_then_linear(granularity):
    weight = torch.randn(48, 40, dtype=torch.bfloat16)
    entry = entry_for(weight, granularity, 16)
    x, bias = torch.randn(5, 40, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    layout = entry.fp8_layout
    out = kernels.linear(x, entry.qdata, entry.scale, layout, torch.bfloat16, bias)
    dense = _numerics.dequantize(entry.qdata, entry.scale, layout, torch.bfloat16)
    assert torch.equal(out, F.linear(x, dense, bias))
    traced = torch.ops.fp8ctx.linear(x, entry.qdata, entry.scale, layout.granularity.kernel_code, 16, torch.bfloat16, bias)
    assert torch.equal(traced, out)  # the registered op runs the same implementation


def test_backend_switch():
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == "auto"
    with pytest.raises(FP8Error, match="backend"):
        with kernels.use_backend("cutlass"):
            pass


@cuda
@pytest.mark.parametrize("tokens", [1, 16, 64, 256, 1024], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", [(4608, 3584), (3584, 18944), (1000, 1000)], ids=["qkv", "down", "ragged"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_linear_computes_dequantize_then_matmul(granularity, shape, tokens, monkeypatch):
    from fp8ctx.kernels import _triton

    calls = []
    real = _triton.w8a16_linear
    monkeypatch.setattr(_triton, "w8a16_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    bias = shape != (1000, 1000)  # the bias rides in the GEMM epilogue; the ragged case has none
    torch.manual_seed(tokens)
    layer = nn.Linear(shape[1], shape[0], bias=bias, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
    with fp8_weights(layer, granularity=granularity, originals="keep") as store, torch.no_grad():
        out = layer(x)
        expected = F.linear(x, store["weight"].dequantize(), layer.bias)
    assert calls, "the fused path did not run"
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) <= 1e-2


@cuda
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_dequantize_is_bit_identical(granularity):
    weight = torch.randn(300, 3, 3, 70, device="cuda", dtype=torch.bfloat16)
    layer = nn.Conv2d(70, 300, 3, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(weight.permute(0, 3, 1, 2))
    entry = FP8Store.from_module(layer, granularity=granularity, block_size=64)["weight"]
    fused = entry.dequantize()
    with kernels.use_backend("torch"):
        reference = entry.dequantize()
    assert torch.equal(fused, reference)


@cuda
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_graph_capture_inside_the_context(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512), nn.Unflatten(1, (8, 8, 8)), nn.Conv2d(8, 8, 3, padding=1)
    ).to("cuda", torch.bfloat16)
    static_x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    with fp8_weights(model, granularity=granularity), torch.no_grad():
        for _ in range(3):  # warm up: compile kernels, allocate workspaces
            eager = model(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for seed in range(3):
            static_x.copy_(torch.randn(4, 512, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
            graph.replay()
            torch.testing.assert_close(static_out, model(static_x), rtol=0, atol=0)
    assert eager.shape == static_out.shape


@cuda
def test_compile_inside_the_context_on_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).to("cuda", torch.bfloat16)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    with fp8_weights(model, granularity="channel"), torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert relative_error(compiled, eager) < 1e-2


@cuda
def test_compiled_fp8_compute_traces_the_rounding_as_torch_ops_for_the_compiler_to_fuse():
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("FP8 GEMMs need sm_89+")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256)).to("cuda", torch.bfloat16)
    x = torch.randn(2, 48, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = model.float()(x.float())
        model.to(torch.bfloat16)
    graphs = []
    torch._dynamo.reset()
    with fp8_weights(model, granularity="channel", compute="fp8"), torch.no_grad():
        eager = model(x)
        traced = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
        torch._dynamo.reset()
        inductor = torch.compile(model, fullgraph=True)(x)
    ops_seen = set().union(*graphs)
    assert "aten._scaled_mm.default" in ops_seen and "fp8ctx.fp8_linear.default" not in ops_seen, ops_seen
    assert torch.equal(traced, eager)  # the torch-ops rounding is the Triton quantizer's, bit for bit
    # the compiler keeps GELU's output in float32 before rounding it to FP8, so codes may move by a step: compiled
    # FP8 compute must be as close to the dense float32 model as eager FP8 compute is
    assert relative_error(inductor, dense) <= 1.1 * relative_error(eager, dense)


@cuda
@pytest.mark.parametrize("route", ["dequant", "fused:mid"])
def test_compiled_weight_only_traces_torch_ops_where_the_route_is_dequantize_and_cublas(monkeypatch, route):
    from fp8ctx._layout import FP8Layout
    from fp8ctx.kernels import _route

    torch.manual_seed(0)
    model = nn.Linear(1024, 768).to("cuda", torch.bfloat16)
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)
    key = _route.key_of(600, 768, 1024, x.dtype, x.device, FP8Layout("channel"), torch.float8_e4m3fn, True)
    monkeypatch.setattr(_route, "_routes", {key: route})
    monkeypatch.setattr(_route, "resolved", {})
    graphs = []
    torch._dynamo.reset()
    with fp8_weights(model, granularity="channel"), torch.no_grad():
        eager = model(x)
        traced = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
    ops_seen = set().union(*graphs)
    assert ("fp8ctx.linear.default" in ops_seen) == (route != "dequant"), ops_seen
    assert torch.equal(traced, eager)  # the same dequantized weight and the same GEMM, or the same op


@cuda
def test_a_tracer_measures_the_route_of_a_shape_no_call_has_measured(monkeypatch):
    from fp8ctx._layout import FP8Layout
    from fp8ctx.kernels import _impl, _route

    if _impl.triton_module() is None:
        pytest.skip("needs Triton (the fused route)")
    monkeypatch.setattr(_route, "_routes", {})
    monkeypatch.setattr(_route, "resolved", {})
    timed, real_timer = [], _route._time_ms
    monkeypatch.setattr(_route, "_time_ms", lambda *args: timed.append(1) or real_timer(*args))
    torch.manual_seed(0)
    model = nn.Linear(1024, 768).to("cuda", torch.bfloat16)
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)
    key = _route.key_of(600, 768, 1024, x.dtype, x.device, FP8Layout("channel"), torch.float8_e4m3fn, True)
    graphs = []
    torch._dynamo.reset()
    with fp8_weights(model, granularity="channel"), torch.no_grad():
        traced = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
        assert key in _route.routes() and len(timed) == 2  # both routes timed while tracing, before any eager call
        eager = model(x)
    assert len(timed) == 2  # the eager call and the graph's op reuse the measurement
    assert ("fp8ctx.linear.default" in set().union(*graphs)) == (_route.routes()[key] != "dequant")
    assert torch.equal(traced, eager)


@cuda
def test_compiled_fp8_compute_with_gradients_keeps_the_ops_with_a_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to("cuda", torch.bfloat16)
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphs = []
    torch._dynamo.reset()
    with fp8_weights(model, granularity="channel", compute="fp8"):
        model(x).float().square().sum().backward()
        eager_grad, x.grad = x.grad, None
        torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x).float().square().sum().backward()
    ops_seen = set().union(*graphs)
    # torch._scaled_mm has no derivative: with gradients the graph keeps fp8ctx's ops, whose formulas give them
    assert "aten._scaled_mm.default" not in ops_seen and any(op.startswith("fp8ctx.") for op in ops_seen), ops_seen
    assert relative_error(x.grad, eager_grad) < 1e-3


# -- the opt-in FP8-compute path ------------------------------------------------------------------------


def reference_fp8_compute(x, weight, bias, granularity):
    """Activations rounded to e4m3 per row and weights per the formula, multiplied in float32."""
    from conftest import reference_qdq

    rows = torch.stack([reference_qdq(row, "tensor").float() for row in x.float().reshape(-1, x.shape[-1])])
    dense = reference_qdq(weight, granularity).float()
    out = rows @ dense.T
    return (out.to(x.dtype) + (bias if bias is not None else 0)).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_compute_matches_per_token_reference(granularity, device):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, device=device, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64, device=device, dtype=torch.bfloat16)
    x[0, 1] = 0  # an all-zero token stays exactly zero
    with torch.no_grad():
        expected = reference_fp8_compute(x, layer.weight, layer.bias, granularity)
        with fp8_weights(layer, granularity=granularity, compute="fp8") as store:
            out = layer(x)
            weight_only = F.linear(x, store["weight"].dequantize(), layer.bias)
    assert relative_error(out, expected) < 5e-3
    assert torch.equal(out[0, 1], layer.bias)
    assert relative_error(out, weight_only) > 1e-3  # the activations were rounded too


def test_fp8_compute_keeps_tokens_too_small_for_a_float32_scale_finite(device):
    # the per-token scale follows the library's one amax -> scale rule: amax / 448 underflowing float32 gives
    # scale 1 (the token rounds to zeros), not 0 (which made 0 / 0 = NaN of the token's zeros)
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, device=device)
    x = torch.randn(3, 8, device=device)
    x[1] = 0
    x[1, 0] = 1e-44  # a float32 subnormal
    with torch.no_grad(), fp8_weights(layer, granularity="channel", compute="fp8"):
        out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], layer.bias.detach())  # the token rounded to zeros: only the bias is left


def test_fp8_compute_is_supported_for_e4m3_with_a_scale_per_row():
    supported = {
        (granularity, storage): kernels.fp8_compute_supported(FP8Layout(granularity, storage_dtype=storage))
        for granularity in GRANULARITIES
        for storage in (torch.float8_e4m3fn, torch.float8_e5m2)
    }
    assert {key for key, value in supported.items() if value} == {
        ("tensor", torch.float8_e4m3fn),
        ("channel", torch.float8_e4m3fn),
    }


def test_fp8_compute_options_are_checked():
    layer = nn.Linear(16, 16)
    with pytest.raises(FP8Error, match="granularity"):
        fp8_weights(layer, granularity="block", compute="fp8")
    with pytest.raises(FP8Error, match="storage_dtype"):
        fp8_weights(layer, storage_dtype=torch.float8_e5m2, compute="fp8")
    with pytest.raises(FP8Error, match="compute"):
        fp8_weights(layer, compute="int8")


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_functional_call_computes_in_fp8_when_asked(granularity, device):
    torch.manual_seed(1)
    layer = nn.Linear(64, 48, device=device, dtype=torch.bfloat16)
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    store = FP8Store.from_module(layer, granularity=granularity)
    with torch.no_grad():
        out = functional_call(layer, store, (x,), compute="fp8")
        expected = reference_fp8_compute(x, layer.weight, layer.bias, granularity)
    assert relative_error(out, expected) < 5e-3


def test_functional_call_checks_the_compute_option():
    layer = nn.Linear(16, 16)
    block_store = FP8Store.from_module(layer, granularity="block")
    with pytest.raises(FP8Error, match="granularity"):
        functional_call(layer, block_store, (torch.randn(2, 16),), compute="fp8")
    with pytest.raises(FP8Error, match="compute"):
        functional_call(layer, FP8Store.from_module(layer), (torch.randn(2, 16),), compute="int8")


@cuda
@pytest.mark.parametrize("tokens", [16, 256, 1024], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_scaled_mm_path_matches_the_emulation(granularity, tokens, monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(tokens)
    layer = nn.Linear(3584, 4608, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, 3584, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), fp8_weights(layer, granularity=granularity, compute="fp8", originals="keep"):
        out = layer(x)
        with kernels.use_backend("torch"):
            emulated = layer(x)
    assert calls, "torch._scaled_mm did not run"
    assert calls[0]["bias"] is not None  # the bias rides in the GEMM's epilogue, not a separate add
    assert torch.isfinite(out).all()
    assert relative_error(out, emulated) < 1e-2


@cuda
def test_fused_row_quantization_is_bit_identical():
    from fp8ctx.kernels._quantize import quantize_rows, quantize_rows_torch

    x = torch.randn(300, 3584, device="cuda", dtype=torch.bfloat16)
    x[7] = 0
    q, scale = quantize_rows(x)
    q_ref, scale_ref = quantize_rows_torch(x)
    tiny = torch.zeros(2, 64, device="cuda")
    tiny[0, 3] = 1e-44  # amax / 448 underflows float32: scale 1 by the library's rule, not 0 (NaN codes)
    q_tiny, scale_tiny = quantize_rows(tiny)
    assert torch.equal(scale_tiny, quantize_rows_torch(tiny)[1]) and torch.equal(scale_tiny, torch.ones(2, 1, device="cuda"))
    assert not torch.isnan(q_tiny.float()).any()
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


# -- the registered ops ------------------------------------------------------------------------------------


def op_samples():
    torch.manual_seed(0)
    weight = torch.randn(32, 48, dtype=torch.bfloat16)
    x = torch.randn(3, 48, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    for granularity in GRANULARITIES:
        entry = entry_for(weight, granularity, 16)
        code = FP8Layout(granularity).granularity.kernel_code
        yield torch.ops.fp8ctx.linear, (x, entry.qdata, entry.scale, code, 16, torch.bfloat16, bias)
        yield torch.ops.fp8ctx.dequantize, (entry.qdata, entry.scale, code, 16, 0, torch.bfloat16)
        yield torch.ops.fp8ctx.embedding, (torch.tensor([[1, 5], [31, 0]]), entry.qdata, entry.scale, code, 16,
                                           torch.float32)
        if granularity != "block":
            yield torch.ops.fp8ctx.fp8_linear, (x, entry.qdata, entry.scale, code, 16, torch.bfloat16, None)


@pytest.mark.parametrize("op,args", list(op_samples()), ids=lambda v: getattr(v, "__name__", ""))
def test_registered_ops_pass_torch_opcheck(op, args):
    # fake (meta) implementation, autograd registration and AOT dispatch, as torch.compile uses them (opcheck's
    # schema test perturbs every input arithmetically, which float8 tensors do not support on the CPU)
    torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


def recording_backend(graphs):
    """A torch.compile backend that keeps the ops of each forward graph AOT autograd hands to a compiler."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    return aot_autograd(fw_compiler=compiler)


@pytest.mark.parametrize("compute", ["weight_only", "fp8"])
def test_compile_fullgraph_records_the_fp8ctx_op(compute):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    graphs = []
    torch._dynamo.reset()
    with fp8_weights(model, granularity="channel", compute=compute), torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
    op = "fp8ctx.fp8_linear.default" if compute == "fp8" else "fp8ctx.linear.default"
    assert graphs and op in graphs[0], graphs
    assert torch.equal(compiled, eager)  # the op ran the same fallback implementation as eager mode


def test_compiled_backward_flows_through_the_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16)).to(torch.float32)
    x = torch.randn(4, 32, requires_grad=True)
    torch._dynamo.reset()
    with fp8_weights(model, granularity="tensor"):
        model(x).square().sum().backward()
        eager_grad, x.grad = x.grad, None
        torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    assert torch.allclose(x.grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_fp8_compute_adds_the_bias_before_its_one_rounding():
    from fp8ctx.kernels._quantize import quantize_rows_torch

    torch.manual_seed(3)
    layer = nn.Linear(64, 48, dtype=torch.bfloat16)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    with fp8_weights(layer, granularity="channel", compute="fp8") as store, torch.no_grad():
        out = layer(x)
        entry = store["weight"]
        q, x_scale = quantize_rows_torch(x)
        exact = (q.float() @ entry.qdata.float().T) * x_scale * entry.scale[None, :] + layer.bias.float()
    assert torch.equal(out, exact.to(torch.bfloat16))


def test_tuning_options_and_route_files_are_checked(tmp_path):
    from fp8ctx.kernels import _route

    with pytest.raises(FP8Error, match="True or False"):
        kernels.set_tuning("yes")
    bad = [
        ("not json", "readable JSON"),
        ('{"version": 99, "routes": []}', "version"),
        ('{"version": 1, "routes": [[[1, 2], "dequant"]]}', "bad entry"),
        ('{"version": 1, "routes": [[[16, 8, 8, "a", "b", "c", 1, "d", false], "fused:nope"]]}', "bad entry"),
    ]
    for content, message in bad:
        path = tmp_path / "routes.json"
        path.write_text(content)
        with pytest.raises(FP8Error, match=message):
            _route._load(path)
    assert kernels.tuned_routes() == {} or all(len(key) == 9 for key in kernels.tuned_routes())


def test_route_choice_keeps_the_faster_measurement_and_persists_it(tmp_path, monkeypatch):
    from fp8ctx.kernels import _route

    monkeypatch.setattr(_route, "_routes", {})
    monkeypatch.setattr(_route, "_loaded_files", set())
    monkeypatch.setattr(_route, "resolved", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_route, "_flush_buffer", lambda device: None)
    cost = {"fused:t16": 2.0, "dequant": 1.0}  # stand-ins for the GPU timings
    ran: list[str] = []
    monkeypatch.setattr(_route, "_time_ms", lambda run, flush, repeats=5: (run(), cost[ran[-1]])[1])
    key = (16, 64, 64, "torch.bfloat16", "cpu", "channel", 128, "torch.float8_e4m3fn", False)
    cpu = torch.device("cpu")
    _route.set_tuning(True, cache_dir=tmp_path)
    try:
        assert _route.choose(key, 8, 64, 64, cpu, ran.append) == "dequant"
        assert ran == ["fused:t16", "dequant", "fused:t16", "dequant"]  # each warmed up, then timed
        assert kernels.tuned_routes() == {key: "dequant"}
        assert _route.choose(key, 8, 64, 64, cpu, ran.append) == "dequant" and len(ran) == 4  # remembered
        cost["dequant"] = 3.0
        _route._routes.clear()
        _route._loaded_files.clear()
        assert _route.choose(key, 8, 64, 64, cpu, ran.append) == "dequant" and len(ran) == 4  # read from the file
        _route.set_tuning(False)
        other = (16, 128, 64, *key[3:])
        assert _route.choose(other, 8, 128, 64, cpu, ran.append) == _route.default_route(8, 128, 64)
        assert len(ran) == 4 and other not in kernels.tuned_routes()  # tuning off: nothing measured or kept
    finally:
        _route.set_tuning(True)
