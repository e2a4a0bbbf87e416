#!/usr/bin/env python3
"""Probe: does the measured route agree with each route's time inside a CUDA graph, shape by shape?

For DiT and text-tower shapes at several token counts: bf16 F.linear, the fused W8A16 kernel and dequantize +
cuBLAS, each timed (a) as `_route` times it (CUDA events, L2 evicted before each run) and (b) 10 calls captured in a
CUDA graph with L2 evicted before each (bench/_measure.Dev.time_graph); then what `_route.choose` picks, three times from an empty cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch
import torch.nn.functional as F

from _measure import Dev

from fp8ctx._layout import FP8Layout
from fp8ctx._numerics import compute_scale, quantize
from fp8ctx.kernels import _route
from fp8ctx.kernels._triton import w8a16_linear

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (4608, 3584), (37888, 3584), (3584, 18944)]
TOKENS = [64, 256, 1024, 4352]


def main():
    dev = torch.device("cuda")
    layout = FP8Layout("channel")
    flush = _route._flush_buffer(dev)
    gpu = Dev(dev)
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'T':>5} {'N':>6} {'K':>6} | route-timer: bf16 fused dequant | graph: bf16 fused dequant | chosen x3")
    for n, k in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        s = compute_scale(w, layout)
        q = quantize(w, s, layout)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
        for t in TOKENS:
            x = torch.randn(t, k, device=dev, dtype=torch.bfloat16)
            runs = {
                "bf16": lambda: F.linear(x, w, bias),
                "fused": lambda: w8a16_linear(x, q, s, layout, bias, route="fused"),
                "dequant": lambda: w8a16_linear(x, q, s, layout, bias, route="dequant"),
            }
            for r in runs.values():
                r()
            timer = {name: _route._time_ms(r, flush) for name, r in runs.items()}
            graph = {name: gpu.time_graph(r, calls=10) for name, r in runs.items()}
            chosen = []
            for _ in range(3):
                _route._routes.clear()
                _route.resolved.clear()
                w8a16_linear(x, q, s, layout, bias)
                chosen.append(next(iter(_route._routes.values())))
            print(f"{t:>5} {n:>6} {k:>6} | " + " ".join(f"{timer[m]:.3f}" for m in runs) + " | "
                  + " ".join(f"{graph[m]:.3f}" for m in runs) + " | " + " ".join(chosen), flush=True)


if __name__ == "__main__":
    main()
