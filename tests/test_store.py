"""`FP8Store`: which weights it takes, under which names, what it holds, and its safetensors files."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from conftest import assert_restored, fake_quantized_copy, reference_qdq, snapshot
from torch import nn

import fp8ctx
from fp8ctx import DEFAULT_LAYERS, FP8Error, FP8Store, FP8Tensor, fp8_weights, functional_call
from test_exclude import Codec
from test_select import zoo

GRANULARITIES = ["tensor", "channel", "block"]
STORAGE = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]


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


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda layout, tensors: layout.update(block_size=0), "layout of entry 'fc.weight'.*block_size"),
        (lambda layout, tensors: layout.update(granularity="rows"), "layout of entry 'fc.weight'.*granularity"),
        (lambda layout, tensors: layout.pop("block_size"), "layout of entry 'fc.weight'.*missing.*block_size"),
        (lambda layout, tensors: tensors.update({"fc.weight:scale": tensors["fc.weight:scale"][:2]}), "'fc.weight': scales must be"),
        (lambda layout, tensors: tensors.update({"fc.weight:scale": -tensors["fc.weight:scale"]}), "'fc.weight': scales must be positive"),
        (lambda layout, tensors: tensors.update({"fc.weight": tensors["fc.weight"].view(torch.uint8)}), "'fc.weight': codes must be"),
    ],
    ids=["block_size", "granularity", "missing-field", "scale-shape", "scale-sign", "codes-dtype"],
)
def test_loading_a_damaged_store_names_the_weight_and_the_field(damage, message, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "store.safetensors"
    FP8Store.from_module(nn.Sequential(OrderedDict(fc=nn.Linear(8, 6))), granularity="channel").save(path)
    with safe_open(path, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    layouts = json.loads(metadata["fp8ctx.layouts"])
    damage(layouts["fc.weight"], tensors)
    save_file(tensors, path, metadata={**metadata, "fp8ctx.layouts": json.dumps(layouts)})
    with pytest.raises(FP8Error, match=message):
        FP8Store.load(path)


def test_stores_compare_by_identity():
    model = nn.Linear(8, 8)
    store, again = FP8Store.from_module(model), FP8Store.from_module(model)
    assert store == store and store != again  # no tensor truth-value error from Mapping's ==
    assert len({store, again, store}) == 2


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
        FP8Store({"w": nn.Parameter(torch.zeros(2))})


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


# -- the config is read from the entries ----------------------------------------------------------------


def test_config_is_derived_from_the_entries():
    model = Codec()
    store = FP8Store.from_module(model, storage_dtype="e5m2", granularity="block", block_size=8, exclude=["head"])
    assert store.config == fp8ctx.FP8Config(storage_dtype=torch.float8_e5m2, granularity="block", block_size=8)
    assert FP8Store({}).config == fp8ctx.FP8Config()
    channel = FP8Store.from_module(model, granularity="channel")
    combined = FP8Store({"encoder.0.weight": store["encoder.0.weight"], "head.weight": channel["head.weight"]})
    with pytest.raises(FP8Error, match=r"no single config: entry 'encoder.0.weight' holds .*block.*entry 'head.weight'"):
        combined.config
    assert "2 schemes" in repr(combined)
    with pytest.raises(FP8Error, match="granularity.*contradicts"):
        fp8_weights(model, store=combined, granularity="channel")
    with fp8_weights(model, store=combined):  # each entry keeps its own scheme
        out = model.head(torch.randn(2, 2))
    assert out.shape == (2, 3)


def test_a_combined_store_saves_and_loads_entry_by_entry(tmp_path):
    model = Codec()
    block = FP8Store.from_module(model, granularity="block", block_size=2)
    channel = FP8Store.from_module(model, storage_dtype="e5m2", granularity="channel")
    combined = FP8Store({"encoder.0.weight": block["encoder.0.weight"], "decoder.up.weight": channel["decoder.up.weight"]})
    combined.save(tmp_path / "mixed.safetensors")
    loaded = FP8Store.load(tmp_path / "mixed.safetensors")
    for name in combined:
        assert loaded[name].fp8_layout == combined[name].fp8_layout
        assert loaded[name].storage_dtype == combined[name].storage_dtype
        assert torch.equal(loaded[name].dequantize(), combined[name].dequantize())


def test_a_file_whose_entries_do_not_fit_together_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    store = FP8Store.from_module(Codec(), granularity="channel")
    store.save(tmp_path / "good.safetensors")
    tensors = load_file(tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "good.safetensors", framework="pt") as handle:
        metadata = handle.metadata()

    def write(name, tensors=tensors, **changes):
        save_file(tensors, tmp_path / name, metadata={**metadata, **changes})
        return tmp_path / name

    short_scales = {**tensors, "head.weight:scale": tensors["head.weight:scale"][:1]}
    with pytest.raises(FP8Error, match=r"'head.weight': scales must be float32 of shape \(3,\).*got torch.float32 \(1,\)"):
        FP8Store.load(write("scales.safetensors", short_scales))
    missing = {k: v for k, v in tensors.items() if k != "head.weight:scale"}
    with pytest.raises(FP8Error, match="no tensor 'head.weight:scale'"):
        FP8Store.load(write("missing.safetensors", missing))
    with pytest.raises(FP8Error, match="does not match its entries"):
        FP8Store.load(write("config.safetensors", **{"fp8ctx.config": '{"granularity": "tensor"}'}))
    layouts = json.loads(metadata["fp8ctx.layouts"])
    layouts["head.weight"]["granularity"] = "row"
    with pytest.raises(FP8Error, match="'head.weight'.*granularity"):
        FP8Store.load(write("layout.safetensors", **{"fp8ctx.layouts": json.dumps(layouts)}))
    with pytest.raises(FP8Error, match="not JSON"):
        FP8Store.load(write("json.safetensors", **{"fp8ctx.layouts": "{oops"}))
