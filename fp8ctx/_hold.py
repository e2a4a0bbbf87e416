"""Holding: swap planned FP8 stand-ins into modules for the length of a ``with`` block, then undo exactly.

The one mechanism behind both public faces, ``fp8_weights`` and ``functional_call`` (as torch's
``_reparametrize_module`` is behind its ``functional_call``). Every change goes through a
:class:`~fp8ctx._swap.Journal`, which undoes it newest first whatever ends the block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import _fsdp
from ._plan import Plan
from ._swap import Journal, find_slots
from ._tensor import FP8Tensor

__all__ = ["holding"]

logger = logging.getLogger("fp8ctx")


@contextlib.contextmanager
def holding(
    plans: Sequence[Plan], *, compute: str, offload: bool, progress_bar: bool | None = False
) -> Iterator[list[dict[str, FP8Tensor]]]:
    """Hold each plan's entries in its module's weight slots inside the block; restore on exit.

    Weight by weight: make the entry (quantize, or take it from the plan's store), put it (or a wrapper of
    it computing in ``compute`` mode) in every slot that holds the weight, then, with ``offload``, move the
    original's values to host memory. For a meta-device skeleton, the plan's fills (the store's dense
    tensors) go into its other parameters and buffers the same way.

    Args:
        plans: one :class:`~fp8ctx._plan.Plan` per module.
        compute: ``"weight_only"`` or ``"fp8"``, for the stand-ins.
        offload: move originals to (pinned) host memory while held, freeing device memory.
        progress_bar: a bar while quantizing (see ``_progress``).

    Yields:
        Per plan, the entries held, by parameter name.

    Raises:
        Whatever making an entry or swapping raises (then everything done so far is undone first). An
        exception that ends the block propagates unchanged; a failure to restore while it propagates is
        logged, otherwise raised.
    """
    journal = Journal()
    held: list[dict[str, FP8Tensor]] = []
    try:
        for plan in plans:
            slots = find_slots(plan.module, [target.param for target in plan.targets])
            entries: dict[str, FP8Tensor] = {}
            # an entry from a store the caller passed in gets a fresh wrapper (same codes and scales), so that
            # module.half() or .to() inside the block converts the wrapper, not the caller's store; a fresh
            # entry is itself the stand-in, so the store `as` gives shows such conversions
            fresh = plan.store is not None or compute != "weight_only"
            for target, entry in plan.entries(progress_bar):
                record = plan.sharded.get(id(target.param))
                if record is not None:  # FSDP2 swaps the module's slots itself: hold the shard in its record
                    _fsdp.hold_shard(journal, plan.module, record, entry, compute, offload)
                    entries[target.name] = entry
                    continue
                stand_in = entry.with_compute(compute) if fresh else entry
                for owner, attribute in slots[id(target.param)]:
                    journal.swap(owner, attribute, stand_in)
                if offload:
                    journal.offload(target.param)
                entries[target.name] = entry
            _fill(journal, plan)
            held.append(entries)
        if any(plan.sharded for plan in plans):
            _fsdp.reshard_on_exit(journal, [plan.module for plan in plans if plan.sharded])
    except BaseException:
        journal.undo()
        raise
    logger.debug("fp8ctx: holding %d weights as FP8", sum(len(entries) for entries in held))
    try:
        yield held
    except BaseException as error:
        try:
            journal.undo()
        except BaseException:
            # the exception that ended the block propagates unchanged; the restore failure is logged
            logger.exception("fp8ctx: restoring the model failed while %s was propagating", type(error).__name__)
        raise
    journal.undo()


def _fill(journal: Journal, plan: Plan) -> None:
    """Put the store's dense tensors in a meta skeleton's other parameters and buffers (all their slots)."""
    params = [fill for fill in plan.fills if fill.kind == "parameter"]
    buffers = [fill for fill in plan.fills if fill.kind == "buffer"]
    param_slots = find_slots(plan.module, [fill.tensor for fill in params])
    buffer_slots = find_slots(plan.module, [fill.tensor for fill in buffers], buffers=True)
    for fill in params:
        # a Parameter wrapper over the store's tensor (shared storage, no copy), as the slot requires
        stand_in = nn.Parameter(fill.value, requires_grad=False)
        for owner, attribute in param_slots[id(fill.tensor)]:
            journal.swap(owner, attribute, stand_in)
    for fill in buffers:
        value: torch.Tensor = fill.value
        for owner, attribute in buffer_slots[id(fill.tensor)]:
            journal.swap_buffer(owner, attribute, value)
