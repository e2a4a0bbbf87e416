"""The thread contract: `fp8_weights` on a held model raises at once; `functional_call`s on one model serialize.

Each test runs its threads from a barrier with a tiny switch interval, so that they interleave inside entry and
exit; all are bounded (joins with timeouts).
"""

from __future__ import annotations

import faulthandler
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

import fp8ctx
from fp8ctx import FP8Error, FP8Store, FP8Tensor, fp8_weights, functional_call

THREADS = 4
ROUNDS = 10
JOIN_SECONDS = 60  # all threads together; a loaded CI machine (12 pytest-xdist workers) is slow, not stuck


@pytest.fixture(autouse=True)
def interleave() -> Iterator[None]:
    """Switch threads every microsecond instead of every 5 ms, so races show within a few rounds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


def run_threads(work: Callable[[int], None], count: int = THREADS) -> list[BaseException]:
    """Run ``work(i)`` in ``count`` threads started together; the errors they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        barrier.wait(timeout=10)
        try:
            work(index)
        except BaseException as error:  # collected for the test to judge
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_SECONDS
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:  # say where each thread is before failing, so that a hang on any machine names its cause
        pytest.fail(f"threads {stuck} still run after {JOIN_SECONDS} s; every thread's stack:\n{all_stacks()}")
    return errors


def all_stacks() -> str:
    """Every thread's Python stack, as faulthandler prints them (it needs a real file)."""
    with tempfile.TemporaryFile("w+") as file:
        faulthandler.dump_traceback(file, all_threads=True)
        file.seek(0)
        return file.read()


@pytest.mark.parametrize("originals", ["keep", "cpu"])
@pytest.mark.parametrize("second", ["same module", "a child", "the parent"])
def test_a_second_fp8_weights_on_a_held_model_raises_at_once_in_any_thread(second, originals):
    net = encoder()
    before = snapshot(net)
    targets = {"same module": lambda: net, "a child": lambda: net[2], "the parent": lambda: nn.Sequential(net)}
    for _ in range(ROUNDS):
        inside, most_inside = [0], [0]
        lock = threading.Lock()

        def work(index: int) -> None:
            module = net if index % 2 == 0 else targets[second]()
            with fp8_weights(module, originals=originals):
                held = [layer.weight for layer in module.modules() if isinstance(layer, nn.Linear)]
                assert all(isinstance(weight, FP8Tensor) for weight in held)
                with lock:
                    inside[0] += 1
                    most_inside[0] = max(most_inside[0], inside[0])
                time.sleep(0.01)  # the others try to enter meanwhile
                with lock:
                    inside[0] -= 1

        errors = run_threads(work)
        assert most_inside[0] == 1, "two blocks held one model at once"
        assert all(isinstance(error, FP8Error) for error in errors), errors
        assert errors and all("held already" in str(error) or "already held" in str(error) for error in errors)
        assert_restored(net, before)


@pytest.mark.parametrize("calls", ["same module", "parent and child"])
def test_functional_calls_from_several_threads_serialize_and_each_output_is_all_fp8(calls):
    net = encoder()
    store = FP8Store.from_module(net, granularity="channel")
    child_store = FP8Store({"weight": store["2.weight"]})
    x = torch.randn(4, 16)
    hidden = torch.randn(4, 32)
    expected = functional_call(net, store, x)  # alone: every weight FP8
    expected_child = functional_call(net[2], child_store, hidden)
    before = snapshot(net)
    outputs: list[tuple[int, torch.Tensor]] = []

    def work(index: int) -> None:
        for _ in range(ROUNDS):
            if calls == "parent and child" and index % 2:
                outputs.append((1, functional_call(net[2], child_store, hidden)))
            else:
                outputs.append((0, functional_call(net, store, x)))

    errors = run_threads(work)
    assert errors == []
    assert len(outputs) == THREADS * ROUNDS
    for which, out in outputs:
        assert torch.equal(out, expected_child if which else expected)
    assert_restored(net, before)


@pytest.mark.parametrize("thread", ["same thread", "another thread"])
def test_functional_call_on_a_model_held_by_a_block_raises_at_once(thread):
    net = encoder()
    store = FP8Store.from_module(net)
    before = snapshot(net)
    errors: list[BaseException] = []
    with fp8_weights(net):
        if thread == "same thread":
            with pytest.raises(FP8Error, match="held already by fp8_weights"):
                functional_call(net, store, torch.randn(2, 16))
        else:
            errors = run_threads(lambda _: functional_call(net, store, torch.randn(2, 16)), count=1)
            assert len(errors) == 1 and isinstance(errors[0], FP8Error), errors
            assert "held already by fp8_weights" in str(errors[0]) and "MainThread" in str(errors[0])
    assert_restored(net, before)


def test_a_functional_call_nested_in_one_on_the_same_modules_raises_instead_of_deadlocking():
    net = encoder()
    store = FP8Store.from_module(net)
    before = snapshot(net)

    class Calls(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return functional_call(net, store, x)

    wrapper = nn.Sequential(Calls(), net)  # the wrapper's tree contains net
    wrapper_store = FP8Store({f"1.{name}": entry for name, entry in store.items()})
    errors = run_threads(lambda _: functional_call(wrapper, wrapper_store, torch.randn(2, 16)), count=1)
    assert len(errors) == 1 and isinstance(errors[0], FP8Error) and "this thread" in str(errors[0]), errors
    assert_restored(net, before)


def test_a_stuck_thread_fails_the_test_with_every_threads_stack(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "JOIN_SECONDS", 0.5)
    release = threading.Event()

    def waits_for_release(index: int) -> None:
        release.wait(timeout=30)

    try:
        with pytest.raises(pytest.fail.Exception) as caught:
            run_threads(waits_for_release, count=2)
    finally:
        release.set()
    assert "still run after 0.5 s" in str(caught.value)
    assert str(caught.value).count("in waits_for_release") == 2  # where each stuck thread is


def test_a_call_waiting_for_one_that_ends_without_restoring_finishes_its_restore_and_runs(monkeypatch):
    net = encoder()
    store = FP8Store.from_module(net)
    x = torch.randn(2, 16)
    expected = functional_call(net, store, x)
    before = snapshot(net)
    running = threading.Event()

    class Slow(nn.Module):  # the first call: runs while the second thread starts waiting for it
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            running.set()
            time.sleep(0.3)
            return self.net(inputs)

    slow = Slow()
    real_undo = fp8ctx._swap.Journal.undo
    failing = {"left": 2}  # the first call's end tries twice: both fail, so it ends without restoring

    def undo(journal):  # type: ignore[no-untyped-def]
        if failing["left"] and threading.current_thread() is threading.main_thread():
            failing["left"] -= 1
            raise RuntimeError("disk gone")
        return real_undo(journal)

    monkeypatch.setattr(fp8ctx._swap.Journal, "undo", undo)
    outputs: list[torch.Tensor] = []

    def second(index: int) -> None:
        running.wait(timeout=10)
        outputs.append(functional_call(net, store, x))  # waits for the first call, which never notifies it

    waiter = threading.Thread(target=second, args=(0,))
    waiter.start()
    with pytest.raises(RuntimeError, match="disk gone"):
        functional_call(slow, {"net." + k: v for k, v in store.items()}, x)
    waiter.join(timeout=30)
    assert not waiter.is_alive(), all_stacks()
    assert len(outputs) == 1 and torch.equal(outputs[0], expected)
    assert_restored(net, before)


@pytest.mark.parametrize("overlap", ["same module", "block on a child", "call on a child"])
def test_functional_calls_and_blocks_mixed_on_overlapping_modules_never_interleave(overlap):
    net = encoder()
    store = FP8Store.from_module(net, granularity="channel")
    child_store = FP8Store({"weight": store["2.weight"]})
    x, hidden = torch.randn(4, 16), torch.randn(4, 32)
    expected, expected_child = functional_call(net, store, x), functional_call(net[2], child_store, hidden)
    before = snapshot(net)
    outputs: list[tuple[str, torch.Tensor]] = []
    held_inside: list[bool] = []

    def work(index: int) -> None:
        for _ in range(ROUNDS):
            try:
                if index % 2 == 0:
                    if overlap == "call on a child":
                        outputs.append(("child", functional_call(net[2], child_store, hidden)))
                    else:
                        outputs.append(("net", functional_call(net, store, x)))
                else:
                    module = net[2] if overlap == "block on a child" else net
                    with fp8_weights(module, granularity="channel"):
                        layers = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
                        held_inside.append(all(isinstance(layer.weight, FP8Tensor) for layer in layers))
                        time.sleep(0.001)
            except FP8Error as error:  # the one allowed outcome besides success: refused at once, named
                assert "held already" in str(error) or "already held" in str(error), error

    assert run_threads(work) == []
    assert all(held_inside)
    for which, out in outputs:  # every call ran entirely on FP8 weights, never on a block's or a mix
        assert torch.equal(out, expected_child if which == "child" else expected)
    assert_restored(net, before)


def test_a_call_running_generators_in_another_thread_is_never_taken_for_an_ended_one():
    # what tells a running functional_call from one that ended without restoring: its frame on its thread's stack.
    # Read from another thread while the first runs generator expressions (as model code does), the walk used to
    # stop at a suspended generator's frame and call the running call ended (296 in 345,253 looks in one second)
    from fp8ctx._claims import _running

    started, stop = threading.Event(), threading.Event()
    frames = []

    def body() -> None:
        frames.append(sys._getframe())
        started.set()
        while not stop.is_set():
            sum(value for value in range(20))

    worker = threading.Thread(target=body)
    worker.start()
    started.wait()
    looks, ended = 0, 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            looks += 1
            ended += not _running(frames[0], worker)
    finally:
        stop.set()
        worker.join()
    assert looks > 1000 and ended == 0
    assert not _running(frames[0], worker)  # once the thread has ended, so has the call
