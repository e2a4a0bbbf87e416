"""Options of the public functions: a config plus keywords, every one checked when the function is called."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

import fp8ctx
from fp8ctx import FP8Config, FP8Error, FP8Store, FP8Tensor, fp8_weights, functional_call
from fp8ctx import _plan


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tower(seed: int = 0) -> Tower:
    torch.manual_seed(seed)
    return Tower()


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if anything is quantized; the returned list collects forward calls of the model."""
    monkeypatch.setattr(_plan, "quantize_target", lambda *args: pytest.fail("quantized before the options were checked"))
    return []


def call_report(model, **options):
    return fp8ctx.report(model, X, **options)


def call_context(model, **options):
    return fp8_weights(model, **options)  # not entered: the call itself must check


def call_from_module(model, **options):
    return FP8Store.from_module(model, **options)


BAD = {
    "exclude": ([3], "exclude"),
    "layers": ([int], "layers"),
    "granularity": ("row", "granularity"),
    "storage_dtype": (torch.bfloat16, "storage_dtype"),
    "block_size": (0, "block_size"),
    "compute": ("int8", "compute"),
    "originals": ("gpu", "originals"),
    "config": ("channel", "config"),
    "progress_bar": ("yes", "progress_bar"),
}
BAD_ELSEWHERE = {"run": ("model.decode", "run must be a function"), "components": ([3], "components must be a component name")}
CALLS = {
    "report": (call_report, set(BAD) | {"run"}),
    "fp8_weights": (call_context, set(BAD) | {"components"}),
    "from_module": (call_from_module, set(BAD) - {"compute", "originals"}),
}
CASES = [
    pytest.param(call, option, id=f"{name}-{option}")
    for name, (call, options) in CALLS.items()
    for option in sorted(options)
]


@pytest.mark.parametrize("call,option", CASES)
def test_a_bad_option_raises_when_called_before_anything_runs(call, option, nothing_runs):
    model = tower()
    model.register_forward_hook(lambda *args: nothing_runs.append("forward"))
    before = snapshot(model)
    value, match = {**BAD, **BAD_ELSEWHERE}[option]
    with pytest.raises(FP8Error, match=match):
        call(model, **{option: value})
    assert nothing_runs == []
    assert_restored(model, before)


@pytest.mark.parametrize("option", ["compute", "config"])
def test_functional_call_checks_its_options_before_running(option):
    model = tower()
    store = FP8Store.from_module(model)
    calls = []
    model.register_forward_hook(lambda *args: calls.append("forward"))
    before = snapshot(model)
    value, match = BAD[option]
    with pytest.raises(FP8Error, match=match):
        functional_call(model, store, X, **{option: value})
    assert calls == []
    assert_restored(model, before)


@pytest.mark.parametrize(
    "stated,match",
    [
        ({"granularity": "tensor"}, "granularity"),  # the default, but the store holds channel scales
        ({"block_size": 128}, "block_size"),  # the default, but the store's entries say 8
        ({"storage_dtype": torch.float8_e4m3fn}, "storage_dtype"),  # the default, but the store is e5m2
        ({"config": FP8Config()}, "storage_dtype"),  # a passed config states every field
    ],
    ids=["granularity", "block_size", "storage_dtype", "config"],
)
def test_an_option_that_contradicts_the_store_raises_even_when_it_is_the_default(stated, match):
    model = tower()
    store = FP8Store.from_module(model, storage_dtype="e5m2", granularity="channel", block_size=8)
    before = snapshot(model)
    with pytest.raises(FP8Error, match=f"{match}.*contradicts the given store"):
        fp8_weights(model, store=store, **stated)
    with pytest.raises(FP8Error, match=f"{match}.*contradicts the given store"):
        fp8ctx.report(model, X, store=store, **stated)
    if "config" in stated:
        with pytest.raises(FP8Error, match=f"{match}.*contradicts the given store"):
            functional_call(model, store, X, config=stated["config"])
    assert_restored(model, before)
    agreeing = FP8Config(storage_dtype="e5m2", granularity="channel", block_size=8)
    with fp8_weights(model, store=store, config=agreeing, granularity="channel") as same:
        assert same is store
    assert torch.equal(functional_call(model, store, X, config=agreeing), functional_call(model, store, X))


@pytest.mark.parametrize("option", [{"layers": (nn.Linear,)}, {"exclude": ["head"]}], ids=["layers", "exclude"])
def test_choosing_weights_with_a_store_given_raises(option):
    model = tower()
    store = FP8Store.from_module(model)
    with pytest.raises(FP8Error, match="store already decides"):
        fp8_weights(model, store=store, **option)


def test_an_exclude_generator_applies_to_every_module():
    first, second = tower(0), tower(1)
    with fp8_weights(first, second, exclude=(rule for rule in ["head"])) as (a, b):
        assert "head.weight" not in a and "head.weight" not in b
        assert not isinstance(second.head._parameters["weight"], FP8Tensor)
    config = FP8Config(exclude=(rule for rule in ["body.0"]))
    assert config.exclude == ("body.0",)
    assert list(FP8Store.from_module(first, config)) == list(FP8Store.from_module(second, config)) == [
        "body.2.weight", "head.weight"
    ]


class Pipe:
    """A diffusers look-alike: a non-module with a ``components`` dict."""

    def __init__(self) -> None:
        self.vae, self.text_encoder, self.transformer = tower(0), tower(1), tower(2)
        self.components = {"vae": self.vae, "text_encoder": self.text_encoder, "transformer": self.transformer,
                           "scheduler": object()}


def test_the_dict_of_stores_a_pipeline_gave_is_accepted_back(monkeypatch):
    pipe = Pipe()
    with fp8_weights(pipe, components=["vae", "transformer"], granularity="channel") as stores:
        assert sorted(stores) == ["transformer", "vae"]
    before = {name: snapshot(module) for name, module in pipe.components.items() if isinstance(module, nn.Module)}
    monkeypatch.setattr(_plan, "quantize_target", lambda *args: pytest.fail("a given store must not be requantized"))
    with fp8_weights(pipe, store=stores) as again:  # the dict's names pick the components
        assert again == stores and all(again[name] is stores[name] for name in stores)
        assert isinstance(pipe.transformer.head._parameters["weight"], FP8Tensor)
        assert not isinstance(pipe.text_encoder.head._parameters["weight"], FP8Tensor)
    with fp8_weights(pipe, store=stores, components=["transformer", "vae"]) as again:
        assert list(again) == ["transformer", "vae"]
    for name, snap in before.items():
        assert_restored(pipe.components[name], snap)
    with pytest.raises(FP8Error, match="components held"):
        fp8_weights(pipe, store=stores, components=["vae"])
    with pytest.raises(FP8Error, match="pipeline argument"):
        fp8_weights(pipe.vae, store=stores)


def test_keywords_override_a_config_and_every_entry_point_takes_one():
    model = tower()
    config = FP8Config(granularity="channel", exclude=["head"])
    store = FP8Store.from_module(model, config)
    assert list(store) == ["body.0.weight", "body.2.weight"] and store.config.granularity == "channel"
    block = FP8Store.from_module(model, config, granularity="block", block_size=4)
    assert block.config == FP8Config(granularity="block", block_size=4) and "head.weight" not in block
    with fp8_weights(model, config=config) as held:
        assert list(held) == list(store)
        out = model(X)
    assert torch.equal(functional_call(model, store, X, config=config), out)
    result = fp8ctx.report(model, X, config=config)
    assert result.config == config and [row.name for row in result.layers] == list(store)


# -- issue 10 point 6: each option means what it says, at its edges ----------------------------------


@pytest.mark.parametrize("value", [0, 1, 0.0, "yes", "False"])
@pytest.mark.parametrize("call", [call_context, call_from_module, call_report], ids=["fp8_weights", "from_module", "report"])
def test_progress_bar_takes_only_true_false_or_none(call, value, nothing_runs):
    with pytest.raises(FP8Error, match="progress_bar must be True, False or None"):
        call(tower(), progress_bar=value)


@pytest.mark.parametrize("spelling", ["e5m2", "float8_e5m2", torch.float8_e5m2])
def test_every_spelling_of_a_storage_dtype_is_taken_by_every_entry_point(spelling):
    model = tower()
    assert FP8Config(storage_dtype=spelling).storage_dtype == torch.float8_e5m2
    assert {e.storage_dtype for e in FP8Store.from_module(model, storage_dtype=spelling).values()} == {torch.float8_e5m2}
    with fp8_weights(model, storage_dtype=spelling) as store:
        assert model.head.weight.storage_dtype == torch.float8_e5m2
    assert fp8ctx.report(model, X, storage_dtype=spelling).config.storage_dtype == torch.float8_e5m2
    assert functional_call(model, store, X).shape == (2, 4)


@pytest.mark.parametrize("block_size", [16, 8192, 40000])
def test_a_block_larger_than_the_weight_holds_the_weight_without_padding(block_size):
    from conftest import reference_qdq

    layer = nn.Linear(8, 8)
    entry = FP8Store.from_module(layer, granularity="block", block_size=block_size)["weight"]
    assert entry.qdata.shape == (8, 8) and entry.scale.shape == (1, 1)  # codes of the weight only, one scale
    assert torch.equal(entry.dequantize(), reference_qdq(layer.weight, "block", block_size))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize(
    "build, x",
    [
        (lambda: nn.Linear(4, 0), torch.randn(2, 4)),
        (lambda: nn.Linear(0, 4), torch.randn(2, 0)),
    ],
    ids=["Linear(4, 0)", "Linear(0, 4)"],
)
def test_layers_without_output_channels_run_and_restore(build, x, granularity):
    layer = build()
    before = snapshot(layer)
    expected = layer(x)
    with fp8_weights(layer, granularity=granularity):
        out = layer(x)
    assert out.shape == expected.shape
    assert_restored(layer, before)
