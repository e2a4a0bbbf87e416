"""Holding: swap planned FP8 stand-ins into modules for the length of a block, then undo exactly.

The one mechanism behind both public faces, ``fp8_weights`` and ``functional_call`` (as torch's
``_reparametrize_module`` is behind its ``functional_call``). A :class:`Hold` claims its modules (``_claims``:
the thread contract), records every change in a :class:`~fp8ctx._swap.Journal` before making it, and undoes
it newest first; its restore is resumable, so an interrupt (a second Ctrl-C during exit) never strands the
model: calling :meth:`Hold.restore` again finishes the job.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import _fsdp
from ._claims import Claim, owners_of, tree
from ._errors import FP8Error
from ._plan import Plan
from ._swap import Journal, find_slots
from ._tensor import FP8Tensor

__all__ = ["Hold", "holding"]

logger = logging.getLogger("fp8ctx")


class Hold:
    """One holding of planned weights: claim, swap in, restore (resumably).

    Args:
        kind: ``"fp8_weights"`` (a conflicting claim raises at once) or ``"functional_call"`` (waits for
            other threads' calls on the same modules).
        compute: ``"weight_only"`` or ``"fp8"``, for the stand-ins.
        offload: move originals to (pinned) host memory while held, freeing device memory.
        progress_bar: a bar while quantizing (see ``_progress``).
    """

    def __init__(self, kind: str, *, compute: str, offload: bool, progress_bar: bool | None = False) -> None:
        self._claim = Claim(kind)
        self._journal = Journal()
        self._compute = compute
        self._offload = offload
        self._progress_bar = progress_bar

    def claim_tree(self, module: nn.Module) -> None:
        """Claim ``module`` and everything under it before planning (``functional_call``, which calls this
        itself: its frame is recorded, to tell a call that ended without restoring from a running one).

        Raises:
            FP8Error: a conflict that is not waited for (see ``_claims``).
        """
        self._claim.bind_call(sys._getframe(1), self.restore)  # finished by the next holder if the call ends first
        self._claim.take(tree(module), wait=self._claim.kind == "functional_call")

    def enter(self, plans: Sequence[Plan]) -> list[dict[str, FP8Tensor]]:
        """Claim the modules owning the planned weights, then, weight by weight, make the entry (quantize, or
        take it from the plan's store), put it (or a wrapper of it computing in ``compute`` mode) in every
        slot that holds the weight, and with ``offload`` move the original's values to host memory.

        For a meta-device skeleton, the plan's fills (the store's dense tensors) go into its other parameters
        and buffers the same way; FSDP2 shards are held in FSDP's own record (``_fsdp``).

        Nothing is undone here on failure: the caller calls :meth:`restore` (or :meth:`close`).

        Returns:
            Per plan, the entries held, by parameter name.

        Raises:
            FP8Error: a module held already (see ``_claims``); whatever making an entry or swapping raises.
        """
        for plan in plans:
            names = tree(plan.module)
            found = find_slots(plan.module, [target.param for target in plan.targets])
            self._claim.take(owners_of((slot for each in found.values() for slot in each), names), wait=False)
        # planning read the slots before the claim: another thread may have swapped in since (then a weight
        # is missing from its slots, or sits in a module this claim does not hold)
        slots = [find_slots(plan.module, [target.param for target in plan.targets]) for plan in plans]
        for plan, found in zip(plans, slots):
            for target in plan.targets:
                owners = [owner for owner, _ in found[id(target.param)]]
                if id(target.param) in plan.sharded:  # FSDP2 keeps its own record of the slots
                    continue
                if not owners or not all(self._claim.holds(owner) for owner in owners):
                    raise FP8Error(
                        f"weight {target.name!r} is held already by another fp8_weights() or functional_call(): "
                        "another thread took it while this one was planning; one holder per module at a time"
                    )
        held: list[dict[str, FP8Tensor]] = []
        for plan, found in zip(plans, slots):
            entries: dict[str, FP8Tensor] = {}
            held.append(entries)
            # an entry from a store the caller passed in gets a fresh wrapper (same codes and scales), so that
            # module.half() or .to() inside the block converts the wrapper, not the caller's store; a fresh
            # entry is itself the stand-in, so the store `as` gives shows such conversions
            fresh = plan.store is not None or self._compute != "weight_only"
            for target, entry in plan.entries(self._progress_bar):
                record = plan.sharded.get(id(target.param))
                if record is not None:  # FSDP2 swaps the module's slots itself: hold the shard in its record
                    _fsdp.hold_shard(self._journal, plan.module, record, entry, self._compute, self._offload)
                    entries[target.name] = entry
                    continue
                stand_in = entry.with_compute(self._compute) if fresh else entry
                for owner, attribute in found[id(target.param)]:
                    self._journal.swap(owner, attribute, stand_in)
                if self._offload:
                    self._journal.offload(target.param)
                entries[target.name] = entry
            _fill(self._journal, plan)
        if any(plan.sharded for plan in plans):
            _fsdp.reshard_on_exit(self._journal, [plan.module for plan in plans if plan.sharded])
        logger.debug("fp8ctx: holding %d weights as FP8", sum(len(entries) for entries in held))
        return held

    @property
    def restored(self) -> bool:
        """Whether every change is undone and the modules are no longer claimed."""
        return not self._journal.pending and not self._claim.held

    def restore(self) -> None:
        """Undo every change, newest first, then release the claim. Resumable and idempotent: after an
        interruption, calling it again finishes; once done, it does nothing.

        Raises:
            Whatever a restore step raised (the other steps still ran; the failed ones stay pending).
        """
        self._journal.undo()
        self._claim.release()  # only once everything is back: a waiting call must find the originals

    def close(self, propagating: BaseException | None) -> None:
        """:meth:`restore`, carried on through interrupts until done, which are then raised.

        Args:
            propagating: the exception ending the block, if any: it wins, and a restore failure is logged.
        """
        interrupt: BaseException | None = None
        while True:
            try:
                self.restore()
                break
            except (KeyboardInterrupt, SystemExit) as error:  # the model first, then the interrupt
                interrupt = interrupt or error
            except Exception:
                if propagating is None:
                    raise
                # the exception that ended the block propagates unchanged; the restore failure is logged
                logger.exception(
                    "fp8ctx: restoring the model failed while %s was propagating", type(propagating).__name__
                )
                break
        if interrupt is not None and propagating is None:
            raise interrupt

    def end_call(self, propagating: BaseException | None) -> None:
        """``functional_call``'s end: :meth:`close`, made to finish even if an interrupt stops ``close`` itself
        between its steps (it is run once more); if the modules still are not restored (a restore step fails,
        or interrupts keep coming), it is logged and the exception leaving the call says so in a note; the next
        holder of those modules finishes the restore first (``_claims``: the call's frame has ended).

        Args:
            propagating: the exception ending the call, if any (as for :meth:`close`).
        """
        try:
            self.close(propagating)
        finally:
            if not self.restored:
                self._close_again(propagating)

    def _close_again(self, propagating: BaseException | None) -> None:
        try:
            self.close(propagating)
        finally:
            if not self.restored:
                self._say_unfinished()

    def _say_unfinished(self) -> None:
        message = (
            f"fp8ctx: {self._claim.kind}() could not finish restoring its module ({self._journal.pending} changes "
            "pending): it holds FP8 stand-ins until the next fp8_weights() or functional_call() on it, which "
            "finishes the restore first"
        )
        logger.error(message)
        in_flight = sys.exc_info()[1]
        if in_flight is not None:
            in_flight.add_note(message)


@contextlib.contextmanager
def holding(
    plans: Sequence[Plan], *, compute: str, offload: bool, progress_bar: bool | None = False
) -> Iterator[list[dict[str, FP8Tensor]]]:
    """Hold each plan's entries in its module's weight slots inside the block; restore on exit (as
    ``fp8_weights`` does, without its resumable object: for internal callers and tests).

    Yields:
        Per plan, the entries held, by parameter name.

    Raises:
        Whatever making an entry or swapping raises (then everything done so far is undone first). An
        exception that ends the block propagates unchanged; a failure to restore while it propagates is
        logged, otherwise raised.
    """
    hold = Hold("fp8_weights", compute=compute, offload=offload, progress_bar=progress_bar)
    error: BaseException | None = None
    try:
        yield hold.enter(plans)
    except BaseException as raised:
        error = raised
        raise
    finally:
        hold.close(error)


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
