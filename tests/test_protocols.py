"""Every tensor protocol on a held weight gives dequantized values that stay valid, or raises FP8Error naming
the weight; never a crash, never garbage, and the exit stays exact. Cases that crashed the interpreter run in a
subprocess, so a segfault fails the test instead of killing pytest."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from conftest import assert_restored, reference_qdq, snapshot
from torch import nn

from fp8ctx import FP8Store, FP8Tensor, fp8_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def expected_weight(net: nn.Module) -> torch.Tensor:
    return reference_qdq(net[0].weight)


# -- protocols that give values: read-only NumPy arrays, lists, pickles --------------------------------

VALUE_PROTOCOLS = {
    "np.asarray(weight)": lambda w: np.asarray(w),
    "weight.numpy()": lambda w: w.numpy(),
    "weight.detach().numpy()": lambda w: w.detach().numpy(),
    "np.asarray(weight.T)": lambda w: np.asarray(w.T).T,
    "weight.T.numpy()": lambda w: w.T.numpy().T,
    "weight[0:16].numpy()": lambda w: w[0:16].numpy(),
}


@pytest.mark.parametrize("read", VALUE_PROTOCOLS.values(), ids=VALUE_PROTOCOLS.keys())
def test_numpy_exports_give_dequantized_values_in_read_only_arrays(read):
    net = model()
    before = snapshot(net)
    expected = expected_weight(net)
    with fp8_weights(net):
        array = read(net[0].weight)
        assert np.array_equal(array, expected.numpy())
        with pytest.raises(ValueError, match="read-only"):  # a write could only reach a temporary copy
            array[0, 0] = 1.0
        copied = np.array(net[0].weight)  # an explicit copy is the user's own
        copied[0, 0] = 1.0
    assert np.array_equal(array, expected.numpy())  # stays valid after the block
    assert_restored(net, before)


PICKLES = {
    "pickle a weight": lambda w, net: pickle.loads(pickle.dumps(w)),
    "torch.save a weight": lambda w, net: _torch_round_trip(w),
    "torch.save state_dict()": lambda w, net: _torch_round_trip(net.state_dict())["0.weight"],
    "pickle a store": lambda w, net: pickle.loads(pickle.dumps(FP8Store({"0.weight": w})))["0.weight"],
}


def _torch_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("round_trip", PICKLES.values(), ids=PICKLES.keys())
def test_pickling_a_held_weight_round_trips_the_fp8_weight(round_trip):
    net = model()
    before = snapshot(net)
    expected = expected_weight(net)
    with fp8_weights(net):
        loaded = round_trip(net[0].weight, net)
    assert isinstance(loaded, FP8Tensor) and loaded.param_name == "0.weight"
    assert torch.equal(loaded.dequantize(), expected)
    assert_restored(net, before)
    fresh = model()
    fresh[0].weight.data.zero_()
    fresh[0].load_state_dict({"weight": loaded, "bias": fresh[0].bias.detach().clone()})  # into a dense model
    assert torch.equal(fresh[0].weight, expected)


# -- protocols that would hand out memory: refused with FP8Error --------------------------------------

# run in a subprocess: before the fix several of these crashed the interpreter
_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from torch import nn
    import fp8ctx
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    weight, bits = net[0].weight, net[0].weight.detach().clone()
    with fp8ctx.fp8_weights(net):
        try:
            result = eval(sys.argv[1], {"np": np, "torch": torch, "w": net[0].weight, "net": net})
            print("RESULT", type(result).__name__)
        except fp8ctx.FP8Error as error:
            print("FP8Error", error)
    assert net[0].weight is weight and torch.equal(weight, bits), "exit not exact"
    print("EXACT")
    """
)


def run_child(expression: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, expression], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


REFUSED = [
    "torch.from_dlpack(w)",
    "np.from_dlpack(w)",
    "w.__dlpack__()",
    "torch.from_dlpack(w.T)",
    "np.from_dlpack(w[0])",
    "w.untyped_storage()",
    "w.storage()",
    "torch.empty(0).set_(w.untyped_storage())",
]


@pytest.mark.parametrize("expression", REFUSED)
def test_protocols_that_hand_out_memory_raise_fp8error_naming_the_weight(expression):
    done = run_child(expression)
    assert done.returncode == 0, f"crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    assert "FP8Error" in done.stdout and "'0.weight'" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "EXACT" in done.stdout


def test_data_ptr_is_the_address_of_the_fp8_codes():
    net = model()
    with fp8_weights(net):
        weight = net[0].weight
        assert weight.data_ptr() == weight.qdata.data_ptr() != 0  # alignment checks get a real address
    assert net[0].weight.data_ptr() != 0


def test_share_memory_inside_shares_the_fp8_data_and_the_original_on_exit():
    done = run_child("net.share_memory()")
    assert done.returncode == 0, f"crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    assert "RESULT Sequential" in done.stdout and "EXACT" in done.stdout, done.stdout + done.stderr[-2000:]
    net = model()
    before = snapshot(net)
    with fp8_weights(net):
        net.share_memory()
        assert net[0].weight.is_shared() and net[0].weight.qdata.is_shared()
        assert torch.equal(net[0].weight.dequantize(), expected_weight(net))
    assert_restored(net, before)
    assert all(p.is_shared() for p in net.parameters())  # as net.share_memory() outside the block gives


# -- changes made to the module inside the block ------------------------------------------------------


def test_module_to_meta_inside_is_followed_by_the_originals():
    net = model()
    weights = [p for p in net.parameters()]
    with fp8_weights(net):
        net.to("meta")
    # held weights stay the same Parameter objects (torch itself replaces the biases' objects: a move to meta
    # cannot be done in place)
    assert net[0].weight is weights[0] and net[2].weight is weights[2]
    assert all(type(p) is nn.Parameter and p.is_meta for p in net.parameters())  # as net.to("meta") outside


@pytest.mark.parametrize("frozen", [False, True], ids=["unfreeze", "freeze"])
def test_requires_grad_changes_inside_survive_exit_for_held_weights_like_for_others(frozen):
    net = model()
    net.requires_grad_(frozen)  # start from the opposite
    with fp8_weights(net):
        net.requires_grad_(not frozen)
    assert [p.requires_grad for p in net.parameters()] == [not frozen] * 4


REMOVALS = {
    "del layer.weight": lambda layer: delattr(layer, "weight"),
    "prune.l1_unstructured": lambda layer: prune.l1_unstructured(layer, "weight", amount=0.5),
    "parametrize.register_parametrization": lambda layer: parametrize.register_parametrization(
        layer, "weight", nn.Identity()
    ),
}


@pytest.mark.parametrize("remove", REMOVALS.values(), ids=REMOVALS.keys())
def test_weights_moved_or_removed_inside_hold_the_original_after_exit_not_the_fp8_weight(remove):
    net = model()
    weight = net[0].weight
    bits = weight.detach().clone()
    with fp8_weights(net):
        remove(net[0])
    held = [p for m in net.modules() for p in m._parameters.values() if isinstance(p, FP8Tensor)]
    assert held == []
    assert any(p is weight for p in net.parameters())  # as weight, weight_orig or parametrizations.weight.original
    assert torch.equal(weight, bits)
    net(torch.randn(2, 8))  # the model still runs
