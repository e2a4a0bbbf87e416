"""Memory and speed of a Qwen3-MoE-shaped block held as FP8, against bf16 (issue 13).

The block is transformers' own ``Qwen3MoeSparseMoeBlock`` with Qwen3-30B-A3B's sizes (hidden 2048, 128 experts,
8 active per token, expert intermediate size 768), random weights (normal, std 0.02), bf16, built in code.
For each experts implementation transformers ships (``eager`` loop, ``batched_mm`` gather, ``grouped_mm``) and
each token count, it times a forward (CUDA events, median of ``--repeat`` after warm-up) and records the device
memory: the weights resident while held (FP8 codes + scales; originals offloaded with ``originals="cpu"``) and
the peak during the forward above that. Output error: relative L2 of each FP8 output against the bf16 output.

Usage (GPU):  python bench/moe.py --out /tmp/moe.json --markdown /tmp/moe.md
CPU smoke:    python bench/moe.py --device cpu --tiny        (toy sizes; times meaningless, no memory figures)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8ctx  # noqa: E402

QWEN3_30B_A3B = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)
TINY = dict(hidden_size=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32)
# batched_mm gathers one (out, in) matrix per routed token, in bf16 as in FP8: 8 x 1536 x 2048 x 2 B = 50 MB a
# token for the up projection; above this many tokens it is not a sensible choice on any storage
BATCHED_MM_MAX_TOKENS = 64


def build_block(sizes: dict, device: str) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(**sizes, norm_topk_prob=True)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config).to(device=device, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
    return block


def available_implementations(wanted: list[str]) -> list[str]:
    """The wanted experts implementations this transformers offers (``eager`` always)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return [name for name in wanted if name == "eager" or name in ALL_EXPERTS_FUNCTIONS]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run, device: str, repeat: int) -> float:
    """Median milliseconds of ``run()`` after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            run()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def peak_above(run, device: str) -> int | None:
    """Bytes allocated at the peak of one ``run()``, above what was allocated before it."""
    if not device.startswith("cuda"):
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated() - base


def measure(block, methods, implementations, token_counts, device, repeat) -> list[dict]:
    hidden = block.experts.hidden_dim
    inputs = {n: torch.randn(1, n, hidden, device=device, dtype=torch.bfloat16) for n in token_counts}
    rows: list[dict] = []
    references: dict[tuple[str, int], torch.Tensor] = {}
    for method in methods:
        context = (
            fp8ctx.fp8_weights(block, granularity=method.split("-")[1], block_size=128, originals="cpu")
            if method != "bf16"
            else None
        )
        if context is not None:
            context.__enter__()
        try:
            synchronize(device)
            resident = torch.cuda.memory_allocated() if device.startswith("cuda") else None
            for implementation in implementations:
                block.experts.config._experts_implementation = implementation
                for tokens in token_counts:
                    if implementation == "batched_mm" and tokens > BATCHED_MM_MAX_TOKENS:
                        continue
                    x = inputs[tokens]

                    def run(x=x):
                        with torch.no_grad():
                            return block(x)

                    out = run()
                    key = (implementation, tokens)
                    if method == "bf16":
                        references[key] = out.float()
                    reference = references[key]
                    error = float((out.float() - reference).norm() / reference.norm())
                    rows.append(
                        {
                            "method": method,
                            "implementation": implementation,
                            "tokens": tokens,
                            "ms": timed(run, device, repeat),
                            "resident_bytes": resident,
                            "peak_above_bytes": peak_above(run, device),
                            "relative_l2_vs_bf16": error,
                        }
                    )
                    del out
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    return rows


def environment(device: str) -> dict:
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "backend": fp8ctx.kernels.get_backend(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def markdown(rows: list[dict], env: dict, sizes: dict) -> str:
    def mib(n):
        return "-" if n is None else f"{n / 2**20:,.0f}"

    bf16 = {(r["implementation"], r["tokens"]): r for r in rows if r["method"] == "bf16"}
    lines = [
        f"Qwen3-MoE block ({sizes}), random weights, bf16 activations; {env['device']}, {env['date']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}; `python bench/moe.py`.",
        "",
        "| method | experts impl | tokens | ms | x bf16 | resident MiB | peak above MiB | rel. L2 vs bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = bf16[(r["implementation"], r["tokens"])]
        lines.append(
            f"| {r['method']} | {r['implementation']} | {r['tokens']} | {r['ms']:.2f} | {r['ms'] / base['ms']:.2f} | "
            f"{mib(r['resident_bytes'])} | {mib(r['peak_above_bytes'])} | {r['relative_l2_vs_bf16']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--tokens", default="1,32,512", help="comma-separated token counts")
    parser.add_argument("--implementations", default="eager,batched_mm,grouped_mm")
    parser.add_argument("--methods", default="bf16,fp8ctx-channel,fp8ctx-block")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    sizes = TINY if args.tiny else QWEN3_30B_A3B
    methods = args.methods.split(",")
    if methods[0] != "bf16":
        parser.error("--methods must start with bf16 (the reference)")
    block = build_block(sizes, args.device)
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    implementations = available_implementations(args.implementations.split(","))
    rows = measure(
        block, methods, implementations, [int(n) for n in args.tokens.split(",")], args.device,
        args.repeat,
    )
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "sizes": sizes, "rows": rows}, indent=1))
    table = markdown(rows, env, sizes)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
