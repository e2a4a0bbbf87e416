"""Exclusion: patterns, parents, predicates and lists; root-level globs and parameter names; no silent misses."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, snapshot
from test_select import keys
from torch import nn

from fp8ctx import FP8Config, FP8Error, FP8Store, FP8Tensor, fp8_weights
from fp8ctx._exclude import literal


def predicate_convtranspose(name: str, layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


class Codec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Linear(4, 4))
        self.decoder = nn.ModuleDict({"conv": nn.Conv2d(4, 2, 1), "up": nn.ConvTranspose2d(2, 2, 2)})
        self.decoder_extra = nn.Linear(2, 2)
        self.head = nn.Linear(2, 3)


ALL_CODEC = {"encoder.0", "encoder.1", "decoder.conv", "decoder.up", "decoder_extra", "head"}


@pytest.mark.parametrize(
    "exclude,excluded",
    [
        ("decoder", {"decoder.conv", "decoder.up"}),  # a parent name: its children, not "decoder_extra"
        ("decoder*", {"decoder.conv", "decoder.up", "decoder_extra"}),
        ("*.conv", {"decoder.conv"}),
        ("encoder.?", {"encoder.0", "encoder.1"}),
        ("head", {"head"}),
        (predicate_convtranspose, {"decoder.up"}),
        (lambda name, layer: name.startswith("enc") and isinstance(layer, nn.Linear), {"encoder.1"}),
        (["head", predicate_convtranspose], {"head", "decoder.up"}),
        (("encoder", "*_extra"), {"encoder.0", "encoder.1", "decoder_extra"}),
        ([], set()),
        ("*", ALL_CODEC),
    ],
    ids=[
        "parent-name", "glob-prefix", "glob-suffix", "glob-question", "exact", "predicate", "lambda",
        "list-mixed", "tuple-patterns", "empty-list", "everything",
    ],
)
def test_exclude_by_pattern_parent_predicate_and_list(exclude, excluded):
    torch.manual_seed(0)
    model = Codec()
    store = FP8Store.from_module(model, exclude=exclude)
    assert sorted(store) == keys(*(ALL_CODEC - excluded))


# -- exclusion that cannot silently miss ---------------------------------------------------------------


class RootHead(nn.Module):
    """A language-model shape: the head sits at the root, beside the body."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
        self.lm_head = nn.Linear(4, 6)


@pytest.mark.parametrize(
    "exclude,excluded",
    [
        ("*.lm_head", {"lm_head"}),  # the README's pattern names a root-level head too
        ("lm_head.weight", {"lm_head"}),  # a parameter name (a report row) names its layer
        ("body.2.weight", {"body.2"}),
        ("*.weight", {"body.0", "body.2", "lm_head"}),
        ("*.2", {"body.2"}),
        ("body", {"body.0", "body.2"}),
    ],
    ids=["root-glob", "param-root", "param-nested", "param-glob", "glob-nested", "parent"],
)
def test_exclude_takes_root_level_globs_and_parameter_names(exclude, excluded):
    model = RootHead()
    every = {"body.0", "body.2", "lm_head"}
    assert sorted(FP8Store.from_module(model, exclude=exclude)) == keys(*(every - excluded))
    with fp8_weights(model, exclude=[exclude]) as store:
        assert sorted(store) == keys(*(every - excluded))
        assert all(not isinstance(model.get_submodule(name).weight, FP8Tensor) for name in excluded)


@pytest.mark.parametrize(
    "call",
    [
        lambda model, exclude: fp8_weights(model, exclude=exclude),  # not entered: the call itself checks
        lambda model, exclude: FP8Store.from_module(model, exclude=exclude),
        lambda model, exclude: fp8ctx_report(model, exclude=exclude),
        lambda model, exclude: fp8_weights(model, config=FP8Config(exclude=exclude)),
        lambda model, exclude: FP8Store.from_checkpoint(model, "/no/checkpoint/read/before/this", exclude=exclude),
    ],
    ids=["fp8_weights", "from_module", "report", "config", "from_checkpoint"],
)
def test_an_exclude_pattern_matching_nothing_raises_with_the_closest_names(call):
    model = RootHead()
    before = snapshot(model)
    with pytest.raises(FP8Error, match=r"'lm_haed' matches no layer of RootHead; closest names: \['lm_head'.*'\*\.conv_out'"):
        call(model, ["body", "lm_haed"])
    with pytest.raises(FP8Error, match=r"'decoder\.conv_out' matches no layer"):
        call(model, "decoder.conv_out")
    assert_restored(model, before)


def fp8ctx_report(model, **options):
    from fp8ctx import report

    return report(model, torch.randn(2, 4), **options)


def test_a_pattern_needs_to_match_in_one_of_several_modules_only():
    first, second = RootHead(), nn.Sequential(nn.Linear(4, 4))
    with fp8_weights(first, second, exclude=["lm_head"]) as (a, b):
        assert "lm_head.weight" not in a and list(b) == ["0.weight"]
    with pytest.raises(FP8Error, match="matches no layer of RootHead or Sequential"):
        fp8_weights(first, second, exclude=["head"])


def test_literal_names_match_exactly_that_layer():
    model = nn.ModuleDict({"a[1]": nn.Linear(2, 2), "a1": nn.Linear(2, 2), "a*": nn.Linear(2, 2), "ab": nn.Linear(2, 2)})
    for name in model:
        assert sorted(FP8Store.from_module(model, exclude=literal(name))) == sorted(
            f"{other}.weight" for other in model if other != name
        )


def test_a_trailing_wildcard_names_children_not_the_layers_own_weight():
    model = nn.ModuleDict({"block": nn.Linear(2, 2), "stack": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))})
    assert sorted(FP8Store.from_module(model, exclude="stack.*")) == ["block.weight"]
    with pytest.raises(FP8Error, match="'block.\\*' matches no layer"):  # a leaf has no children
        FP8Store.from_module(model, exclude="block.*")
