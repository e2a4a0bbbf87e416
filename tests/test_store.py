"""`FP8Store`: which weights it takes, under which names, what it holds, and its safetensors files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_restored, fake_quantized_copy, reference_qdq, snapshot
from torch import nn

import fp8ctx
from fp8ctx import DEFAULT_LAYERS, FP8Error, FP8Store, FP8Tensor, fp8_weights, functional_call

GRANULARITIES = ["tensor", "channel", "block"]
STORAGE = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]


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


def test_from_module_leaves_the_module_untouched():
    model = zoo()
    before = snapshot(model)
    pointers = [(p, p.data_ptr()) for p in model.parameters()]
    store = FP8Store.from_module(model, granularity="block", block_size=2, layers=DEFAULT_LAYERS + (nn.Embedding,))
    assert_restored(model, before)
    assert all(p is q and p.data_ptr() == ptr for (p, ptr), q in zip(pointers, model.parameters()))
    held = {entry.qdata.untyped_storage().data_ptr() for entry in store.values()}
    assert held.isdisjoint({p.untyped_storage().data_ptr() for p in model.parameters()})  # new memory only


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
        ("nothing-matches", set()),
        ("*", ALL_CODEC),
    ],
    ids=[
        "parent-name", "glob-prefix", "glob-suffix", "glob-question", "exact", "predicate", "lambda",
        "list-mixed", "tuple-patterns", "empty-list", "no-match", "everything",
    ],
)
def test_exclude_by_pattern_parent_predicate_and_list(exclude, excluded):
    torch.manual_seed(0)
    model = Codec()
    store = FP8Store.from_module(model, exclude=exclude)
    assert sorted(store) == keys(*(ALL_CODEC - excluded))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"exclude": 3}, "exclude"),
        ({"exclude": ["decoder", 2.5]}, "exclude"),
        ({"exclude": [None]}, "exclude"),
        ({"layers": int}, "layers"),
        ({"layers": (nn.Linear, "Conv2d")}, "layers"),
        ({"layers": ()}, "layers"),
        ({"layers": nn.Linear(2, 2)}, "layers"),
        ({"layers": "Linear"}, "layers"),
        ({"granularity": "row"}, "granularity"),
        ({"block_size": -4}, "block_size"),
        ({"storage_dtype": torch.bfloat16}, "storage_dtype"),
    ],
    ids=[
        "exclude-int", "exclude-list-float", "exclude-none-rule", "layers-int-type", "layers-with-str",
        "layers-empty", "layers-instance", "layers-str", "granularity", "block_size", "storage_dtype",
    ],
)
def test_bad_options_raise_fp8error_naming_the_option(options, match):
    model = Codec()
    before = snapshot(model)
    with pytest.raises(FP8Error, match=match):
        FP8Store.from_module(model, **options)
    assert_restored(model, before)


# -- what the entries hold -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,weight_shape,channels",
    [
        (lambda: nn.ConvTranspose1d(6, 5, 3), (6, 5, 3), 5),
        (lambda: nn.ConvTranspose2d(6, 10, 3), (6, 10, 3, 3), 10),
        (lambda: nn.ConvTranspose2d(6, 8, 3, groups=2), (6, 4, 3, 3), 4),  # dim 1 is out / groups
        (lambda: nn.ConvTranspose3d(3, 7, 2), (3, 7, 2, 2, 2), 7),
        (lambda: nn.Conv2d(6, 10, 3, groups=2), (10, 3, 3, 3), 10),  # a Conv's channels: dim 0
    ],
    ids=["convT1d", "convT2d", "convT2d-groups", "convT3d", "conv2d-groups"],
)
@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_convtranspose_scales_follow_dim_1(build, weight_shape, channels, granularity):
    torch.manual_seed(0)
    layer = build()
    store = FP8Store.from_module(layer, granularity=granularity, block_size=2)
    entry = store["weight"]
    axis = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
    assert tuple(entry.shape) == weight_shape and entry.fp8_layout.channel_axis == axis
    inner = math.prod(weight_shape) // channels
    expected_scale = (channels,) if granularity == "channel" else (math.ceil(channels / 2), math.ceil(inner / 2))
    assert tuple(entry.scale.shape) == expected_scale
    assert torch.equal(entry.dequantize(), reference_qdq(layer.weight, granularity, 2, channel_axis=axis))
    if granularity == "channel":  # each scale is its own channel's amax / 448
        amax = layer.weight.detach().abs().movedim(axis, 0).reshape(channels, -1).amax(dim=1)
        assert torch.equal(entry.scale, amax / 448.0)


def mixed() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(4, 6, 3), nn.ConvTranspose1d(5, 3, 2), nn.LayerNorm(8))
    model[0].float()
    model[1].bfloat16()
    model[2].half()
    return model


@pytest.mark.parametrize(
    "granularity,block_size,scales",
    [
        ("tensor", 128, 1 + 1 + 1),
        ("channel", 128, 8 + 6 + 3),
        ("block", 4, 2 * 4 + 2 * 9 + 1 * 3),  # (8,16)->2x4, (6,36)->2x9, (3,10) channel-first ->1x3
    ],
    ids=["tensor", "channel", "block4"],
)
def test_nbytes_and_dense_nbytes_by_hand(granularity, block_size, scales):
    store = FP8Store.from_module(mixed(), granularity=granularity, block_size=block_size)
    codes = 8 * 16 + 6 * 4 * 3 * 3 + 5 * 3 * 2  # one byte each
    assert store.nbytes == codes + 4 * scales
    assert store.dense_nbytes == 8 * 16 * 4 + 6 * 4 * 3 * 3 * 2 + 5 * 3 * 2 * 2  # fp32, bf16, fp16
    assert f"{store.nbytes / 2**20:.2f} MiB held" in repr(store)


def test_dequantize_gives_reference_values_per_name():
    model = mixed()
    store = FP8Store.from_module(model, granularity="channel")
    dense = store.dequantize()
    assert list(dense) == ["0.weight", "1.weight", "2.weight"]
    for name, axis in (("0.weight", 0), ("1.weight", 0), ("2.weight", 1)):
        weight = model.get_parameter(name)
        assert type(dense[name]) is torch.Tensor and dense[name].dtype == weight.dtype
        assert torch.equal(dense[name], reference_qdq(weight, "channel", channel_axis=axis))


def test_to_cpu_keeps_fp8_bits_and_layouts(device):
    model = mixed().to(device)
    store = FP8Store.from_module(model, granularity="block", block_size=4)
    moved = store.to("cpu")
    assert isinstance(moved, FP8Store) and list(moved) == list(store) and moved.config == store.config
    for name in store:
        entry = moved[name]
        assert isinstance(entry, FP8Tensor) and isinstance(entry, nn.Parameter) and entry.device.type == "cpu"
        assert entry.qdata.dtype == torch.float8_e4m3fn and entry.fp8_layout == store[name].fp8_layout
        assert torch.equal(entry.qdata.view(torch.uint8), store[name].qdata.cpu().view(torch.uint8))
        assert torch.equal(entry.scale, store[name].scale.cpu()) and entry.dtype == store[name].dtype
    back = moved.to(device)
    assert all(back[name].device.type == torch.device(device).type for name in back)
    with torch.no_grad():
        x = torch.randn(2, 16, device=device)
        torch.testing.assert_close(functional_call(model[0], {"weight": back["0.weight"]}, x), fake_quantized_copy(model[0], "block", 4)(x))


# -- files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_save_load_keeps_bits_layouts_and_runs_with_functional_call(granularity, storage, tmp_path):
    model = mixed()
    store = FP8Store.from_module(model, granularity=granularity, block_size=4, storage_dtype=storage)
    store.save(tmp_path / "store.safetensors")
    loaded = FP8Store.load(tmp_path / "store.safetensors")
    assert list(loaded) == list(store) and loaded.config == store.config
    for name in store:
        a, b = loaded[name], store[name]
        assert isinstance(a, FP8Tensor) and isinstance(a, nn.Parameter) and a.param_name == name
        assert a.qdata.dtype == storage and torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8))
        assert a.scale.shape == b.scale.shape and torch.equal(a.scale, b.scale)
        assert a.fp8_layout == b.fp8_layout and a.dtype == b.dtype and a.shape == b.shape
    assert loaded["2.weight"].fp8_layout.channel_axis == 1
    reference = fake_quantized_copy(model, granularity, 4, storage)
    before = snapshot(model)
    inputs = {0: torch.randn(2, 16), 1: torch.randn(1, 4, 5, 5, dtype=torch.bfloat16), 2: torch.randn(1, 5, 3, dtype=torch.float16)}
    for index, x in inputs.items():
        layer_store = {"weight": loaded[f"{index}.weight"]}
        with torch.no_grad():
            torch.testing.assert_close(functional_call(model[index], layer_store, x), reference[index](x), rtol=0, atol=0)
    assert_restored(model, before)


def test_loading_a_file_not_written_by_fp8ctx_raises(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "half.safetensors", metadata={"fp8ctx.layouts": "{}"})
    for path in ("plain", "other", "half"):
        with pytest.raises(FP8Error, match="not an fp8ctx store"):
            FP8Store.load(tmp_path / f"{path}.safetensors")
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(FP8Error, match="not a safetensors file"):
        FP8Store.load(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        FP8Store.load(tmp_path / "missing.safetensors")


def test_stores_compare_by_identity():
    model = nn.Linear(8, 8)
    store, again = FP8Store.from_module(model), FP8Store.from_module(model)
    assert store == store and store != again  # no tensor truth-value error from Mapping's ==
    assert len({store, again, store}) == 2


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


def test_missing_key_error_lists_some_keys():
    store = FP8Store.from_module(Codec())
    with pytest.raises(KeyError) as caught:
        store["decoder.missing.weight"]
    message = str(caught.value)
    assert "decoder.missing.weight" in message and "6 weights" in message
    assert "encoder.0.weight" in message and "encoder.1.weight" in message
    assert "decoder.missing.weight" not in store and store.get("nope") is None


def test_entries_must_be_fp8_tensors():
    with pytest.raises(FP8Error, match="'w'.*FP8Tensor"):
        FP8Store({"w": nn.Parameter(torch.zeros(2))}, fp8ctx.FP8Config())


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_zero_element_weight_is_quantized_or_refused_clearly(granularity):
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 2))
    before = snapshot(model)
    try:
        store = FP8Store.from_module(model, granularity=granularity)
    except FP8Error as error:
        assert "0.weight" in str(error)
    else:
        assert store["0.weight"].shape == (4, 0) and torch.equal(store["0.weight"].dequantize(), torch.zeros(4, 0))
        with fp8_weights(model, granularity=granularity):
            assert model(torch.zeros(3, 0)).shape == (3, 2)
    assert_restored(model, before)
