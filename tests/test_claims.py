"""The thread contract: `fp8_weights` on a held model raises at once; `functional_call`s on one model serialize.

Each test runs its threads from a barrier with a tiny switch interval, so that they interleave inside entry and
exit; all are bounded (joins with timeouts).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

from fp8ctx import FP8Error, FP8Store, FP8Tensor, fp8_weights, functional_call

THREADS = 4
ROUNDS = 10


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
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a thread is stuck (deadlock)"
    return errors


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
