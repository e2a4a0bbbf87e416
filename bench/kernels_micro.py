#!/usr/bin/env python3
"""Micro-benchmark of fp8ctx's Triton kernels against bf16 on one GPU.

One call does everything a device lease needs (see bench/KERNEL_NOTES.md):

    python bench/kernels_micro.py --tests --final --dequant --host --out $OUT

  --tests      run tests/test_kernels_triton.py first (pytest, xdist if present)
  --sweep      time candidate configs per T bucket (tuning), incl. "dequant"
               (dequantize kernel + cuBLAS)
  --final      time the launcher's own choice on all Qwen2.5-7B shapes
  --extras     granularity / format / dtype variants through the launcher
  --dequant    dequantize kernel vs torch, achieved bandwidth
  --ceilings   measure copy bandwidth and bf16 matmul rate once
  --host       CPU cost per eager call (launcher vs F.linear)
  --dobench    also time with triton.testing.do_bench (for comparison)
  --ncu        profile two small-T kernels with Nsight Compute
  --jobs N     parallel processes that pre-compile kernels (Triton disk cache)

Timing ("graph-rotate", the default): R calls, each on its own copy of the
weights (R copies >= ~130 MB, well over the 50 MB L2, so every call reads its
weights from HBM as in a real forward), captured in one CUDA graph and
replayed 7 times between device events; median / R.  No CPU launch cost
inside, and no cache-flush memset before the timed kernel (do_bench's 256 MB
flush leaves dirty lines in L2 that are written back while the kernel runs).
Prints a short table last and writes full JSON to --out.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fp8ctx from this checkout

SHAPES = {  # Qwen2.5-7B linear layers, (N, K) = (out_features, in_features)
    "qkv": (4608, 3584),
    "o": (3584, 3584),
    "gate": (18944, 3584),
    "gate_up": (37888, 3584),
    "down": (3584, 18944),
}
TS = [1, 16, 64, 256, 1024, 4096]
HBM_BW = 3.0e12      # B/s, measured D2D copy on this H100 (run 1: 3.01 TB/s)
MMA_RATE = 790e12    # FLOP/s, bf16 dense (run 1: 803 TFLOP/s at 8192^3)


class _DequantRoute(dict):
    """Marks the dequantize + cuBLAS route in the config lists (it has no tile configuration)."""

    method = "dequant"

    def _asdict(self):
        return dict(self)


class _Kernels:
    """The kernel entry points in this script's call forms (granularity name and block size), mapped onto the
    layout-taking API of fp8ctx.kernels._triton."""

    def __init__(self):
        from fp8ctx._layout import FP8Layout
        from fp8ctx.kernels import _plan, _triton

        self._layout, self._plan, self._triton = FP8Layout, _plan, _triton

    def KernelConfig(self, method="fused", **fields):
        return _DequantRoute(DQ) if method == "dequant" else self._plan.KernelConfig(**fields)

    def _pick_config(self, M, N, K):
        return self._plan.pick_config(M, N, K) or _DequantRoute(DQ)

    def _split_plan(self, *args):
        return self._plan.split_plan(*args)

    def w8a16_linear(self, x, q, s, gran, B=128, bias=None, config=None):
        layout = self._layout(gran, B, 0, q.dtype)
        if isinstance(config, _DequantRoute):
            return self._triton.w8a16_linear(x, q, s, layout, bias, route="dequant")
        return self._triton.w8a16_linear(x, q, s, layout, bias, config=config)

    def dequantize(self, q, s, gran, B=128, out_dtype=None):
        return self._triton.dequantize(q, s, self._layout(gran, B, 0, q.dtype), out_dtype)


def load_kernels():
    return _Kernels()


def floors_us(M, N, K):
    """(fp8 floor, bf16 floor) in microseconds: max(bytes/BW, flops/rate)."""
    flops = 2.0 * M * N * K
    act = M * K * 2 + M * N * 2
    fp8 = max((act + N * K + N * 4) / HBM_BW, flops / MMA_RATE)
    bf16 = max((act + N * K * 2) / HBM_BW, flops / MMA_RATE)
    return fp8 * 1e6, bf16 * 1e6


def C(BM, BN, BK, swap, warps, stages, **kw):
    return dict(BM=BM, BN=BN, BK=BK, swap=swap, warps=warps, stages=stages, **kw)


DQ = dict(BM=0, BN=0, BK=0, swap=False, warps=0, stages=0, method="dequant")

# Candidate configs per T bucket (KernelConfig fields).  Run 2 covered
# swap/no-swap, asm on/off and split on/off; run 3 narrows on the winners.
CANDIDATES = {
    "s": [  # T <= 16 (BM = 16)
        C(16, 32, 512, False, 4, 3),
        C(16, 16, 512, False, 4, 3),
        C(16, 32, 512, False, 4, 4),
        C(16, 64, 512, False, 4, 3),
        C(16, 32, 1024, False, 4, 2),
    ],
    "t32": [
        C(32, 32, 256, False, 4, 4),
        C(32, 32, 512, False, 4, 3),
        C(16, 32, 512, False, 4, 3),
        C(32, 64, 256, True, 4, 4),
    ],
    "m": [  # T = 64
        C(64, 64, 128, True, 4, 4),
        C(64, 64, 128, True, 4, 4, split=False),
        C(64, 64, 256, True, 4, 3),
        C(64, 128, 128, True, 8, 4),
        C(32, 64, 256, True, 4, 4),
    ],
    "l": [  # T = 256
        C(256, 128, 64, True, 8, 3),
        C(128, 128, 64, False, 8, 4),
        DQ,
    ],
    "xl": [  # T >= 1024
        C(256, 128, 64, True, 8, 4),
        DQ,
    ],
}


def bucket(T):
    return "s" if T <= 16 else "t32" if T <= 32 else "m" if T <= 64 else "l" if T <= 256 else "xl"


def cfg_str(c):
    if c is None:
        return "auto"
    if c.get("method") == "dequant":
        return "dequant+cuBLAS"
    extra = "".join(f" {k}={v}" for k, v in c.items() if k not in ("BM", "BN", "BK", "swap", "warps", "stages"))
    return f"{c['BM']}x{c['BN']}x{c['BK']} {'swap' if c['swap'] else 'nosw'} w{c['warps']} s{c['stages']}{extra}"


# ------------------------------------------------------------- precompile --
def _compile_job(job):
    """Worker: run the launcher once on the real shape so the exact
    specialisation lands in Triton's disk cache."""
    import torch
    k = load_kernels()
    N, K, M, cfg, gran, B, fmt, dt = job
    t0 = time.time()
    try:
        dt = getattr(torch, dt)
        fmt = getattr(torch, fmt)
        x = torch.randn(M, K, device="cuda").to(dt)
        q = torch.empty(N, K, dtype=torch.uint8, device="cuda").view(fmt)
        if gran == "tensor":
            s = torch.ones((), device="cuda")
        elif gran == "channel":
            s = torch.ones(N, device="cuda")
        else:
            s = torch.ones(-(-N // B), -(-K // B), device="cuda")
        c = k.KernelConfig(**dict(cfg)) if cfg is not None else None
        k.w8a16_linear(x, q, s, gran, B, None, config=c)
        torch.cuda.synchronize()
        return job, time.time() - t0, None
    except Exception as e:  # report, keep going
        return job, time.time() - t0, repr(e)[:400]


def precompile(jobs, nproc):
    if not jobs:
        return {}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    errs = {}
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(nproc, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
        for job, dt, err in ex.map(_compile_job, jobs):
            if err:
                errs[job] = err
                print(f"[compile FAIL] {job}: {err}", flush=True)
    print(f"[precompile] {len(jobs)} jobs in {time.time() - t0:.1f}s, {len(errs)} failed", flush=True)
    return errs


def compile_key(k, M, N, K, cfg, gran, B):
    c = k.KernelConfig(**dict(cfg)) if cfg is not None else k._pick_config(M, N, K)
    if getattr(c, "method", "fused") == "dequant":
        return ("dequant",)
    BK = c.BK
    if gran == "block":
        while BK > 16 and B % BK:
            BK //= 2
    tiles = -(-M // c.BM) * -(-N // c.BN)
    sk, _ = k._split_plan(tiles, K, BK, 132, c.split)
    return (tuple(c), sk > 1, BK)


# ------------------------------------------------------------------ utils --
def quantize(W, gran, B, fmt):
    import torch
    fmax = torch.finfo(fmt).max
    N, K = W.shape
    if gran == "tensor":
        s = W.abs().amax().float() / fmax
        return (W / s).to(fmt), s
    if gran == "channel":
        s = W.abs().amax(1).float() / fmax
        return (W / s[:, None]).to(fmt), s
    nb, kb = -(-N // B), -(-K // B)
    Wp = torch.zeros(nb * B, kb * B, device=W.device)
    Wp[:N, :K] = W
    s = Wp.reshape(nb, B, kb, B).abs().amax((1, 3)) / fmax
    sb = s.repeat_interleave(B, 0).repeat_interleave(B, 1)[:N, :K]
    return (W / sb).to(fmt), s


def scale_b(s, gran, B, N, K):
    if gran == "tensor":
        return s
    if gran == "channel":
        return s[:, None]
    return s.repeat_interleave(B, 0).repeat_interleave(B, 1)[:N, :K]


def rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def copies_for(nbytes_fp8):
    """Rotation depth: enough fp8 weight copies to exceed ~130 MB (>2.5x L2)."""
    return max(2, min(10, -(-130_000_000 // nbytes_fp8)))


class Bench:
    def __init__(self, out_dir):
        import torch
        from triton.testing import do_bench
        self.torch = torch
        self._do_bench = do_bench
        self.out_dir = out_dir
        self.res = {"meta": {}, "tests": None, "sweep": [], "final": [], "extras": [],
                    "dequant": [], "ceilings": {}, "host": [], "ncu": [], "compile_errors": {}}

    def tgraph(self, fns, reps=7):
        """Median device time (us) of one call, fns rotating over weight copies."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3 / len(fns))
        del g
        ts.sort()
        return ts[len(ts) // 2]

    def tbench(self, fn):
        return self._do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3

    def dump(self):
        if self.out_dir:
            with open(os.path.join(self.out_dir, "kernels_micro.json"), "w") as f:
                json.dump(self.res, f, indent=1, default=str)


def run_tests(args):
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_kernels_triton.py"), "-q",
           f"--maxfail={args.maxfail}", "-p", "no:cacheprovider"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", str(args.jobs), "-p", "no:benchmark"]
    except ImportError:
        pass
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (r.stdout + r.stderr)[-4000:]
    print(tail, flush=True)
    print(f"[tests] rc={r.returncode} in {time.time() - t0:.1f}s", flush=True)
    return {"rc": r.returncode, "seconds": time.time() - t0, "tail": tail[-3000:]}


NCU_SCRIPT = r"""
import sys, torch, json
sys.path.insert(0, {root!r})
from bench.kernels_micro import load_kernels, quantize
k = load_kernels()
N, K, T = {N}, {K}, {T}
cfg = {cfg!r}
W = torch.randn(N, K, device="cuda") * 0.02
q, s = quantize(W, "channel", 128, torch.float8_e4m3fn)
x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
c = k.KernelConfig(**cfg) if cfg else None
for _ in range(3):
    k.w8a16_linear(x, q, s, "channel", 128, config=c)
torch.cuda.synchronize()
"""


def run_ncu(B, k):
    ncu = shutil.which("ncu") or next(iter(sorted(pathlib.Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        print("[ncu] not found", flush=True)
        return
    jobs = [("o", 16, C(16, 64, 256, True, 4, 4, split=False)), ("gate_up", 1, C(16, 32, 256, False, 4, 4))]
    for name, T, cfg in jobs:
        N, K = SHAPES[name]
        script = NCU_SCRIPT.format(root=str(ROOT), N=N, K=K, T=T, cfg=cfg)
        cmd = [str(ncu), "--section", "SpeedOfLight", "--section", "SchedulerStats", "--section", "WarpStateStats",
               "--section", "MemoryWorkloadAnalysis", "-k", "regex:w8a16", "-s", "2", "-c", "1",
               sys.executable, "-c", script]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        out = r.stdout[-7000:] + r.stderr[-1500:]
        B.res["ncu"].append({"shape": name, "T": T, "cfg": cfg, "rc": r.returncode, "out": out})
        keep = [ln for ln in out.splitlines() if any(w in ln for w in (
            "Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM)", "Issue Slots Busy", "Issued Warp",
            "No Eligible", "Active Warps", "Eligible Warps", "Warp Cycles Per Issued", "L2 Hit", "Registers",
            "Stall", "stall", "Mem Busy", "Max Bandwidth"))]
        print(f"[ncu] {name} T={T} {cfg_str(cfg)} rc={r.returncode} {time.time() - t0:.0f}s\n" + "\n".join(keep[:40]), flush=True)
        B.dump()


def main():
    ap = argparse.ArgumentParser()
    for flag in ("tests", "sweep", "final", "extras", "dequant", "ceilings", "host", "dobench", "ncu"):
        ap.add_argument(f"--{flag}", action="store_true")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--T", default=",".join(map(str, TS)))
    ap.add_argument("--sweep-T", default="", help="restrict --sweep to these T (default: all --T)")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--maxfail", type=int, default=1, help="pytest --maxfail (1 == -x)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import triton
    k = load_kernels()
    B = Bench(args.out)
    B.res["meta"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "triton": triton.__version__, "cuda": torch.version.cuda,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "sms": torch.cuda.get_device_properties(0).multi_processor_count,
                     "picks": {f"{n}@{T}": tuple(k._pick_config(T, *SHAPES[n])) for n in SHAPES for T in TS}}
    print("[meta]", B.res["meta"], flush=True)
    shapes = [s for s in args.shapes.split(",") if s]
    Ts = [int(t) for t in args.T.split(",") if t]
    sweep_Ts = {int(t) for t in args.sweep_T.split(",") if t} or set(Ts)

    if args.tests:
        B.res["tests"] = run_tests(args)
        B.dump()

    # ---- plan: (shape, T, cfg or None) runs; pre-compile them in parallel --
    runs = []
    for name in shapes:
        for T in Ts:
            if args.sweep and T in sweep_Ts:
                runs += [(name, T, c, "sweep") for c in CANDIDATES[bucket(T)]]
            if args.final:
                runs.append((name, T, None, "final"))
    extras = []
    if args.extras:
        for T in (1, 16, 64, 256, 1024):
            for gran, Bs in (("tensor", 128), ("block", 128)):
                extras.append(("qkv", T, gran, Bs, "float8_e4m3fn", "bfloat16"))
            extras.append(("qkv", T, "channel", 128, "float8_e5m2", "bfloat16"))
            extras.append(("qkv", T, "channel", 128, "float8_e4m3fn", "float16"))
    jobs, seen = [], set()
    for name, T, c, _ in runs:
        N, K = SHAPES[name]
        key = (compile_key(k, T, N, K, c, "channel", 128), "channel", 128, "float8_e4m3fn", "bfloat16")
        if key[0] != ("dequant",) and key not in seen:
            seen.add(key)
            jobs.append((N, K, T, tuple(sorted(c.items())) if c else None, "channel", 128, "float8_e4m3fn", "bfloat16"))
    for name, T, gran, Bs, fmt, dt in extras:
        N, K = SHAPES[name]
        key = (compile_key(k, T, N, K, None, gran, Bs), gran, Bs, fmt, dt)
        if key[0] != ("dequant",) and key not in seen:
            seen.add(key)
            jobs.append((N, K, T, None, gran, Bs, fmt, dt))
    errs = precompile(jobs, args.jobs)
    B.res["compile_errors"] = {str(kk): v for kk, v in errs.items()}
    B.dump()

    if args.ceilings:
        a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        t = B.tgraph([lambda: b.copy_(a)] * 2)
        m = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
        tm = B.tgraph([lambda: m @ m] * 2)
        B.res["ceilings"] = {"copy_TBps": 2 * a.numel() / t / 1e6, "bf16_mm_TFLOPs": 2 * 8192 ** 3 / tm / 1e6}
        print("[ceilings]", B.res["ceilings"], flush=True)
        del a, b, m

    # ---- matmul timings ---------------------------------------------------
    for name in shapes:
        N, K = SHAPES[name]
        R = copies_for(N * K)
        Ws = [torch.randn(N, K, device="cuda") * 0.02 for _ in range(R)]
        Q = [quantize(W, "channel", 128, torch.float8_e4m3fn) for W in Ws]
        Wb = [W.to(torch.bfloat16) for W in Ws]
        del Ws
        Wd0 = (Q[0][0].float() * Q[0][1][:, None]).to(torch.bfloat16)
        for T in Ts:
            my = [r for r in runs if r[0] == name and r[1] == T]
            if not my:
                continue
            x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
            ref = F.linear(x, Wd0)
            t_bf16 = B.tgraph([lambda w=w: F.linear(x, w) for w in Wb])
            t_torch = B.tgraph([lambda q=q, s=s: F.linear(x, (q.float() * s[:, None]).to(torch.bfloat16))
                                for q, s in Q])
            f8, fb = floors_us(T, N, K)
            base = {"shape": name, "N": N, "K": K, "T": T, "bf16_us": t_bf16, "torch_dequant_us": t_torch,
                    "floor_fp8_us": f8, "floor_bf16_us": fb}
            if args.dobench:
                base["bf16_us_dobench"] = B.tbench(lambda: F.linear(x, Wb[0]))
            for _, _, c, kind in my:
                cc = k.KernelConfig(**c) if c else None
                if c and not c.get("method") and any(str(j[3]) == str(tuple(sorted(c.items()))) for j in errs):
                    continue
                try:
                    y = k.w8a16_linear(x, Q[0][0], Q[0][1], "channel", 128, config=cc)
                    err, nan = rel(y, ref), bool(torch.isnan(y).any())
                    t = B.tgraph([lambda q=q, s=s: k.w8a16_linear(x, q, s, "channel", 128, config=cc)
                                  for q, s in Q])
                except Exception as e:
                    print(f"[run FAIL] {name} T={T} {cfg_str(c)}: {e!r}"[:400], flush=True)
                    continue
                r = dict(base, cfg=c if c else dict(k._pick_config(T, N, K)._asdict()), fp8_us=t, ratio=t / t_bf16,
                         torch_ratio=t_torch / t_bf16, err=err, nan=nan, kind=kind)
                if args.dobench:
                    r["fp8_us_dobench"] = B.tbench(lambda: k.w8a16_linear(x, Q[0][0], Q[0][1], "channel", 128, config=cc))
                B.res[kind].append(r)
                print(f"  {name:7s} T={T:5d} {cfg_str(r['cfg']):40s} {t:8.1f}us bf16 {t_bf16:8.1f}us "
                      f"ratio {t / t_bf16:5.2f} floor {f8:6.1f} err {err:.1e}{' NaN!' if nan else ''}"
                      + (f" | dobench {r['fp8_us_dobench']:.1f} vs {base['bf16_us_dobench']:.1f}" if args.dobench else ""),
                      flush=True)
            B.dump()
            del x, ref
        del Q, Wb, Wd0
        torch.cuda.empty_cache()

    # ---- variants through the launcher's own choice ----------------------
    for name, T, gran, Bs, fmt, dt in extras:
        N, K = SHAPES[name]
        fmt_t, dt_t = getattr(torch, fmt), getattr(torch, dt)
        R = copies_for(N * K)
        Ws = [torch.randn(N, K, device="cuda") * 0.02 for _ in range(R)]
        Q = [quantize(W, gran, Bs, fmt_t) for W in Ws]
        Wb = [W.to(dt_t) for W in Ws]
        x = torch.randn(T, K, device="cuda").to(dt_t)
        ref = F.linear(x, (Q[0][0].float() * scale_b(Q[0][1], gran, Bs, N, K)).to(dt_t))
        try:
            y = k.w8a16_linear(x, Q[0][0], Q[0][1], gran, Bs)
            t = B.tgraph([lambda q=q, s=s: k.w8a16_linear(x, q, s, gran, Bs) for q, s in Q])
        except Exception as e:
            print(f"[extra FAIL] {name} T={T} {gran} {fmt} {dt}: {e!r}"[:400], flush=True)
            continue
        tb = B.tgraph([lambda w=w: F.linear(x, w) for w in Wb])
        r = {"shape": name, "T": T, "gran": gran, "B": Bs, "fmt": fmt, "dtype": dt,
             "fp8_us": t, "bf16_us": tb, "ratio": t / tb, "err": rel(y, ref), "nan": bool(torch.isnan(y).any())}
        B.res["extras"].append(r)
        print(f"  extra {name} T={T:5d} {gran:7s} {fmt[5:]:9s} {dt:8s}: {t:8.1f}us bf16 {tb:8.1f}us "
              f"ratio {t / tb:5.2f} err {r['err']:.1e}", flush=True)
        B.dump()
        del Ws, Q, Wb, x, ref

    # ---- host overhead: CPU time per eager call (GPU is not the bottleneck) --
    if args.host:
        N, K = SHAPES["qkv"]
        q = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
        s = torch.ones(N, device="cuda")
        Wb = torch.randn(N, K, device="cuda").to(torch.bfloat16)
        for T in (1, 64):
            x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
            for label, fn in [("w8a16_linear", lambda: k.w8a16_linear(x, q, s, "channel", 128)),
                              ("F.linear_bf16", lambda: F.linear(x, Wb))]:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(300):
                    fn()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                B.res["host"].append({"fn": label, "T": T, "cpu_us_per_call": (t1 - t0) / 300 * 1e6})
        # Where the launcher's CPU time goes: cProfile of 300 eager calls.
        import cProfile
        import io
        import pstats
        x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(300):
            k.w8a16_linear(x, q, s, "channel", 128)
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(14)
        B.res["host_profile"] = buf.getvalue()
        print("[host]", B.res["host"], flush=True)
        print("\n".join(buf.getvalue().splitlines()[:40]), flush=True)
        del q, s, Wb, x

    # ---- dequantize kernel ------------------------------------------------
    if args.dequant:
        for name in ("gate_up", "down"):
            N, K = SHAPES[name]
            W = torch.randn(N, K, device="cuda")
            for gran in ("channel", "block"):
                q, s = quantize(W, gran, 128, torch.float8_e4m3fn)
                sb = scale_b(s, gran, 128, N, K)
                ours = k.dequantize(q, s, gran, 128, torch.bfloat16)
                exact = torch.equal(ours.view(torch.int16), (q.float() * sb).to(torch.bfloat16).view(torch.int16))
                del ours
                t = B.tgraph([lambda: k.dequantize(q, s, gran, 128, torch.bfloat16)] * 2)
                tt = B.tgraph([lambda: (q.float() * sb).to(torch.bfloat16)] * 2)
                tc = B.tgraph([lambda: q.to(torch.bfloat16)] * 2)
                byt = N * K * 3
                r = {"shape": name, "gran": gran, "ours_us": t, "torch_scale_us": tt, "plain_cast_us": tc,
                     "ours_TBps": byt / t / 1e6, "cast_TBps": byt / tc / 1e6, "bit_exact": exact,
                     "floor_us": byt / HBM_BW * 1e6}
                B.res["dequant"].append(r)
                print(f"  dequant {name} {gran}: ours {t:.1f}us ({r['ours_TBps']:.2f} TB/s) torch {tt:.1f}us "
                      f"cast {tc:.1f}us exact={exact}", flush=True)
                B.dump()
                torch.cuda.empty_cache()
            del W, q, s, sb

    if args.ncu:
        run_ncu(B, k)

    # ---- short table last ---------------------------------------------------
    print("\n=== per (shape, T): fp8 vs bf16 F.linear, us per call (graph-rotate, weights from HBM) ===")
    print(f"{'shape':8s}{'T':>6s}{'bf16':>9s}{'fp8':>9s}{'ratio':>7s}{'torchdq':>8s}{'fl_fp8':>8s}{'fl_bf16':>8s}"
          f"{'err':>9s}  cfg")
    best = {}
    for r in B.res["sweep"] + B.res["final"]:
        kk = (r["shape"], r["T"], r["kind"])
        if kk not in best or r["fp8_us"] < best[kk]["fp8_us"]:
            best[kk] = r
    for kk in sorted(best, key=lambda z: (z[2], list(SHAPES).index(z[0]), z[1])):
        r = best[kk]
        print(f"{r['shape']:8s}{r['T']:6d}{r['bf16_us']:9.1f}{r['fp8_us']:9.1f}{r['ratio']:7.2f}"
              f"{r['torch_ratio']:8.2f}{r['floor_fp8_us']:8.1f}{r['floor_bf16_us']:8.1f}{r['err']:9.1e}"
              f"  {r['kind']} {cfg_str(r['cfg'])}")
    B.dump()


if __name__ == "__main__":
    main()
