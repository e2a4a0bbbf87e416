"""Planning: which weights are targeted (layer types, exclusion, ties), store matching, overlap, lazy entries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_restored, fake_quantized_copy, reference_qdq, snapshot
from torch import nn

from fp8ctx import DEFAULT_LAYERS, FP8Config, FP8Error, FP8Store, FP8Tensor, fp8_weights
from fp8ctx import _plan
from fp8ctx._plan import Plan, check_overlap, find_targets, targets_from_store


class CausalConv3d(nn.Conv3d):
    """Like diffusers' QwenImageCausalConv3d: a Conv3d subclass that pads the time axis on one side."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self._causal = (kernel_size // 2, kernel_size // 2, kernel_size // 2, kernel_size // 2, kernel_size - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self._causal))


class Scaler(nn.Module):
    """Not a layer fp8ctx knows: its ``weight`` must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))


class Zoo(nn.Module):
    """One of every kind: targeted by default, targeted on request, and never targeted."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.linear = nn.Linear(4, 6)
        self.conv1 = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.conv3 = nn.Conv3d(4, 4, 1, bias=False)
        self.causal = CausalConv3d(4, 4, 3)
        self.up1 = nn.ConvTranspose1d(6, 4, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(4, 6, 2, groups=2)
        self.up3 = nn.ConvTranspose3d(4, 2, 1)
        self.norm = nn.LayerNorm(6)
        self.group_norm = nn.GroupNorm(2, 4)
        # (no BatchNorm: conftest.snapshot cannot take the bits of its 0-d int64 num_batches_tracked buffer)
        self.scaler = Scaler()
        self.register_buffer("table", torch.randn(3, 3))


DEFAULT_KEYS = {"linear", "conv1", "conv2", "conv3", "causal", "up1", "up2", "up3"}


def zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo().bfloat16()


def keys(*layers: str) -> list[str]:
    return sorted(f"{layer}.weight" for layer in layers)


@pytest.mark.parametrize(
    "build,expected",
    [
        (lambda: nn.Linear(4, 3), ["weight"]),
        (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), nn.ReLU()), ["0.0.weight", "0.1.weight"]),
        (lambda: nn.ModuleDict({"decoder": nn.ModuleList([nn.Conv2d(2, 2, 1), nn.LayerNorm(2)])}), ["decoder.0.weight"]),
        (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4)), ["0.0.weight", "1.weight"]),
    ],
    ids=["bare-linear", "nested-sequential", "moduledict-list", "two-levels"],
)
def test_keys_are_named_parameters_names(build, expected):
    model = build()
    store = FP8Store.from_module(model)
    assert list(store) == expected
    params = dict(model.named_parameters())
    for name in store:
        assert store[name].shape == params[name].shape and store[name].param_name == name


def test_a_tied_weight_is_one_entry_under_its_first_name():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].weight
    store = FP8Store.from_module(model)
    assert list(store) == ["0.weight"]


def test_default_layer_types_subclasses_included_and_nothing_else():
    model = zoo()
    store = FP8Store.from_module(model)
    assert sorted(store) == keys(*DEFAULT_KEYS)  # causal: a Conv3d subclass; scaler/norms/embedding: not layers
    assert not any(name.endswith("bias") for name in store)
    x = torch.randn(1, 4, 3, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = fake_quantized_copy(model.causal)(x)
        with fp8_weights(model.causal):
            assert isinstance(model.causal._parameters["weight"], FP8Tensor)
            torch.testing.assert_close(model.causal(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "layers,expected",
    [
        (DEFAULT_LAYERS + (nn.Embedding,), DEFAULT_KEYS | {"embed"}),
        (nn.Embedding, {"embed"}),  # a single type
        ((nn.Linear, nn.LayerNorm), {"linear", "norm"}),
        ((nn.modules.conv._ConvTransposeNd,), {"up1", "up2", "up3"}),
        ([nn.Conv3d], {"conv3", "causal"}),  # a list works too; subclasses follow
    ],
    ids=["default+embedding", "embedding-only", "linear+layernorm", "convtranspose-base", "conv3d-list"],
)
def test_layers_option_chooses_the_layer_types(layers, expected):
    assert sorted(FP8Store.from_module(zoo(), layers=layers)) == keys(*expected)


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


def test_non_float_weights_are_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    model[1].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    model[2].weight = nn.Parameter(torch.ones(4, 4, 1, dtype=torch.int32), requires_grad=False)
    before = snapshot(model)
    assert list(FP8Store.from_module(model)) == ["0.weight"]
    with fp8_weights(model) as store:
        assert list(store) == ["0.weight"]
        assert model[1].weight.dtype == torch.int8 and not isinstance(model[1].weight, FP8Tensor)
    assert_restored(model, before)


# -- planning only reads -------------------------------------------------------------------------------


def test_find_targets_reads_the_module_and_gives_names_layers_and_channel_axes():
    model = zoo()
    before = snapshot(model)
    targets = find_targets(model, FP8Config(layers=DEFAULT_LAYERS + (nn.Embedding,), exclude=["up3"]))
    assert_restored(model, before)
    assert [t.name for t in targets] == [n for n, _ in model.named_parameters() if n in {t.name for t in targets}]
    by_name = {t.name: t for t in targets}
    assert set(by_name) == set(keys(*((DEFAULT_KEYS | {"embed"}) - {"up3"})))
    assert all(t.param is model.get_parameter(t.name) and t.layer == t.name.rpartition(".")[0] for t in targets)
    assert {n for n, t in by_name.items() if t.channel_axis == 1} == {"up1.weight", "up2.weight"}


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
        assert sorted(FP8Store.from_module(model, exclude=_plan.literal(name))) == sorted(
            f"{other}.weight" for other in model if other != name
        )


def test_a_trailing_wildcard_names_children_not_the_layers_own_weight():
    model = nn.ModuleDict({"block": nn.Linear(2, 2), "stack": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))})
    assert sorted(FP8Store.from_module(model, exclude="stack.*")) == ["block.weight"]
    with pytest.raises(FP8Error, match="'block.\\*' matches no layer"):  # a leaf has no children
        FP8Store.from_module(model, exclude="block.*")
