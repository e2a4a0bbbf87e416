"""Launching Triton kernels with little host cost, and the split-K workspace they share.

Triton 3.6's JIT ``run`` binds every argument and builds a launch-metadata dict on each call (~80 µs on the
lent machines' hosts). :class:`FastLaunch` keeps the compiled kernel of each specialisation and calls its
launcher directly from the second call on (bench/KERNEL_NOTES.md has the measurements).
"""

from __future__ import annotations

from typing import Any

import torch

from ._capability import INTERPRET, device_index, triton

__all__ = ["FastLaunch", "workspace"]

Grid = tuple[int, ...]


def _no_hook(hook: object) -> bool:
    # Triton 3.6 keeps launch hooks in an (empty) HookChain, not None
    return hook is None or getattr(hook, "calls", None) == []


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


class FastLaunch:
    """Launch a ``@triton.jit`` kernel, skipping Triton's per-call argument binding once compiled.

    The first call of a specialisation goes through Triton's normal path (compile or cache load) and keeps the
    returned compiled kernel; later calls with the same specialisation key call its launcher directly. The key
    mirrors what Triton specialises on: tensor dtype and 16-byte alignment, int == 1 / % 16 / 64-bit, and the
    constexpr values. Launch hooks (profilers) force the normal path.

    Args:
        fn: the jitted kernel; its constexpr parameters must trail the runtime ones (the launcher takes
            arguments by position).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: dict[tuple[Any, ...], Any] = {}
        try:
            names = list(fn.arg_names)
            self.const_names = [n for n, p in zip(names, fn.params) if p.is_constexpr]
        except AttributeError:  # the interpreter, or Triton internals changed: always the normal path
            self.ok, self.const_names = False, []
            return
        self.ok = not INTERPRET and self.const_names == names[len(names) - len(self.const_names) :]

    def const_values(self, consts: dict[str, Any]) -> tuple[Any, ...]:
        """The constexpr values in launcher order (precomputed by the callers' plan caches)."""
        return tuple(consts[name] for name in self.const_names)

    @staticmethod
    def _spec(args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            (a.dtype, (a.data_ptr() & 15) == 0)
            if isinstance(a, torch.Tensor)
            else (a == 1, (a & 15) == 0, a >= 2**31 or a < -(2**31))
            if isinstance(a, int)
            else a
            for a in args
        )

    def __call__(
        self,
        grid: Grid,
        device: torch.device,
        args: tuple[Any, ...],
        consts: dict[str, Any],
        const_values: tuple[Any, ...],
        num_warps: int,
        num_stages: int,
        key: tuple[Any, ...] | None = None,
    ) -> None:
        """Launch on the current stream. ``key``, when given, stands for everything Triton specialises this
        launch on (a caller that knows which arguments can vary builds it cheaper than ``_spec``)."""
        if not self.ok:
            self.fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
            return
        index = device.index or 0
        if key is None:
            key = (index, self._spec(args), const_values, num_warps, num_stages)
        kernel = self.cache.get(key)
        hooks = triton.knobs.runtime
        if kernel is not None and _no_hook(hooks.launch_enter_hook) and _no_hook(hooks.launch_exit_hook):
            gx, gy, gz = (*grid, 1, 1)[:3]  # the launcher takes all three grid dimensions
            kernel.run(
                gx, gy, gz, _raw_stream(index), kernel.function, kernel.packed_metadata,
                None, None, None, *args, *const_values,
            )  # fmt: skip
            return
        kernel = self.fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        if kernel is not None and hasattr(kernel, "packed_metadata"):
            self.cache[key] = kernel


_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, elements: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 partial-sum workspace and zeroed int32 arrival counters for split-K.

    Cached per (device, stream): the kernel leaves the counters at zero and launches on one stream never
    overlap. Under CUDA-graph capture fresh buffers are allocated (captured as a memset) so the cache never
    holds memory from a graph's private pool.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return (
            torch.empty(elements, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device),
        )
    key = (device, _raw_stream(device_index(device)))
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < elements:
        ws = torch.empty(max(elements, 1 << 20), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < counters:
        cnt = torch.zeros(max(counters, 4096), dtype=torch.int32, device=device)
    _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def launcher(fn: Any) -> FastLaunch | None:
    """A :class:`FastLaunch` for ``fn``, or None without Triton."""
    return FastLaunch(fn) if fn is not None else None
