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
from typing import Callable, NamedTuple

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


class _AtSwap(NamedTuple):
    """What a stand-in was when swapped in, to tell what was done to it inside the block."""

    stride: tuple[int, ...]
    requires_grad: bool
    shared: bool


def _follow_conversion(original: torch.Tensor, current: torch.Tensor, at_swap: _AtSwap) -> None:
    """Apply to ``original`` what was done to its stand-in inside the block: a ``module.to(device / dtype /
    memory_format)``, a ``requires_grad_()`` or a ``share_memory()``.

    The stand-in's FP8 codes moved (see ``FP8Tensor``); the original Parameter, same object, gets the
    same move, so after the block the model is where the user put it, with the original values. Safe to run
    again (a resumed restore): once moved, nothing differs any more.
    """
    if original.is_meta:  # a skeleton's tensor stays on meta: it has no values to move
        return
    # model.requires_grad_(...) inside the block: an FP8 stand-in records the request (it gets no gradient)
    wanted = getattr(current, "requested_grad", None)
    if wanted is None and current.requires_grad != at_swap.requires_grad:
        wanted = current.requires_grad
    if wanted is not None and original.requires_grad != wanted:
        original.requires_grad_(wanted)
    if current.is_shared() and not at_swap.shared and not original.is_shared():
        original.share_memory_()  # model.share_memory() inside the block
    relaid = current.stride() != at_swap.stride and current.stride() != original.stride()
    if original.device == current.device and original.dtype == current.dtype and not relaid:
        return
    with torch.no_grad():
        moved = original.data.to(device=current.device, dtype=current.dtype)
        if relaid:  # module.to(memory_format=...) inside the block
            moved = moved.contiguous(memory_format=_memory_format(current))
        grad = original.grad
        if grad is not None:  # as nn.Module._apply does: a gradient follows its parameter
            original.grad = None
            grad = grad.to(device=current.device, dtype=current.dtype)
        if torch._has_compatible_shallow_copy_type(original, moved):
            original.data = moved
        else:  # module.to("meta") inside: as nn.Module._apply, a new tensor, but kept in the same Parameter object
            torch.utils.swap_tensors(original, nn.Parameter(moved, requires_grad=original.requires_grad))
        if grad is not None:
            original.grad = grad


def _relocate(module: nn.Module, stand_in: torch.Tensor, original: nn.Parameter) -> bool:
    """Put ``original`` wherever ``stand_in`` was moved to under ``module`` inside the block, and say whether
    it was found: ``torch.nn.utils.prune`` keeps it as ``weight_orig``, ``parametrize`` as
    ``parametrizations.weight.original``; after the block they hold the original weight, not the FP8 one."""
    found = False
    for owner in module.modules():
        for name, value in owner._parameters.items():
            if value is stand_in:
                owner._parameters[name] = original
                found = True
    return found


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
        at_swap = _AtSwap(tensor.stride(), tensor.requires_grad, tensor.is_shared())

        def put_back() -> None:  # runs again after an interruption: each step checks what is left to do
            current = module._parameters.get(attribute)
            if current is original:
                return
            if current is tensor:
                _follow_conversion(original, current, at_swap)
            elif _relocate(module, tensor, original):  # pruned or parametrized inside the block
                _follow_conversion(original, tensor, at_swap)
                return
            else:
                logger.warning(
                    "fp8ctx: %s.%s was %s inside the block; the original Parameter is put back",
                    type(module).__name__,
                    attribute,
                    "deleted" if current is None else "reassigned",
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
            # the values are written into new storage first and swapped in by one assignment: an interrupt
            # leaves either the placeholder (and this step, to be run again) or the original values
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

    @property
    def pending(self) -> int:
        """How many recorded changes are not undone yet (0: everything is back)."""
        return len(self._undo)

    def undo(self) -> None:
        """Revert every recorded change, newest first. Resumable: a step leaves the record only once it has
        run, so after an interruption (``KeyboardInterrupt``) calling ``undo()`` again finishes the job. If a
        step fails, the rest still run, the failed ones stay recorded (:attr:`pending`), and the first
        failure is raised."""
        failed: list[Callable[[], None]] = []
        first_error: BaseException | None = None
        try:
            while self._undo:
                step = self._undo[-1]
                try:
                    step()
                except Exception as error:  # keep restoring: a partial restore is the worst outcome
                    failed.append(step)
                    first_error = first_error or error
                    logger.error("fp8ctx: a restore step failed: %r", error)
                self._undo.pop()
        finally:
            # failed steps go back on top (they are newer than the rest): a later undo() retries them first
            self._undo.extend(reversed(failed))
        if first_error is not None:
            raise first_error
