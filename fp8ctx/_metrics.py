"""The measurements a report makes: weight SQNR, output error against a reference, and a bit-level fingerprint
of a model (identity, metadata and a checksum of every parameter and buffer)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

__all__ = ["OutputReport", "compare_outputs", "fingerprint", "weight_error"]


@dataclasses.dataclass(frozen=True)
class OutputReport:
    """The model's output with FP8 weights against the unquantized run on the same inputs."""

    relative_l2: float
    cosine: float
    max_abs_error: float
    psnr_db: float | None
    ssim: float | None = None
    """Mean SSIM over images (torchmetrics; None without it, or for outputs that are not images)."""


@torch.no_grad()
def weight_error(original: torch.Tensor, restored: torch.Tensor) -> tuple[float, float]:
    """SQNR in dB (+inf when exact) and relative L2 error of ``restored`` against ``original``."""
    # float64 sums: squared errors of millions of elements would lose digits in float32
    reference = original.double()
    noise = (restored.double() - reference).square().sum().item()
    signal = reference.square().sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    relative = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    return sqnr, relative


@torch.no_grad()
def compare_outputs(actual: torch.Tensor, expected: torch.Tensor) -> OutputReport:
    """``actual`` against ``expected``: relative L2, cosine, largest error, PSNR for images and videos."""
    a, e = actual.double().flatten(), expected.double().flatten()
    relative = ((a - e).norm() / e.norm()).item() if e.norm() > 0 else float((a - e).norm())
    # two all-zero outputs are the same output; cosine_similarity would call them orthogonal
    both_zero = a.numel() and not a.any() and not e.any()
    cosine = 1.0 if both_zero else torch.nn.functional.cosine_similarity(a, e, dim=0).item()
    max_abs = (a - e).abs().max().item() if a.numel() else 0.0
    psnr = None
    if expected.dim() >= 4:  # images (B, C, H, W) and videos (B, C, T, H, W)
        peak = (e.max() - e.min()).item()
        mse = (a - e).square().mean().item()
        psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse) if peak > 0 else None
    return OutputReport(relative, cosine, max_abs, psnr)


_CHECKSUM_CHUNK = 1 << 24  # elements widened to int64 at a time: bounds the checksum's own memory


@torch.no_grad()
def _checksum(tensor: torch.Tensor) -> tuple[int, int]:
    """Two integer sums over a tensor's raw bits (any dtype): any flipped bit changes the first, the
    position-weighted second also catches values moved around."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    try:
        words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    except RuntimeError:  # storage offset not 4-byte aligned: sum the bytes instead
        words = raw
    total = weighted = 0
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        chunk = words[start : start + _CHECKSUM_CHUNK].long()
        position = torch.arange(start, start + chunk.numel(), device=chunk.device) % 65521 + 1
        total += int(chunk.sum())
        weighted += int((chunk * position).sum())
    return total, weighted


def fingerprint(model: nn.Module) -> list[tuple[Any, ...]]:
    """Identity, metadata and a checksum of the bits of every parameter and buffer."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [
        (name, id(t), t.dtype, t.device, tuple(t.shape), t.stride(), _checksum(t)) for name, t in tensors
    ]


def format_bytes(n: float) -> str:
    """``n`` bytes as the tables print them (``"512 B"``, ``"1.50 MiB"``; GiB at most)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
