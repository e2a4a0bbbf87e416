"""The one check of a device option: every public function taking a device validates it here, when called.

fp8ctx keeps FP8 codes and scales on the CPU or on CUDA devices (its kernels and its pure-torch fallback run
there). A device that is not one of those, does not exist on this machine, or whose backend this torch was
built without would otherwise surface later, deep inside a read or a copy, blaming a file or a tensor.
"""

from __future__ import annotations

import torch

from ._errors import FP8Error

__all__ = ["check_device"]


def check_device(device: object, option: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here and can hold FP8 weights.

    Args:
        device: what the caller passed: a name (``"cpu"``, ``"cuda"``, ``"cuda:1"``), a ``torch.device``,
            or a CUDA index (``0``).
        option: how the caller spells the option, for the message (``"device"``, ``"--device"``).

    Returns:
        The device; ``"cpu:0"`` is returned as ``cpu`` (the one host device).

    Raises:
        FP8Error: not a device, a device type fp8ctx cannot hold weights on (``meta`` has no values), a CUDA
            device on a machine without CUDA, or a CUDA index beyond this machine's devices; names the option,
            what came, what is expected and the way out.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("meta")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        fp8ctx._errors.FP8Error: device='meta': a meta tensor has no values to hold; ...
    """
    expected = "expected 'cpu', 'cuda' or 'cuda:N' (a torch.device or a CUDA index also work)"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise FP8Error(f"{option} must be a device name or torch.device, got {type(device).__name__} {device!r}; {expected}")
    if isinstance(device, int):
        if device < 0:
            raise FP8Error(f"{option}={device!r} is not a device; {expected}")
        device = f"cuda:{device}"  # as torch and transformers read an integer device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FP8Error(f"{option}={device!r} is not a device name; {expected}") from None
    if parsed.type == "cpu":
        if parsed.index not in (None, 0):
            raise FP8Error(f"{option}={device!r}: there is one host device; use device='cpu'")
        return torch.device("cpu")
    if parsed.type == "meta":
        raise FP8Error(
            f"{option}={device!r}: a meta tensor has no values to hold; use 'cpu' or 'cuda' (a meta-device skeleton "
            "runs with a complete store on a real device: fp8_weights(skeleton, store=FP8Store.load(path, device='cuda')))"
        )
    if parsed.type != "cuda":
        raise FP8Error(
            f"{option}={device!r}: fp8ctx holds FP8 weights on cpu or cuda, not {parsed.type}; {expected}"
        )
    if not torch.cuda.is_available():
        raise FP8Error(f"{option}={device!r}: no CUDA device is available here (torch.cuda.is_available() is False); "
                       "use device='cpu'")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise FP8Error(
            f"{option}={device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; pick one of "
            "those (CUDA_VISIBLE_DEVICES renumbers them) or device='cpu'"
        )
    return parsed
