"""Holding: the one swap-in / restore mechanism behind `fp8_weights` and `functional_call`."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

from fp8ctx import FP8Config, FP8Store, FP8Tensor, fp8_weights, functional_call
from fp8ctx import _hold, _plan, _swap
from fp8ctx._hold import holding
from fp8ctx._plan import Plan


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4, bias=False))
    net[3].weight = net[2].weight  # tied: one target, two slots
    return net


class Boom(Exception):
    pass


@pytest.mark.parametrize("given_store", [False, True], ids=["quantizing", "store"])
def test_every_slot_holds_the_stand_in_inside_and_the_same_objects_come_back(given_store):
    net = model()
    store = FP8Store.from_module(net) if given_store else None
    before = snapshot(net)
    with holding([Plan.make(net, FP8Config(), store)], compute="weight_only", offload=True) as held:
        (entries,) = held
        assert list(entries) == ["0.weight", "2.weight"]
        assert net[3]._parameters["weight"] is net[2]._parameters["weight"]  # still tied
        for layer, name in ((net[0], "0.weight"), (net[2], "2.weight")):
            stand_in = layer._parameters["weight"]
            assert isinstance(stand_in, FP8Tensor) and stand_in.qdata is entries[name].qdata
            # a given store's entries are wrapped afresh; freshly made ones are swapped in themselves
            assert (stand_in is entries[name]) != given_store
    assert_restored(net, before)


def test_a_failure_while_swapping_in_undoes_what_was_done(monkeypatch):
    net = model()
    before = snapshot(net)
    real = _plan.quantize_target
    calls = []

    def second_fails(target, config):
        calls.append(target.name)
        if len(calls) == 2:  # the first weight is swapped in (and offloaded) already
            raise Boom()
        return real(target, config)

    monkeypatch.setattr(_plan, "quantize_target", second_fails)
    with pytest.raises(Boom):
        with holding([Plan.make(net, FP8Config())], compute="weight_only", offload=True):
            pytest.fail("the block must not run")
    assert calls == ["0.weight", "2.weight"]
    assert_restored(net, before)


def test_the_exception_that_ends_the_block_propagates_and_a_failed_restore_is_logged(monkeypatch, caplog):
    net = model()
    raised = Boom("in the block")
    real_undo = _swap.Journal.undo

    def undo_then_fail(journal):
        real_undo(journal)
        raise RuntimeError("restore failed")

    monkeypatch.setattr(_swap.Journal, "undo", undo_then_fail)
    with caplog.at_level(logging.ERROR, logger="fp8ctx"), pytest.raises(Boom) as caught:
        with holding([Plan.make(net, FP8Config())], compute="weight_only", offload=False):
            raise raised
    assert caught.value is raised
    assert "restoring the model failed while Boom was propagating" in caplog.text
    with pytest.raises(RuntimeError, match="restore failed"):  # nothing propagating: the failure is raised
        other = model()  # `net` stays claimed: as far as the journal knows, its restore failed
        with holding([Plan.make(other, FP8Config())], compute="weight_only", offload=False):
            pass


def test_both_public_faces_hold_through_the_one_mechanism(monkeypatch):
    net = model()
    store = FP8Store.from_module(net)
    used = []
    real = _hold.Hold.enter

    def recording(hold, plans):
        used.append((hold._claim.kind, len(plans), hold._offload, hold._compute))
        return real(hold, plans)

    monkeypatch.setattr(_hold.Hold, "enter", recording)
    x = torch.randn(2, 4)
    out = functional_call(net, store, x)
    with fp8_weights(net, store=store, originals="keep"):
        assert torch.equal(net(x), out)
    assert used == [("functional_call", 1, False, "weight_only"), ("fp8_weights", 1, False, "weight_only")]
