"""The plan record: store matching, the overlap check, entries made one at a time or taken from a store."""

from __future__ import annotations

import logging

import pytest
import torch
from test_exclude import Codec
from test_select import zoo
from torch import nn

import fp8ctx
from conftest import assert_restored, reference_qdq, snapshot
from fp8ctx import FP8Config, FP8Error, FP8Store, _plan
from fp8ctx._plan import Plan, check_overlap, targets_from_store


def test_targets_from_store_checks_names_shapes_dtypes_and_devices():
    model = zoo()
    store = FP8Store.from_module(model)
    assert [t.name for t in targets_from_store(model, store)] == list(store)
    assert {t.channel_axis for t in targets_from_store(model, store) if t.layer.startswith("up")} == {1}
    with pytest.raises(FP8Error, match="another module"):
        targets_from_store(nn.Linear(4, 6), store)
    with pytest.raises(FP8Error, match=r"\(6, 4\) torch.bfloat16.*rebuild"):
        targets_from_store(nn.ModuleDict({"linear": nn.Linear(6, 4).bfloat16()}), {"linear.weight": store["linear.weight"]})
    with pytest.raises(FP8Error, match="float32"):
        targets_from_store(nn.ModuleDict({"linear": nn.Linear(4, 6)}), {"linear.weight": store["linear.weight"]})
    with pytest.raises(FP8Error, match="must be an FP8Tensor"):
        targets_from_store(model, {"linear.weight": model.linear.weight})
    with pytest.raises(TypeError, match="FP8Store"):
        targets_from_store(model, [store])


def test_overlap_between_modules_names_the_weight_and_both_arguments():
    model = Codec()
    config = FP8Config()
    plans = [Plan.make(model, config), Plan.make(model.encoder, config)]
    with pytest.raises(FP8Error, match=r"'0.weight' belongs to argument 0 and argument 1"):
        check_overlap(plans)
    check_overlap([Plan.make(model.encoder, config), Plan.make(model.decoder, config)])  # disjoint: fine


def test_plan_entries_are_made_one_at_a_time(monkeypatch):
    model = Codec()
    made = []
    real = _plan.quantize_target
    monkeypatch.setattr(_plan, "quantize_target", lambda target, config: made.append(target.name) or real(target, config))
    plan = Plan.make(model, FP8Config(granularity="channel"))
    entries = plan.entries()
    assert made == []  # planning alone quantizes nothing
    target, entry = next(entries)
    assert made == [target.name] == ["encoder.0.weight"]
    assert torch.equal(entry.dequantize(), reference_qdq(model.encoder[0].weight, "channel"))
    assert [t.name for t, _ in entries] == [t.name for t in plan.targets[1:]] and made == [t.name for t in plan.targets]


def test_plan_from_a_store_takes_its_entries_without_quantizing(monkeypatch):
    model = Codec()
    store = FP8Store.from_module(model)
    monkeypatch.setattr(_plan, "quantize_target", lambda *args: pytest.fail("a store's plan must not quantize"))
    plan = Plan.make(model, FP8Config(), store)
    assert [(t.name, entry) for t, entry in plan.entries()] == [(name, store[name]) for name in store]


@pytest.mark.parametrize("options", [{"layers": [nn.ReLU]}, {"exclude": ["0", "2"]}, {"layers": [nn.Conv2d]}])
def test_a_hold_that_selects_nothing_says_so(caplog, options):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="fp8ctx"), fp8ctx.fp8_weights(model, **options) as store:
        assert len(store) == 0
    (record,) = [r for r in caplog.records if r.name == "fp8ctx"]
    assert "nothing of Sequential is held" in record.getMessage() and "layers=" in record.getMessage()
    assert_restored(model, before)


def test_a_hold_that_selects_weights_says_nothing(caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="fp8ctx"), fp8ctx.fp8_weights(model) as store:
        assert len(store) == 1
    assert not [r for r in caplog.records if r.name == "fp8ctx"]
