#!/usr/bin/env python3
"""Probe: can the weight-only dequantize pass hide behind the previous layer's GEMM on a second stream?

A chain of Linears at the Qwen-Image DiT's image-stream shapes (q, k, v, out, mlp up, mlp down per block) and the
Qwen2.5-VL text tower's, run three ways, timed eagerly with CUDA events (median of N):
  bf16        F.linear with dense bf16 weights (the reference)
  serial      dequantize(w_i) then F.linear, one stream (fp8ctx's dequantize route today)
  prefetch    w_{i+1} dequantized on a side stream into one of two reused buffers while GEMM i runs
Prints per-chain milliseconds and ratios to bf16. One call, no arguments: python3 bench/overlap_probe.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from fp8ctx import kernels
from fp8ctx._layout import FP8Layout
from fp8ctx._numerics import compute_scale, quantize

DIT = [(3072, 3072)] * 4 + [(12288, 3072), (3072, 12288)]
TOWER = [(3584 + 2 * 512, 3584), (3584, 3584), (2 * 18944, 3584), (3584, 18944)]


def chain(shapes, blocks, device):
    layout = FP8Layout("channel")
    ws, qs = [], []
    for _ in range(blocks):
        for n, k in shapes:
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            ws.append(w)
            scale = compute_scale(w, layout)
            qs.append((quantize(w, scale, layout), scale))
    return ws, qs, layout


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def run(name, shapes, blocks, tokens, device):
    ws, qs, layout = chain(shapes, blocks, device)
    x0 = torch.randn(tokens, max(k for _, k in shapes), device=device, dtype=torch.bfloat16)
    xs = {k: x0[:, :k].contiguous() for _, k in shapes}
    side = torch.cuda.Stream(device)

    def bf16():
        for w in ws:
            F.linear(xs[w.shape[1]], w)

    def serial():
        for data, scale in qs:
            w = kernels.dequantize(data, scale, layout, torch.bfloat16)
            F.linear(xs[w.shape[1]], w)

    def dequant_direct(i):
        data, scale = qs[i]
        return kernels.dequantize(data, scale, layout, torch.bfloat16)

    def prefetch():
        main = torch.cuda.current_stream(device)
        ready = [None] * len(qs)
        with torch.cuda.stream(side):
            side.wait_stream(main)
            ready[0] = dequant_direct(0)
        ev = side.record_event()
        for i in range(len(qs)):
            main.wait_event(ev)
            w = ready[i]
            w.record_stream(main)
            if i + 1 < len(qs):
                with torch.cuda.stream(side):
                    ready[i + 1] = dequant_direct(i + 1)
                ev = side.record_event()
            F.linear(xs[w.shape[1]], w)
            ready[i] = None

    ms = {f.__name__: timed(f) for f in (bf16, serial, prefetch)}
    base = ms["bf16"]
    print(f"{name:<24} T={tokens:<5} " + "  ".join(f"{k} {v:7.3f} ms ({v / base:.3f}x)" for k, v in ms.items()),
          flush=True)


def main():
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), torch.__version__)
    for tokens in (4352, 1280):
        run("dit image stream x4", DIT, 4, tokens, device)
    for tokens in (256, 1024, 4096):
        run("text tower x8", TOWER, 8, tokens, device)


if __name__ == "__main__":
    main()
