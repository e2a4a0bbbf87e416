"""Selection: which weights are targeted (names, ties, layer types, non-float weights), read without changing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_restored, fake_quantized_copy, snapshot
from torch import nn

from fp8ctx import DEFAULT_LAYERS, FP8Config, FP8Store, FP8Tensor, fp8_weights
from fp8ctx._select import find_targets


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
