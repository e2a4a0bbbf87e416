"""Module mechanics: the only place that writes ``module._parameters``, ``module._buffers`` or a Parameter's
storage.

Every change goes through a :class:`Journal`, which records how to undo it *before* making it. ``undo()``
replays the record in reverse order, so a half-done swap (an error or ``KeyboardInterrupt`` between two
steps) is rolled back exactly like a finished one, and the very same Parameter objects go back in place.
Nothing here registers hooks, sets attributes on modules, or changes a class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

__all__ = ["ABSENT", "Journal", "find_slots"]

logger = logging.getLogger("fp8ctx")

Slot = tuple[nn.Module, str]

ABSENT = object()
"""For :meth:`Journal.set_attributes`: the attribute is absent (deleted, or deleted again on undo)."""


def find_slots(root: nn.Module, parameters: Iterable[torch.Tensor], buffers: bool = False) -> dict[int, list[Slot]]:
    """Every ``(module, attribute)`` under ``root`` that holds one of ``parameters`` (or, with ``buffers``,
    one of those buffers), keyed by ``id``.

    A tied weight (``lm_head.weight is embed_tokens.weight``) has several slots; swapping all of them with
    one object keeps it tied.
    """
    wanted = {id(p) for p in parameters}
    slots: dict[int, list[Slot]] = {key: [] for key in wanted}
    for module in root.modules():
        for attribute, value in (module._buffers if buffers else module._parameters).items():
            if value is not None and id(value) in wanted:
                slots[id(value)].append((module, attribute))
    return slots


def _placeholder(param: torch.Tensor) -> torch.Tensor:
    """One NaN broadcast to ``param``'s shape: keeps its metadata, frees its storage, and is loudly wrong
    if anything still holding the detached original computes with it."""
    return torch.full((1,), float("nan"), dtype=param.dtype, device=param.device).expand(param.shape)


def _follow_conversion(original: torch.Tensor | None, current: torch.Tensor, layout_at_swap: tuple[int, ...]) -> None:
    """Apply to ``original`` a ``module.to(device / dtype / memory_format)`` that happened to its stand-in
    inside the block.

    The stand-in's FP8 codes moved (see ``FP8Tensor``); the original Parameter, same object, gets the
    same move, so after the block the model is where the user put it, with the original values.
    """
    relaid = current.stride() != layout_at_swap
    if original is None or original.is_meta:  # a skeleton's tensor stays on meta: it has no values to move
        return
    if original.device == current.device and original.dtype == current.dtype and not relaid:
        return
    with torch.no_grad():
        moved = original.data.to(device=current.device, dtype=current.dtype)
        if relaid:  # module.to(memory_format=...) inside the block
            moved = moved.contiguous(memory_format=_memory_format(current))
        original.data = moved
        if original.grad is not None:  # as nn.Module._apply does: a gradient follows its parameter
            original.grad = original.grad.to(device=current.device, dtype=current.dtype)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A flat uint8 tensor over all of ``storage`` (for copying it whole)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class Journal:
    """Records reversible changes to modules and Parameters; :meth:`undo` reverts them in reverse order.

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> weight = layer.weight
        >>> journal = Journal()
        >>> try:
        ...     journal.swap(layer, "weight", torch.nn.Parameter(torch.zeros(2, 4)))
        ... finally:
        ...     journal.undo()
        >>> layer.weight is weight
        True
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def swap(self, module: nn.Module, attribute: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` in ``module._parameters[attribute]`` (no hooks fire, no attribute is added)."""
        original = module._parameters[attribute]
        layout_at_swap = tensor.stride()

        def put_back() -> None:
            current = module._parameters[attribute]
            if current is tensor:
                _follow_conversion(original, current, layout_at_swap)
            else:
                logger.warning(
                    "fp8ctx: %s.%s was reassigned inside the block; the original Parameter is put back",
                    type(module).__name__,
                    attribute,
                )
            module._parameters[attribute] = original

        self._undo.append(put_back)
        module._parameters[attribute] = tensor

    def swap_buffer(self, module: nn.Module, attribute: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` in ``module._buffers[attribute]`` (a meta skeleton's buffer, filled from a store);
        on undo the original buffer object goes back, whatever the block assigned there."""
        original = module._buffers[attribute]

        def put_back() -> None:
            module._buffers[attribute] = original

        self._undo.append(put_back)
        module._buffers[attribute] = tensor

    def offload(self, param: nn.Parameter) -> None:
        """Move ``param``'s values to (pinned) host memory and free its device storage, keeping the object.

        On undo the exact bits come back to the original device, in a tensor of the original strides.
        Parameters already on the CPU (or on meta: a skeleton) are left as they are: there is no device
        memory to free.
        """
        if param.device.type in ("cpu", "meta"):
            return
        original = param.data
        pinned = torch.cuda.is_available() and param.device.type == "cuda"
        host = torch.empty_strided(original.size(), original.stride(), dtype=original.dtype, pin_memory=pinned)
        host.copy_(original, non_blocking=pinned)
        device, size, stride = original.device, original.size(), original.stride()
        del original

        def bring_back() -> None:
            restored = torch.empty_strided(size, stride, dtype=host.dtype, device=device)
            restored.copy_(host, non_blocking=pinned)
            param.data = restored

        self._undo.append(bring_back)
        param.data = _placeholder(param)

    def set_attributes(self, owner: object, values: dict[str, object]) -> None:
        """Set attributes of ``owner`` (not a module: another library's bookkeeping object); undo puts the
        old values back, deleting those that were absent. A value of :data:`ABSENT` deletes the attribute."""
        old = {name: getattr(owner, name, ABSENT) for name in values}

        def put_back() -> None:
            for name, value in old.items():
                if value is ABSENT:
                    if hasattr(owner, name):
                        delattr(owner, name)
                else:
                    setattr(owner, name, value)

        self._undo.append(put_back)
        for name, value in values.items():
            if value is ABSENT:
                if hasattr(owner, name):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)

    def on_undo(self, step: Callable[[], None]) -> None:
        """Run ``step`` when undoing, before every change recorded until now (newest first)."""
        self._undo.append(step)

    def offload_storage(self, tensor: torch.Tensor) -> None:
        """Copy ``tensor``'s storage to (pinned) host memory and free it on the device, keeping every tensor
        object that views it (its size drops to 0; undo brings back the same bytes into the same storage).

        For storage shared by objects fp8ctx must not replace (an FSDP2 shard and its DTensor parameter).
        CPU storage is left as it is.
        """
        storage = tensor.untyped_storage()
        if tensor.device.type == "cpu" or storage.nbytes() == 0:
            return
        device, size = tensor.device, storage.nbytes()
        pinned = torch.cuda.is_available() and device.type == "cuda"
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        host.copy_(_bytes_of(storage, device))

        def bring_back() -> None:
            storage.resize_(size)
            _bytes_of(storage, device).copy_(host)

        self._undo.append(bring_back)
        storage.resize_(0)

    def undo(self) -> None:
        """Revert every recorded change, newest first; if some step fails, the rest still run, then the
        first failure is raised."""
        first_error: BaseException | None = None
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except BaseException as error:  # keep restoring: a partial restore is the worst outcome
                logger.error("fp8ctx: a restore step failed: %r", error)
                first_error = first_error or error
        if first_error is not None:
            raise first_error
