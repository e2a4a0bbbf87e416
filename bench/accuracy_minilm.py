"""Accuracy of FP8 schemes and of planned exclusions on the trained all-MiniLM-L6-v2 (CPU, a few minutes).

The model and 64 varied sentences are those of ``tests/_minilm.py``; the reference is the fp32 model's
mean-pooled sentence embeddings. Prints a Markdown table (docs/accuracy.md holds a run of it):

    python bench/accuracy_minilm.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _minilm  # noqa: E402

import fp8ctx  # noqa: E402


def main() -> None:
    model, batch = _minilm.load()
    whole = fp8ctx._sensitivity.model_bytes(model)

    def run(m: nn.Module) -> torch.Tensor:
        return _minilm.embed(m, batch)

    with torch.no_grad():
        expected = run(model)

    def row(label: str, **options: object) -> None:
        with torch.no_grad(), fp8ctx.fp8_weights(model, **options) as store:
            actual = run(model)
        cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
        saved = sum(entry.numel() * 4 - entry.nbytes for entry in store.values())
        print(f"| {label} | {cosine.mean():.5f} | {cosine.min():.5f} | {saved / whole:.1%} | {len(store)} |")

    embeddings = fp8ctx.DEFAULT_LAYERS + (nn.Embedding,)
    print(f"whole model: {whole / 2**20:.2f} MiB (fp32), {len(_minilm.SENTENCES)} sentences\n")
    print("| held as FP8 | mean cosine | min cosine | saved of the whole model | weights |")
    print("| --- | ---: | ---: | ---: | ---: |")
    row("Linear, e4m3, tensor scale", granularity="tensor")
    row("Linear, e4m3, channel scales (the default)", granularity="channel")
    row("Linear, e4m3, 128x128 blocks", granularity="block", block_size=128)
    row("Linear, e4m3, 32x32 blocks", granularity="block", block_size=32)
    row("Linear, e5m2, tensor scale", storage_dtype="e5m2", granularity="tensor")
    row("Linear, e5m2, channel scales", storage_dtype="e5m2", granularity="channel")
    row("Linear + Embedding, e4m3, tensor scale", layers=embeddings, granularity="tensor")
    row("Linear + Embedding, e4m3, channel scales", layers=embeddings, granularity="channel")
    row("Embedding tables only, e4m3, tensor scale", layers=nn.Embedding, granularity="tensor")
    for granularity in ("tensor", "channel"):
        for budget in (0.002, 0.001):
            start = time.perf_counter()
            chosen = fp8ctx.plan(model, run=run, metric="cosine", max_error=budget, granularity=granularity)
            seconds = time.perf_counter() - start
            row(f"plan(max_error={budget}, granularity={granularity!r}) ({seconds:.0f} s)", exclude=chosen,
                granularity=granularity)


if __name__ == "__main__":
    main()
