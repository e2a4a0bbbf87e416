"""The whole model's memory before and inside ``fp8_weights``, stated honestly for where the model lives.

Holding as FP8 saves memory only where the dense originals can leave: on an accelerator with
``originals="cpu"`` they go to host memory. On the CPU they have nowhere to go, so the FP8 copies sit beside
them; the way to a reduction there is never to load the dense weights (a meta skeleton run from a complete
store). :class:`MemoryReport` says which case a report is in, with the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._metrics import format_bytes as _size

__all__ = ["MemoryReport", "PeakMeter", "params_and_buffers"]


def params_and_buffers(model: nn.Module) -> tuple[int, int]:
    """Bytes of the model's parameters and of its buffers (each tensor once, tied weights once)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


class PeakMeter:
    """Measures the peak device memory of code run inside :meth:`measure` (CUDA only; None elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.peaks: list[int | None] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if not self.cuda:
            self.peaks.append(None)
            yield
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.peaks.append(torch.cuda.max_memory_allocated(self.device))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """The whole model before and inside the block: FP8 bytes, what stays dense, the totals, and (on a GPU)
    the measured peaks of the plain and the FP8 run.

    Example:
        >>> memory = MemoryReport("cpu", "cpu", params_bytes=16896, buffers_bytes=0, fp8_bytes=4352, dense_params_bytes=512)
        >>> memory.reduced, memory.inside_bytes          # on the CPU the originals stay: FP8 sits beside them
        (False, 21248)
    """

    device: str
    originals: str
    params_bytes: int  # every parameter, as loaded
    buffers_bytes: int
    fp8_bytes: int  # held FP8 codes + scales
    dense_params_bytes: int  # parameters left dense
    peak_plain: int | None = None  # measured device peak of the plain run (None off CUDA)
    peak_fp8: int | None = None  # of the run inside fp8_weights

    @property
    def before_bytes(self) -> int:
        """The whole model as loaded: parameters and buffers."""
        return self.params_bytes + self.buffers_bytes

    @property
    def held_bytes(self) -> int:
        """The model as FP8 holds it: FP8 weights, parameters left dense, buffers."""
        return self.fp8_bytes + self.dense_params_bytes + self.buffers_bytes

    @property
    def reduced(self) -> bool:
        """Whether the originals leave the model's device inside the block (an accelerator, originals='cpu')."""
        return self.device not in ("cpu", "meta") and self.originals == "cpu"

    @property
    def inside_bytes(self) -> int:
        """What the model's device holds inside the block: the held model when the originals leave, else the
        originals plus the FP8 copies."""
        return self.held_bytes if self.reduced else self.before_bytes + self.fp8_bytes

    def lines(self) -> list[str]:
        """The memory section of a report, as text lines."""
        lines = [
            f"  memory, whole model on {self.device}: {_size(self.before_bytes)} before "
            f"({_size(self.params_bytes)} parameters + {_size(self.buffers_bytes)} buffers)",
            f"  held as FP8: {_size(self.fp8_bytes)} FP8 + {_size(self.dense_params_bytes)} parameters kept dense + "
            f"{_size(self.buffers_bytes)} buffers = {_size(self.held_bytes)} "
            f"({self.held_bytes / max(self.before_bytes, 1):.1%} of before)",
        ]
        if self.reduced:
            lines.append(f"  inside fp8_weights the device holds {_size(self.inside_bytes)}; the originals wait in host memory")
        elif self.device in ("cpu", "meta"):
            lines.append(
                f"  on the CPU memory is NOT reduced: originals='cpu' has nowhere to move CPU weights, so the FP8 copies "
                f"sit beside them ({_size(self.inside_bytes)} inside the block). For a reduction never load the dense "
                "weights: build the model on the meta device and run it from a complete store "
                "(FP8Store.from_checkpoint(skeleton, path) or `fp8ctx quantize`; see the README's memory recipe)"
            )
        else:
            lines.append(
                f"  originals='keep' leaves the dense weights on {self.device}: the device holds "
                f"{_size(self.inside_bytes)} inside the block, more than before; originals='cpu' frees them"
            )
        if self.peak_plain is not None and self.peak_fp8 is not None:
            lines.append(
                f"  measured peak device memory: {_size(self.peak_plain)} plain run, {_size(self.peak_fp8)} with FP8 "
                "weights (entering included)"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "before_bytes": self.before_bytes,
            "held_bytes": self.held_bytes,
            "inside_bytes": self.inside_bytes,
            "reduced": self.reduced,
        }


