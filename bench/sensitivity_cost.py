"""What `fp8ctx.sensitivity` and `fp8ctx.plan` cost on the 7B-shaped text tower (one GPU).

The Qwen2.5-VL text tower of ``bench/_workloads.py`` (8 decoder layers at the 7B shape, random weights, bf16),
prefill of T tokens: the time of one plain forward pass, of ``sensitivity`` (exact: one run per weight) and of
``plan`` (sensitivity plus the verifying runs), and the peak memory above the model. Prints JSON.

    python bench/sensitivity_cost.py --tokens 256 --layers 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workloads  # noqa: E402

import fp8ctx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--granularity", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    workload = _workloads.make_text_tower("full" if device.type == "cuda" else "tiny", seed=0, layers=args.layers)
    model = workload.build(device)
    case = next((c for c in workload.cases if c.name == f"T={args.tokens}"), workload.cases[0])
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)

    def run(m: torch.nn.Module) -> torch.Tensor:
        return m(input_ids=ids, use_cache=False).last_hidden_state

    def timed(fn):  # noqa: ANN001, ANN202
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    with torch.no_grad():
        run(model)
        _, forward_s = timed(lambda: run(model))
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fp8ctx.sensitivity(model, run=run, metric="cosine")  # first call: kernels compiled, caches filled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result, sensitivity_s = timed(lambda: fp8ctx.sensitivity(model, run=run, metric="cosine"))
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    chosen, plan_s = timed(lambda: fp8ctx.plan(model, run=run, metric="cosine", max_error=1e-3))
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "case": case.name, "layers": args.layers, "weights": len(result.rows),
        "model_gib": fp8ctx._sensitivity.model_bytes(model) / 2**30,
        "forward_s": forward_s, "sensitivity_s": sensitivity_s, "plan_s": plan_s,
        "sensitivity_peak_above_model_gib": peak / 2**30,
        "plan": str(chosen), "worst_rows": [(r.name, r.error) for r in result.rows[-5:]],
    }, indent=1))


if __name__ == "__main__":
    main()
