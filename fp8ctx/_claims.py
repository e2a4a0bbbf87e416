"""Who holds which modules right now: the thread contract of ``fp8_weights`` and ``functional_call``.

Holding swaps stand-ins into shared module objects, so two holders of one module must never interleave. Each
holder first *claims* the modules it will change, atomically under one process-wide lock:

- ``fp8_weights`` claims the modules whose weights it holds; if any of them is claimed already (by another
  block or a running ``functional_call``, in any thread), it raises at once: a block is long-lived, waiting for
  one could wait forever.
- ``functional_call`` claims its module and everything under it; while another thread's ``functional_call``
  holds any of those, it waits for it to finish (calls on one model run one at a time, each entirely on FP8
  weights); a conflicting ``fp8_weights`` block, or a claim of its own thread (a call nested in a call on the
  same modules), raises at once instead of deadlocking.

A claim is a token: taking it and releasing it are each one step under the lock, and releasing one that was
never taken, or twice, is a no-op, so an interrupted restore can release it again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from torch import nn

from ._errors import FP8Error

__all__ = ["Claim", "owners_of", "tree"]

_lock = threading.Condition()
_owners: dict[int, Claim] = {}  # id(module) -> the claim holding it; a claimed module is alive (its holder refers to it)


def tree(module: nn.Module) -> dict[nn.Module, str]:
    """``module`` and every module under it, with their names (what a ``functional_call`` claims)."""
    return {sub: name for name, sub in module.named_modules(remove_duplicate=True)}


class Claim:
    """One holder's claim on a set of modules, by ``kind`` (``"fp8_weights"`` or ``"functional_call"``).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> first, second = Claim("fp8_weights"), Claim("fp8_weights")
        >>> first.take({layer: "layer"}, wait=False)
        >>> second.take({layer: "layer"}, wait=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        fp8ctx._errors.FP8Error: module 'layer' (Linear) is held already by fp8_weights() in this thread; ...
        >>> first.release(); second.take({layer: "layer"}, wait=False); second.release()
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.thread = threading.current_thread()
        self._modules: list[nn.Module] = []  # keeps claimed modules alive, so their ids stay theirs

    def take(self, modules: dict[nn.Module, str], *, wait: bool) -> None:
        """Claim ``modules`` (module -> name for messages), all or none.

        Args:
            modules: the modules to claim.
            wait: wait while another thread's ``functional_call`` holds one of them (``functional_call``);
                otherwise any conflict raises at once.

        Raises:
            FP8Error: a conflict that is not waited for; names the module, the holder and its thread.
        """
        with _lock:
            while True:
                conflict = next(((m, name) for m, name in modules.items() if _owners.get(id(m), self) is not self), None)
                if conflict is None:
                    break
                holder = _owners[id(conflict[0])]
                if not (wait and holder.kind == "functional_call" and holder.thread is not self.thread):
                    raise _conflict_error(conflict[0], conflict[1], holder, self.kind)
                _lock.wait()
            self._modules.extend(modules)  # first: an interrupt in between leaves nothing release() misses
            for module in modules:
                _owners[id(module)] = self

    def release(self) -> None:
        """Give back every module this claim holds (none: nothing happens) and wake waiting calls."""
        with _lock:
            for module in self._modules:
                if _owners.get(id(module)) is self:
                    del _owners[id(module)]
            self._modules = []
            _lock.notify_all()

    def holds(self, module: nn.Module) -> bool:
        """Whether this claim holds ``module``."""
        with _lock:
            return _owners.get(id(module)) is self

    @property
    def held(self) -> bool:
        """Whether this claim still holds any module."""
        with _lock:
            return any(_owners.get(id(module)) is self for module in self._modules)


def owners_of(slots: Iterable[tuple[nn.Module, str]], names: dict[nn.Module, str]) -> dict[nn.Module, str]:
    """The modules owning ``slots``, named by ``names`` (their names under the root), for :meth:`Claim.take`."""
    return {module: names.get(module, type(module).__name__) for module, _ in slots}


def _conflict_error(module: nn.Module, name: str, holder: Claim, kind: str) -> FP8Error:
    own = holder.thread is threading.current_thread()
    where = "this thread" if own else f"thread {holder.thread.name!r}"
    if kind == "fp8_weights":
        way_out = "one fp8_weights() per module at a time: enter it once and share the block, or wait for it to end"
    elif own:
        way_out = "a functional_call() cannot run inside another hold of the same modules in its own thread"
    else:
        way_out = "functional_call() waits only for other functional_call()s; end the fp8_weights() block first"
    return FP8Error(
        f"module {name or '(root)'!r} ({type(module).__name__}) is held already by {holder.kind}() in {where}; "
        f"{way_out}"
    )
