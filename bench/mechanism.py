"""Measure the candidate mechanisms for holding weights as FP8 inside a block (docs/design.md).

Candidates, all dequantizing with the same pure-torch formula so only the mechanism differs:
  subclass   fp8ctx's FP8Tensor in the parameter slot (__torch_function__ / __torch_dispatch__)
  hooks      temporary forward pre/post hooks; between calls the slot holds the raw FP8 codes as a
             Parameter (scales kept aside), the pre-hook puts a dense copy in, the post-hook takes it out
  funccall   the slot holds the raw FP8 codes; each layer runs through torch.func.functional_call with a
             dense copy (an instance-level forward override, removed in finally)
  plain      the unquantized model (reference)

Figures: per-layer-call overhead over plain (tiny layers, so the mechanism dominates), and, for each
candidate, what a caller sees of `model.dtype`, of a weight read outside forward, and after an exception
raised mid-forward. Usage: python bench/mechanism.py [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8ctx  # noqa: E402
from fp8ctx import kernels  # noqa: E402


def make_model(width: int, depth: int, device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(device, torch.bfloat16).eval()


@contextlib.contextmanager
def hooks_mechanism(model: nn.Module):
    """Temporary hooks, removed in finally: the FP8 stand-in sits in the slot between calls."""
    store = fp8ctx.FP8Store.from_module(model)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    originals = [m._parameters["weight"] for m in layers]
    handles = []

    entries = {}

    def pre(module, args):
        module._parameters["weight"] = nn.Parameter(entries[module].dequantize(), requires_grad=False)

    def post(module, args, output):
        module._parameters["weight"] = nn.Parameter(entries[module].qdata, requires_grad=False)

    try:
        for layer, name in zip(layers, store):
            entries[layer] = store[name]
            layer._parameters["weight"] = nn.Parameter(store[name].qdata, requires_grad=False)
            handles.append(layer.register_forward_pre_hook(pre))
            handles.append(layer.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, original in zip(layers, originals):
            layer._parameters["weight"] = original


@contextlib.contextmanager
def funccall_mechanism(model: nn.Module):
    """Each layer's forward replaced (per instance) by torch.func.functional_call with its dense weight."""
    store = fp8ctx.FP8Store.from_module(model)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    originals = [m._parameters["weight"] for m in layers]
    try:
        for layer, name in zip(layers, store):
            entry = store[name]
            layer._parameters["weight"] = nn.Parameter(entry.qdata, requires_grad=False)
            plain_forward = layer.forward

            def forward(x, layer=layer, entry=entry, plain_forward=plain_forward):
                with _without_override(layer, plain_forward):
                    return torch.func.functional_call(layer, {"weight": entry.dequantize()}, (x,))

            layer.forward = forward
        yield
    finally:
        for layer, original in zip(layers, originals):
            layer.__dict__.pop("forward", None)
            layer._parameters["weight"] = original


@contextlib.contextmanager
def _without_override(layer: nn.Module, plain_forward):
    override = layer.__dict__.pop("forward")
    try:
        yield
    finally:
        layer.forward = override


MECHANISMS = {
    "plain": contextlib.nullcontext,
    "subclass": lambda model: fp8ctx.fp8_weights(model, originals="keep", progress_bar=False),
    "hooks": hooks_mechanism,
    "funccall": funccall_mechanism,
}


def time_calls(model: nn.Module, x: torch.Tensor, device: str, repeats: int) -> float:
    """Median wall time of one forward (µs), synchronizing on CUDA."""
    samples = []
    with torch.no_grad():
        for _ in range(10):
            model(x)
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def observe(name: str, device: str) -> dict[str, str]:
    """What a caller sees inside the block, and after an exception raised mid-forward."""
    model = make_model(16, 3, device)
    ids = [id(p) for p in model.parameters()]
    bits = [p.detach().clone() for p in model.parameters()]
    seen: dict[str, str] = {}
    with MECHANISMS[name](model):
        seen["first param dtype inside"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        try:
            read = model[1].weight * 1
            seen["weight read outside forward"] = f"{str(read.dtype).removeprefix('torch.')}"
        except Exception as error:  # noqa: BLE001
            seen["weight read outside forward"] = f"error: {type(error).__name__}"
    handle = model[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("mid-forward")))
    try:
        with MECHANISMS[name](model):
            model(torch.randn(2, 16, device=device, dtype=torch.bfloat16))
    except RuntimeError:
        pass
    handle.remove()
    exact = [id(p) for p in model.parameters()] == ids and all(torch.equal(a, b) for a, b in zip(bits, model.parameters()))
    seen["exact after mid-forward error"] = "yes" if exact else "no"
    leftovers = [k for m in model.modules() for k in vars(m) if k.startswith("_fp8") or k == "forward"]
    seen["leftover attributes"] = ", ".join(leftovers) or "none"
    return seen


def host_ladder(device: str, repeats: int, profile_path: str | None) -> dict[str, float]:
    """Host cost of one held Linear call on the default (fused) path, and of each layer beneath it.

    Each figure is the wall time per call of ``repeats`` back-to-back calls with one synchronize at the end:
    the layers are tiny (one 64x64 weight, batch 1), so the GPU waits on the host and wall time is host time.
    """
    from fp8ctx.kernels import _impl

    layer = make_model(64, 1, device)[0]
    x = torch.randn(1, 64, device=device, dtype=torch.bfloat16)
    rows: dict[str, float] = {}

    def per_call(fn) -> float:
        for _ in range(50):
            fn()
        best = float("inf")
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) * 1e6 / repeats)
        return best

    weight, bias = layer.weight.detach(), layer.bias.detach()
    with torch.no_grad():
        rows["plain nn.Linear call"] = per_call(lambda: layer(x))
        rows["F.linear (bf16)"] = per_call(lambda: torch.nn.functional.linear(x, weight, bias))
        with fp8ctx.fp8_weights(layer, granularity="channel", originals="keep") as store:
            held = layer.weight
            entry = store["weight"]
            data, scale = entry.qdata, entry.scale
            layout = entry.fp8_layout
            rows["held nn.Linear call (fp8ctx)"] = per_call(lambda: layer(x))
            rows["F.linear on the held weight"] = per_call(lambda: torch.nn.functional.linear(x, held, bias))
            rows["kernels.linear (dispatch point)"] = per_call(
                lambda: kernels.linear(x, data, scale, layout, torch.bfloat16, bias))
            rows["_impl.linear (implementation)"] = per_call(
                lambda: _impl.linear(x, data, scale, layout, torch.bfloat16, bias))
            rows["torch.ops.fp8ctx.linear (registered op)"] = per_call(
                lambda: torch.ops.fp8ctx.linear(x, data, scale, 1, 128, torch.bfloat16, bias))
            module = _impl.triton_module()
            if module is not None and device == "cuda":
                from fp8ctx.kernels import _plan, _w8a16

                rows["_triton.w8a16_linear (routing + checks)"] = per_call(
                    lambda: module.w8a16_linear(x, data, scale, layout, bias))
                rows["_w8a16.fused_linear (launch only)"] = per_call(
                    lambda: _w8a16.fused_linear(x, data, scale, layout, bias, _plan.CFG_T16))
            if profile_path:
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(repeats):
                    layer(x)
                profiler.disable()
                with open(profile_path, "w") as stream:
                    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
    rows["op dispatch overhead (op - implementation)"] = (
        rows["torch.ops.fp8ctx.linear (registered op)"] - rows["_impl.linear (implementation)"])
    rows["held call over plain call"] = rows["held nn.Linear call (fp8ctx)"] - rows["plain nn.Linear call"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--profile", help="write a cProfile of held-layer calls on the fast path here")
    args = parser.parse_args()
    device = args.device
    width, depth = 64, 16
    x = torch.randn(1, width, device=device, dtype=torch.bfloat16)
    results: dict[str, dict] = {}
    with kernels.use_backend("torch"):  # same dequantization everywhere: only the mechanism differs
        plain_us = time_calls(make_model(width, depth, device), x, device, args.repeats)
        for name in MECHANISMS:
            model = make_model(width, depth, device)
            with MECHANISMS[name](model):
                total = time_calls(model, x, device, args.repeats)
            results[name] = {
                "forward_us": total,
                "overhead_per_layer_us": (total - plain_us) / depth,
                **observe(name, device),
            }
    # the dequantization alone, for scale: one bf16 copy of a 64x64 weight
    weight = make_model(width, 1, device)[0].weight
    entry = fp8ctx.FP8Store.from_module(make_model(width, 1, device))["0.weight"]
    with kernels.use_backend("torch"):
        start = time.perf_counter()
        for _ in range(args.repeats):
            entry.dequantize()
        if device == "cuda":
            torch.cuda.synchronize()
    dequant_us = (time.perf_counter() - start) * 1e6 / args.repeats
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "layers": depth, "width": width, "dequantize_us": dequant_us}
    ladder = host_ladder(device, max(args.repeats, 1000), args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "host_ladder_us": ladder}, indent=2))
    print(f"{meta['device']}, torch {meta['torch']}, {depth} Linear({width},{width}) layers, batch 1, bf16;"
          f" one 64x64 pure-torch dequantize: {dequant_us:.1f} us")
    columns = ["forward_us", "overhead_per_layer_us", "first param dtype inside", "weight read outside forward",
               "exact after mid-forward error", "leftover attributes"]
    print("mechanism  " + " | ".join(columns))
    for name, row in results.items():
        print(f"{name:<10} " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    print("host cost per call on the default path (us):")
    for name, us in ladder.items():
        print(f"  {name:<45} {us:8.2f}")


if __name__ == "__main__":
    main()
