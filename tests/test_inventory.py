"""What stays dense: every parameter not held, with the reason, and the report's section built from it."""

from __future__ import annotations

import json

import torch
from torch import nn

import fp8ctx
from fp8ctx import DEFAULT_LAYERS, FP8Config, FP8Store
from fp8ctx._inventory import DenseInventory, dense_inventory
from fp8ctx._plan import targets_from_store
from fp8ctx._select import find_targets

EMBEDDING = "embedding (opt-in: layers=DEFAULT_LAYERS + (nn.Embedding,))"


class Gate(nn.Module):
    """A layer fp8ctx does not know, with a 2-D weight used as a matmul operand (like an MoE router)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8))


class Pool(nn.Module):
    """A raw parameter that is not called ``weight`` (like a pooling probe)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(2, 8))
        self.temperature = nn.Parameter(torch.tensor(1.0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.gate = Gate()
        self.pool = Pool()
        self.skip = nn.Linear(8, 8, bias=False)
        self.codes = nn.Linear(8, 8, bias=False)
        self.codes.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models do


def reasons(model: nn.Module, config: FP8Config, targets=None) -> dict[str, str]:
    targets = find_targets(model, config) if targets is None else targets
    return {entry.name: entry.reason for entry in dense_inventory(model, targets, config)}


def test_each_parameter_left_dense_is_listed_once_with_its_reason():
    torch.manual_seed(0)
    model = Net()
    config = FP8Config(exclude=["skip"])
    assert reasons(model, config) == {
        # the head's weight is the embedding's (tied): held through the head, so not listed
        "proj.bias": "bias",
        "norm.weight": "norm",
        "norm.bias": "norm",
        "gate.weight": "layer type Gate not in layers (opt-in: layers=DEFAULT_LAYERS + (Gate,))",
        "pool.probe": "2-D parameter 'probe' of Pool (not a layer weight; opt-in if it is a matmul operand: "
        "include=['pool.probe'])",
        "pool.temperature": "0-D",
        "skip.weight": "excluded by pattern 'skip'",
        "codes.weight": "not a float dtype (int8)",
    }


def test_an_excluded_tie_names_the_excluded_layer_and_embeddings_say_how_to_opt_in():
    torch.manual_seed(0)
    model = Net()
    found = reasons(model, FP8Config(exclude=["head"]))
    assert found["embed.weight"] == "tied to excluded layer 'head'"
    untied = Net()
    untied.head.weight = nn.Parameter(torch.randn(20, 8))
    assert reasons(untied, FP8Config())["embed.weight"] == EMBEDDING
    assert "embed.weight" not in reasons(untied, FP8Config(layers=DEFAULT_LAYERS + (nn.Embedding,)))


def test_a_predicate_exclusion_is_named():
    def no_proj(name: str, layer: nn.Module) -> bool:
        return name == "proj"

    assert reasons(Net(), FP8Config(exclude=no_proj))["proj.weight"].startswith("excluded by predicate ")
    assert "no_proj" in reasons(Net(), FP8Config(exclude=no_proj))["proj.weight"]


def test_weights_a_store_lacks_are_not_in_the_store():
    torch.manual_seed(0)
    model = Net()
    store = FP8Store.from_module(model, exclude=["proj"])
    found = reasons(model, FP8Config(), targets_from_store(model, store))
    assert found["proj.weight"] == "not in the store"
    assert "skip.weight" not in found


def test_held_and_dense_bytes_add_up_to_every_parameter_once():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    config = FP8Config()
    targets = find_targets(model, config)
    inventory = DenseInventory(tuple(dense_inventory(model, targets, config)))
    distinct = {id(p): p for p in model.parameters()}
    every = sum(p.numel() * p.element_size() for p in distinct.values())
    held = sum(t.param.numel() * t.param.element_size() for t in targets)
    assert held + inventory.bytes == every
    assert inventory.numel + sum(t.param.numel() for t in targets) == sum(p.numel() for p in distinct.values())
    assert {e.name for e in inventory.entries}.isdisjoint({t.name for t in targets})
    assert inventory.by_reason()["bias"] == 8 * 2  # proj.bias, bfloat16
    assert sum(inventory.by_type().values()) == inventory.bytes


def test_report_lists_what_stays_dense_by_type_and_bytes():
    torch.manual_seed(0)
    model = Net()
    result = fp8ctx.report(model, exclude=["skip"])
    config = FP8Config(exclude=["skip"])
    expected = dense_inventory(model, find_targets(model, config), config)
    assert list(result.kept_dense.entries) == expected
    text = str(result)
    assert "kept dense: 8 tensors" in text
    assert "Linear: excluded by pattern 'skip'" in text and "Gate: layer type Gate not in layers" in text
    total = result.dense_bytes + result.kept_dense.bytes
    assert f"coverage: {result.dense_bytes / total:.1%} of parameter bytes held as FP8" in text
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["kept_dense"]["bytes"] == result.kept_dense.bytes
    assert [row["name"] for row in data["kept_dense"]["entries"]] == [e.name for e in expected]
    assert "kept dense" in result._repr_html_()
