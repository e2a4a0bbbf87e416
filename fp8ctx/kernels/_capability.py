"""Whether the Triton kernels can run here: Triton present, a CUDA (not ROCm) device of sm_89+, FP8 inputs.

Everything in the kernel modules imports without Triton or CUDA (CPU-only CI): ``HAS_TRITON`` is False, the
launchers raise :class:`~fp8ctx.FP8Error` and :func:`is_supported` answers False.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from .._errors import FP8Error

try:  # Triton is optional: the dispatch point falls back to pure torch without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton: Any = None  # type: ignore[no-redef]
    tl: Any = None  # type: ignore[no-redef]
    HAS_TRITON = False

__all__ = ["ACT_DTYPES", "FP8_DTYPES", "HAS_TRITON", "INTERPRET", "is_supported", "require_triton", "tl", "triton"]

# the Triton interpreter (CPU tensors, no PTX) runs the kernels' logic in tests without a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# escape hatch: Triton's stock fp8 conversions instead of the inline-PTX decode
_NO_ASM = os.environ.get("FP8CTX_TRITON_NO_ASM", "0") == "1"

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
ACT_DTYPES = (torch.bfloat16, torch.float16)


def require_triton() -> None:
    """Raises:
    FP8Error: Triton is not importable here (the dispatch point never calls a launcher then)."""
    if not HAS_TRITON:
        raise FP8Error(
            "the fused FP8 kernels need Triton, which is not installed; use fp8ctx.kernels (it falls back to "
            "pure torch) or install triton"
        )


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (cached: asked on every FP8-compute call)."""
    return _capability(device_index(device))


@functools.lru_cache(maxsize=None)
def _name_cuda(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The GPU's name (route choices are remembered per kind of GPU)."""
    return _name_cuda(device_index(device)) if device.type == "cuda" else device.type


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (132 for the interpreter on CPU tensors: an H100/H200's count)."""
    if device.type != "cuda":
        return 132
    return _num_sms_cuda(device_index(device))


def is_supported(x: torch.Tensor, data: torch.Tensor | None = None) -> bool:
    """Whether the Triton fast path applies.

    Args:
        x: the activation ``(..., K)`` for the matmul; or, called with one argument, the FP8 tensor itself
            (dequantize / embedding).
        data: the FP8 weight (2-D for the matmul).

    Returns:
        True when Triton imports, the tensors are on one CUDA (not ROCm) device of compute capability >= 8.9
        (Triton's fp8e4nv needs sm_89), the FP8 tensor is e4m3fn/e5m2 and, for the matmul, ``x`` is bf16/fp16
        and ``data`` is 2-D.
    """
    if not HAS_TRITON or getattr(torch.version, "hip", None):
        return False
    activation: torch.Tensor | None = x if data is not None else None
    weight = data if data is not None else x
    if not isinstance(weight, torch.Tensor) or not weight.is_cuda or weight.dtype not in FP8_DTYPES:
        return False
    if activation is not None:
        if not isinstance(activation, torch.Tensor) or not activation.is_cuda or activation.device != weight.device:
            return False
        if activation.dtype not in ACT_DTYPES or weight.dim() != 2:
            return False
    return _capability(device_index(weight.device)) >= (8, 9)


def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device_index(device)) >= (9, 0)


def use_asm(device: torch.device, want: bool | None = None) -> bool:
    """Whether the inline-PTX decode runs: ``mul.rn.bf16x2`` needs sm_90 and the interpreter cannot run PTX.
    ``want`` None follows the environment (``FP8CTX_TRITON_NO_ASM``); True/False force it where legal."""
    if want is None:
        return not (_NO_ASM or INTERPRET) and _sm90(device)
    return bool(want) and not INTERPRET and _sm90(device)
