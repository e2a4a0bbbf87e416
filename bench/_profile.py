"""Where one forward's GPU time goes, from torch.profiler's kernel records (bench/compare.py --profile).

Kernels are sorted into the categories the speed issue asks about by their names:

  gemm        cuBLAS / cuBLASLt / CUTLASS matmuls (bf16 GEMMs and ``torch._scaled_mm``'s FP8 ones)
  fused-w8a16 fp8ctx's fused kernel (FP8 decode + GEMM + scale + bias in one)
  dequantize  fp8ctx's dequantize / embedding kernels, and the pure-torch fallback's casts and multiplies
              (inside an fp8ctx method, float8 -> float casts are dequantization)
  quantize    fp8ctx's per-token activation quantizer
  add         elementwise adds: residuals in every method; a separate bias add shows as extra time here
  attention   flash / memory-efficient attention
  other       norms, activations, copies, everything else

``host gaps`` is the GPU's idle time between the first and the last kernel of the forward: time the GPU
waited for the host to launch the next kernel.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

CATEGORIES = ("gemm", "fused-w8a16", "dequantize", "quantize", "add", "attention", "other")
_RULES = [
    ("fused-w8a16", re.compile(r"_w8a16_kernel")),
    ("dequantize", re.compile(r"_dequant_kernel|_embedding_kernel")),
    ("quantize", re.compile(r"_quantize_rows_kernel")),
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|Kernel2|splitK", re.I)),
    ("add", re.compile(r"add", re.I)),
]
# the pure-torch dequantize: float8 -> float32 casts and the float32 multiplies/casts around them
_TORCH_DEQUANT = re.compile(r"Float8|float8|e4m3|e5m2", re.I)


def _category(name: str) -> str:
    for category, pattern in _RULES:
        if pattern.search(name):
            return category
    if _TORCH_DEQUANT.search(name):
        return "dequantize"
    return "other"


def breakdown(forward: Callable[[], object], device: torch.device) -> dict:
    """Profile one call of ``forward`` (already warmed up) and sum kernel time per category.

    Returns:
        ``{"ms": {category: ms}, "gpu_busy_ms", "gpu_span_ms", "host_gaps_ms", "kernels": count,
        "top": [(name, ms)] of the five longest kernels}``.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize(device)
    kernels = [
        e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0
    ]
    per: dict[str, float] = {c: 0.0 for c in CATEGORIES}
    by_name: dict[str, float] = {}
    intervals = []
    for e in kernels:
        us = e.time_range.elapsed_us()
        per[_category(e.name)] += us / 1e3
        by_name[e.name] = by_name.get(e.name, 0.0) + us / 1e3
        intervals.append((e.time_range.start, e.time_range.end))
    busy = 0.0
    span = 0.0
    if intervals:
        intervals.sort()
        start, end = intervals[0]
        span = (max(e for _, e in intervals) - start) / 1e3
        for s, e in intervals[1:]:
            if s > end:
                busy += end - start
                start, end = s, e
            else:
                end = max(end, e)
        busy = (busy + end - start) / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return {
        "ms": {c: round(v, 4) for c, v in per.items()},
        "gpu_busy_ms": round(busy, 4),
        "gpu_span_ms": round(span, 4),
        "host_gaps_ms": round(max(span - busy, 0.0), 4),
        "kernels": len(kernels),
        "top": [(name[:90], round(ms, 4)) for name, ms in top],
    }


def markdown_section(report: dict) -> list[str]:
    """The "Where the GPU time goes" section of the markdown report (empty without profiles)."""
    rows = []
    for w in report["workloads"]:
        for r in w.get("results", []):
            for cname, c in (r.get("cases") or {}).items():
                p = c.get("profile")
                if not p:
                    continue
                ms = p["ms"]
                cells = [w["name"], cname, r["method"]] + [f"{ms[k]:.3f}" for k in CATEGORIES]
                cells += [f"{p['gpu_busy_ms']:.3f}", f"{p['host_gaps_ms']:.3f}", str(p["kernels"])]
                rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = ["workload", "case", "method", *CATEGORIES, "GPU busy", "host gaps", "kernels"]
    return [
        "", "## Where the GPU time goes (one eager forward, torch.profiler, ms)", "",
        "Kernel time by category (bench/_profile.py says how kernels are sorted); host gaps = GPU idle time "
        "between the forward's first and last kernel, waiting for the host to launch.", "",
        "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3),
    ] + rows
