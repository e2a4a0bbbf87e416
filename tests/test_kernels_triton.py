"""GPU tests for the Triton kernels behind fp8ctx.kernels (skipped without CUDA or Triton).

Every check draws fresh random inputs; outputs are compared with the
reference of the storage contract:
    Wd = (qdata.float() * scale_b).to(x.dtype);  y_ref = F.linear(x, Wd, bias)
by relative L2 error, and must never contain NaN.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from fp8ctx._layout import FP8Layout

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA required")

import triton.language as tl  # noqa: E402

from fp8ctx.kernels import _plan, _route, _w8a16  # noqa: E402
from fp8ctx.kernels import _triton as K_  # noqa: E402
from fp8ctx.kernels._decode import fp8_decode  # noqa: E402
DEV = "cuda"
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(autouse=True)
def _need_sm89():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversion in Triton needs sm_89+")


# ----------------------------------------------------------------- helpers --
def quantize(W, gran, B, fmt):
    """Test-side quantizer following the storage contract (scale multiplies)."""
    fmax = torch.finfo(fmt).max
    N, K = W.shape
    if gran == "tensor":
        s = (W.abs().amax().float() / fmax).clamp_min(1e-12)
        return (W.float() / s).to(fmt), s
    if gran == "channel":
        s = (W.abs().amax(1).float() / fmax).clamp_min(1e-12)
        return (W.float() / s[:, None]).to(fmt), s
    nb, kb = -(-N // B), -(-K // B)
    Wp = torch.zeros(nb * B, kb * B, device=W.device)
    Wp[:N, :K] = W.float()
    s = (Wp.reshape(nb, B, kb, B).abs().amax((1, 3)) / fmax).clamp_min(1e-12)
    return (W.float() / expand_scale(s, gran, B, N, K)).to(fmt), s


def expand_scale(s, gran, B, N, K):
    if gran == "tensor":
        return s
    if gran == "channel":
        return s[:, None]
    return s.repeat_interleave(B, 0).repeat_interleave(B, 1)[:N, :K]


def dequant_ref(q, s, gran, B, dt):
    N, K = q.shape
    return (q.float() * expand_scale(s, gran, B, N, K)).to(dt)


def L(gran, B=128, fmt=torch.float8_e4m3fn):
    return FP8Layout(gran, B, 0, fmt)


@triton.jit
def _decode_kernel(q_ptr, o_ptr, n, FMT_E5M2: tl.constexpr, OUT_BF16: tl.constexpr, USE_ASM: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(o_ptr + offs, fp8_decode(tl.load(q_ptr + offs, mask=m, other=0), FMT_E5M2, OUT_BF16, USE_ASM), mask=m)


def decode_fp8(q, out_dtype, use_asm):
    """The in-register decode the matmul uses, applied elementwise."""
    flat = q.contiguous().view(torch.uint8).reshape(-1)
    out = torch.empty(flat.shape, dtype=out_dtype, device=q.device)
    _decode_kernel[(-(-flat.numel() // 1024),)](flat, out, flat.numel(), FMT_E5M2=q.dtype == torch.float8_e5m2,
                                                 OUT_BF16=out_dtype == torch.bfloat16, USE_ASM=use_asm, BLOCK=1024)
    return out.reshape(q.shape)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes):
    # The caching allocator hands this NaN-filled block to the next allocation
    # of similar size, so any element the kernel fails to write shows as NaN.
    t = torch.full((max(nbytes // 4, 1),), float("nan"), device=DEV)
    del t


def check_linear(T, N, K, gran, B, fmt, dt, bias=True, config=None, x=None, tol=1e-2, route=None):
    W = torch.randn(N, K, device=DEV) * 0.05
    q, s = quantize(W, gran, B, fmt)
    if x is None:
        x = torch.randn(T, K, device=DEV).to(dt)
    b = (torch.randn(N, device=DEV) * 0.1).to(dt) if bias else None
    Wd = dequant_ref(q, s, gran, B, dt)
    ref = F.linear(x, Wd, b)
    poison_allocator(x.numel() // K * N * 2)
    y = K_.w8a16_linear(x, q, s, L(gran, B, fmt), b, config=config, route=route)
    assert y.shape == ref.shape and y.dtype == dt
    assert not torch.isnan(y).any(), "NaN (unwritten or bad decode)"
    # fp64 truth of the stored weights: ours should be as close as the reference.
    truth = F.linear(x.double(), (q.double() * expand_scale(s, gran, B, N, K).double()),
                     b.double() if b is not None else None)
    e_ref, e_truth, e_ref_truth = rel_err(y, ref), rel_err(y, truth), rel_err(ref, truth)
    assert e_ref <= tol, (e_ref, e_truth, e_ref_truth)
    assert e_truth <= max(2.5 * e_ref_truth, 5e-3), (e_ref, e_truth, e_ref_truth)
    return y, ref, e_ref


# ------------------------------------------------------------------- decode --
@pytest.mark.parametrize("fmt", [E4, E5])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asm", [True, False])
def test_decode_all_codes(fmt, out, asm):
    if asm and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("inline PTX path is sm_90+")
    codes = torch.arange(256, dtype=torch.uint8, device=DEV).view(fmt)
    got = decode_fp8(codes, out, asm)
    ref = codes.to(out)
    finite = torch.isfinite(codes.float())
    # bit-exact on every finite code, signed zeros and subnormals included
    assert torch.equal(got[finite].view(torch.int16), ref[finite].view(torch.int16))
    # Documented limit: Triton's stock e5m2 -> bf16 bit trick maps +-inf to
    # +-65536 (finite) and the e4m3 decode maps NaN to +-480; quantizers never
    # emit these codes, and dequantize() (fp32 path) keeps inf/NaN exact.
    assert not torch.isnan(got[finite]).any()


# --------------------------------------------------------------- dequantize --
@pytest.mark.parametrize("gran,B", [("tensor", 128), ("channel", 128), ("block", 128), ("block", 64)])
@pytest.mark.parametrize("fmt", [E4, E5])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(257, 390), (1024, 4096)])
def test_dequantize_bit_exact(gran, B, fmt, out, shape):
    R, C = shape
    W = torch.randn(R, C, device=DEV)
    q, s = quantize(W, gran, B, fmt)
    poison_allocator(R * C * 4)
    got = K_.dequantize(q, s, L(gran, B, fmt), out)
    ref = dequant_ref(q, s, gran, B, out)
    assert got.dtype == out and got.shape == (R, C)
    ibits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[out]
    assert torch.equal(got.view(ibits), ref.view(ibits))


@pytest.mark.parametrize("fmt", [E4, E5])
def test_dequantize_raw_codes_nan(fmt):
    # Random bytes cover every code, NaN included: NaN stays NaN, the rest exact.
    q = torch.randint(0, 256, (64, 300), dtype=torch.uint8, device=DEV).view(fmt)
    s = torch.rand(64, device=DEV) + 0.5
    got = K_.dequantize(q, s, L("channel", 128, fmt), torch.bfloat16)
    ref = dequant_ref(q, s, "channel", 128, torch.bfloat16)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))


# ---------------------------------------------------------------- embedding --
@pytest.mark.parametrize("gran,B", [("tensor", 128), ("channel", 128), ("block", 64)])
@pytest.mark.parametrize("fmt", [E4, E5])
def test_embedding(gran, B, fmt):
    E, D = 1000, 300
    q, s = quantize(torch.randn(E, D, device=DEV), gran, B, fmt)
    idx = torch.randint(0, E, (3, 17), device=DEV)
    got = K_.embedding(idx, q, s, L(gran, B, fmt), torch.bfloat16)
    ref = dequant_ref(q, s, gran, B, torch.bfloat16)[idx]
    assert got.shape == (3, 17, D)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


# ------------------------------------------------------------------- linear --
@pytest.mark.parametrize("gran,B", [("tensor", 128), ("channel", 128), ("block", 128), ("block", 64)])
@pytest.mark.parametrize("fmt", [E4, E5])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [5, 200])
def test_linear_matrix_ragged(gran, B, fmt, dt, T):
    # N, K not multiples of any tile or of B.
    check_linear(T, 300, 520, gran, B, fmt, dt)


@pytest.mark.parametrize("T", [1, 2, 16, 17, 64, 100, 256, 513, 1024, 4100])
@pytest.mark.parametrize("gran", ["channel", "block"])
def test_linear_t_buckets(T, gran):
    check_linear(T, 576, 1040, gran, 128, E4, torch.bfloat16)


@pytest.mark.parametrize("T", [1, 64, 1024])
def test_linear_aligned_large_k(T):
    # Long K exercises split-K at small T (3584 x 18944 is Qwen2.5-7B down_proj's K).
    check_linear(T, 512, 18944, "channel", 128, E4, torch.bfloat16, bias=False)


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "block"])
def test_linear_forced_configs(swap, split, gran):
    cfg = _plan.KernelConfig(16, 32, 64, swap, 4, 3, split)
    check_linear(20, 200, 1500, gran, 64, E4, torch.bfloat16, config=cfg)


def test_linear_noncontiguous_and_3d():
    K, N = 384, 256
    W = torch.randn(N, K, device=DEV)
    q, s = quantize(W, "channel", 128, E4)
    base = torch.randn(3, 2 * K, 7, device=DEV).to(torch.bfloat16)
    x = base[:, ::2, :].transpose(1, 2)  # (3, 7, K), non-contiguous
    assert not x.is_contiguous()
    y = K_.w8a16_linear(x, q, s, L("channel"))
    ref = F.linear(x, dequant_ref(q, s, "channel", 128, torch.bfloat16))
    assert y.shape == (3, 7, N)
    assert rel_err(y, ref) < 1e-2
    xs = torch.randn(4, 5, K, device=DEV).to(torch.float16)[:, 1:]  # strided rows
    y2 = K_.w8a16_linear(xs, q, s, L("channel"))
    assert rel_err(y2, F.linear(xs, dequant_ref(q, s, "channel", 128, torch.float16))) < 1e-2
    xk = torch.randn(9, 2 * K, device=DEV).to(torch.bfloat16)[:, ::2]  # K stride 2, a view
    y3 = K_.w8a16_linear(xk, q, s, L("channel"))
    assert rel_err(y3, F.linear(xk, dequant_ref(q, s, "channel", 128, torch.bfloat16))) < 1e-2


def test_split_k_deterministic_and_counter_reset():
    # Same inputs twice -> bit-identical (fixed reduction order); alternating
    # split counts on one stream must not leave counters dirty.
    N, K = 256, 8192
    W = torch.randn(N, K, device=DEV)
    q, s = quantize(W, "channel", 128, E4)
    x = torch.randn(3, K, device=DEV).to(torch.bfloat16)
    a = K_.w8a16_linear(x, q, s, L("channel"))
    for cfg in [_plan.KernelConfig(16, 64, 256, True, 4, 3), _plan.KernelConfig(16, 32, 128, False, 4, 3)]:
        K_.w8a16_linear(x, q, s, L("channel"), config=cfg)
    b = K_.w8a16_linear(x, q, s, L("channel"))
    assert torch.equal(a, b)
    ref = F.linear(x, dequant_ref(q, s, "channel", 128, torch.bfloat16))
    assert rel_err(b, ref) < 1e-2


def test_bias_dtypes_and_empty():
    N, K = 96, 160
    q, s = quantize(torch.randn(N, K, device=DEV), "tensor", 128, E5)
    x = torch.randn(4, K, device=DEV).to(torch.bfloat16)
    bias32 = torch.randn(N, device=DEV)
    y = K_.w8a16_linear(x, q, s, L("tensor", 128, E5), bias32)
    ref = F.linear(x.float(), dequant_ref(q, s, "tensor", 128, torch.bfloat16).float(), bias32)
    assert rel_err(y, ref) < 1e-2
    e = K_.w8a16_linear(x[:0], q, s, L("tensor", 128, E5))
    assert e.shape == (0, N)


def test_is_supported():
    q = torch.randn(8, 16, device=DEV).to(E4)
    assert K_.is_supported(torch.randn(2, 16, device=DEV).to(torch.bfloat16), q)
    assert K_.is_supported(torch.randn(2, 16, device=DEV).to(torch.float16), q)
    assert not K_.is_supported(torch.randn(2, 16, device=DEV), q)  # fp32 activations
    assert not K_.is_supported(torch.randn(2, 16).to(torch.bfloat16), q)  # CPU x
    assert not K_.is_supported(torch.randn(2, 16, device=DEV).to(torch.bfloat16), q.float())
    assert K_.is_supported(q)  # one-argument form used for dequantize / embedding
    assert not K_.is_supported(q.float())


@pytest.mark.parametrize("gran", ["channel", "block"])
def test_linear_dequant_method(gran):
    # The compute-bound route: dequantize() + cuBLAS; exactly the reference.
    y, ref, e = check_linear(300, 256, 520, gran, 128, E4, torch.bfloat16, route="dequant")
    assert torch.equal(y, ref)


@pytest.mark.parametrize("name", sorted(_plan.FUSED_CONFIGS))
@pytest.mark.parametrize("T", [1, 40, 300])
@pytest.mark.parametrize("gran", ["channel", "block"])
def test_linear_tuned_configs_ragged(name, T, gran):
    # Every config the dispatcher can pick, on shapes that are not tile multiples.
    check_linear(T, 300, 520, gran, 64, E4, torch.bfloat16, config=_plan.FUSED_CONFIGS[name])


def test_fast_launch_path_and_alignment():
    # Second and later calls take the cached-launcher path; a 2-byte-offset
    # view of x must not reuse a kernel specialised for 16-byte alignment.
    N, K = 384, 1024
    q, s = quantize(torch.randn(N, K, device=DEV), "channel", 128, E4)
    xb = torch.randn(5, K + 1, device=DEV).to(torch.bfloat16)
    x_al = xb[:, :K].contiguous()
    x_mis = xb[:, 1:]  # data_ptr % 16 == 2
    ref = F.linear(x_al, dequant_ref(q, s, "channel", 128, torch.bfloat16))
    ys = [K_.w8a16_linear(x_al, q, s, L("channel")) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert rel_err(ys[0], ref) < 1e-2
    for _ in range(2):
        ym = K_.w8a16_linear(x_mis, q, s, L("channel"))
        assert rel_err(ym, F.linear(x_mis, dequant_ref(q, s, "channel", 128, torch.bfloat16))) < 1e-2
    # Same config, K divisible / not divisible by 16, alternating: keys must differ.
    q2, s2 = quantize(torch.randn(N, 1000, device=DEV), "channel", 128, E4)
    x2 = torch.randn(5, 1000, device=DEV).to(torch.bfloat16)
    ref2 = F.linear(x2, dequant_ref(q2, s2, "channel", 128, torch.bfloat16))
    for _ in range(2):
        assert rel_err(K_.w8a16_linear(x_al, q, s, L("channel")), ref) < 1e-2
        assert rel_err(K_.w8a16_linear(x2, q2, s2, L("channel")), ref2) < 1e-2
    assert len(_w8a16._launch.cache) >= 3  # the cached-launcher path was used


# -------------------------------------------------------------- route choice --
@pytest.fixture
def fresh_routes(monkeypatch):
    monkeypatch.setattr(_route, "_routes", {})
    monkeypatch.setattr(_route, "_loaded_files", set())
    monkeypatch.setattr(_route, "resolved", {})
    timed = []
    real = _route._time_ms
    monkeypatch.setattr(_route, "_time_ms", lambda *args: timed.append(1) or real(*args))
    yield timed
    _route.set_tuning(True)


@pytest.mark.parametrize("T", [8, 300, 2048])
def test_route_is_measured_once_per_shape_and_remembered(fresh_routes, T):
    N, K = 1536, 1024
    q, s = quantize(torch.randn(N, K, device=DEV), "channel", 128, E4)
    x = torch.randn(T, K, device=DEV).to(torch.bfloat16)
    ref = F.linear(x, dequant_ref(q, s, "channel", 128, torch.bfloat16))
    first = K_.w8a16_linear(x, q, s, L("channel"))
    assert len(fresh_routes) == 2  # both routes timed on the first call
    (key, chosen), = _route.routes().items()
    assert key[:3] == (_route.token_bucket(T), N, K) and chosen in (_route.fused_route(T, N, K), "dequant")
    again = K_.w8a16_linear(x, q, s, L("channel"))
    assert len(fresh_routes) == 2 and torch.equal(first, again)  # remembered: same route, same bits
    assert rel_err(first, ref) < 1e-2
    forced = K_.w8a16_linear(x, q, s, L("channel"), route=chosen.partition(":")[0])
    assert torch.equal(forced, first)


def test_route_without_tuning_is_the_measured_default(fresh_routes):
    _route.set_tuning(False)
    q, s = quantize(torch.randn(512, 512, device=DEV), "tensor", 128, E4)
    for T in (4, 4096):
        x = torch.randn(T, 512, device=DEV).to(torch.bfloat16)
        y = K_.w8a16_linear(x, q, s, L("tensor"))
        assert rel_err(y, F.linear(x, dequant_ref(q, s, "tensor", 128, torch.bfloat16))) < 1e-2
    assert fresh_routes == [] and _route.routes() == {}


def test_route_choices_persist_in_the_cache_dir(fresh_routes, tmp_path):
    _route.set_tuning(True, cache_dir=tmp_path)
    q, s = quantize(torch.randn(1024, 768, device=DEV), "channel", 128, E4)
    x = torch.randn(100, 768, device=DEV).to(torch.bfloat16)
    y = K_.w8a16_linear(x, q, s, L("channel"))
    files = list(tmp_path.glob("routes-*.json"))
    assert len(files) == 1 and len(fresh_routes) == 2
    _route._routes.clear()
    _route._loaded_files.clear()
    _route.resolved.clear()
    assert torch.equal(K_.w8a16_linear(x, q, s, L("channel")), y)
    assert len(fresh_routes) == 2  # read back from the file, not measured again


def test_route_is_not_measured_during_graph_capture(fresh_routes):
    q, s = quantize(torch.randn(640, 512, device=DEV), "channel", 128, E4)
    x = torch.randn(32, 512, device=DEV).to(torch.bfloat16)
    K_.w8a16_linear(x, q, s, L("channel"), route="fused")  # compile outside the capture (not a route choice)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        y = K_.w8a16_linear(x, q, s, L("channel"))
    graph.replay()
    torch.cuda.synchronize()
    assert fresh_routes == []
    assert rel_err(y, F.linear(x, dequant_ref(q, s, "channel", 128, torch.bfloat16))) < 1e-2


def test_route_timer_measures_gpu_time_not_host_time():
    flush = _route._flush_buffer(torch.device(DEV))
    tiny = torch.zeros(16, device=DEV)

    def slow_host_fast_gpu():
        time.sleep(0.0002)  # a host that takes 0.2 ms (a slow Python launch path) to launch a few-µs kernel
        tiny.add_(1)

    assert _route._time_ms(slow_host_fast_gpu, flush) < 0.05


def _graph_ms(fn, flush, calls=10):
    """GPU milliseconds per call inside a CUDA graph, L2 evicted before each call (independent of _route)."""
    fn()
    torch.cuda.synchronize()
    graphs = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(graph)
    medians = []
    for graph in graphs:
        graph.replay()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        medians.append(sorted(times)[2])
    return (medians[0] - medians[1]) / calls


@pytest.mark.parametrize("T,N,K", [(64, 12288, 3072), (1024, 3072, 3072), (4352, 12288, 3072)])
def test_the_measured_route_is_the_faster_one_inside_a_cuda_graph(fresh_routes, T, N, K):
    # shapes of the Qwen-Image DiT where the two routes differ by 1.3-3x on an H200 (bench/route_probe.py)
    q, s = quantize(torch.randn(N, K, device=DEV) * 0.02, "channel", 128, E4)
    x = torch.randn(T, K, device=DEV).to(torch.bfloat16)
    bias = torch.randn(N, device=DEV).to(torch.bfloat16)
    flush = _route._flush_buffer(torch.device(DEV))
    graph = {route: _graph_ms(lambda route=route: K_.w8a16_linear(x, q, s, L("channel"), bias, route=route), flush)
             for route in ("fused", "dequant")}
    K_.w8a16_linear(x, q, s, L("channel"), bias)
    (chosen,) = _route.routes().values()
    assert graph[chosen.partition(":")[0]] <= 1.15 * min(graph.values()), (chosen, graph)
