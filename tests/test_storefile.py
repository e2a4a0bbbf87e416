"""Store files are untrusted: every part is checked before use, every failure is one FP8Error naming the file
and the field, and nothing in a file is executed. Complete stores round-trip with their dense tensors."""

from __future__ import annotations

import inspect
import json
import pickle
import struct
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fp8ctx
from fp8ctx import _storefile
from fp8ctx import FP8Error, FP8Store, FP8Tensor


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(fc=nn.Linear(8, 6), norm=nn.LayerNorm(6), bn=nn.BatchNorm1d(6), out=nn.Linear(6, 4, bias=False))
    )
    model.register_buffer("scratch", torch.arange(3.0), persistent=False)
    return model.eval()


def read_raw(path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}


def write_raw(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "store.safetensors"
    FP8Store.from_module(small_model(), granularity="channel", complete=True).save(path)
    return path


# -- complete stores ----------------------------------------------------------------------------------


def test_complete_store_carries_every_other_parameter_and_buffer_and_counts_them_apart():
    model = small_model()
    store = FP8Store.from_module(model, granularity="channel", complete=True)
    assert sorted(store) == ["fc.weight", "out.weight"]
    expected = ["fc.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias", "scratch", "bn.running_mean",
                "bn.running_var", "bn.num_batches_tracked"]
    assert sorted(store.unquantized) == sorted(expected)
    for name in expected:
        original = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
        copy = store.unquantized[name]
        assert torch.equal(copy, original) and copy.dtype == original.dtype
        assert copy.data_ptr() != original.data_ptr()  # a snapshot, not the module's storage
    fp8 = 8 * 6 + 6 * 4 + 4 * (6 + 4)  # codes + float32 channel scales
    dense = sum(t.numel() * t.element_size() for t in store.unquantized.values())
    assert store.nbytes == fp8 and store.unquantized_nbytes == dense and store.total_nbytes == fp8 + dense
    assert store.dense_nbytes == (8 * 6 + 6 * 4) * 4  # the existing name keeps its meaning
    assert store.complete and "complete" in repr(store) and "9 unquantized tensors" in repr(store)
    plain = FP8Store.from_module(model)
    assert not plain.complete and plain.unquantized_nbytes == 0 and "unquantized" not in repr(plain)


def test_complete_store_saves_and_loads_every_tensor_bit_for_bit(saved):
    original = FP8Store.from_module(small_model(), granularity="channel", complete=True)
    loaded = FP8Store.load(saved)
    assert loaded.complete and list(loaded) == list(original) and list(loaded.unquantized) == list(original.unquantized)
    for name in original:
        assert torch.equal(loaded[name].qdata.view(torch.uint8), original[name].qdata.view(torch.uint8))
        assert torch.equal(loaded[name].scale, original[name].scale)
    for name, tensor in original.unquantized.items():
        assert loaded.unquantized[name].dtype == tensor.dtype and torch.equal(loaded.unquantized[name], tensor)
    metadata, _ = read_raw(saved)
    assert metadata["fp8ctx.format"] == "2" and metadata["fp8ctx.version"] == fp8ctx.__version__


def test_a_store_converted_inside_the_block_keeps_its_value_dtype_through_save_and_load(tmp_path):
    model = nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(2, 16)
    with fp8ctx.fp8_weights(model) as store:
        model.float()
        expected = model(x)
    assert store["weight"].dtype == torch.float32 and store["weight"].value_dtype == torch.bfloat16
    store.save(tmp_path / "converted.safetensors")
    loaded = FP8Store.load(tmp_path / "converted.safetensors")
    assert loaded["weight"].dtype == torch.float32 and loaded["weight"].value_dtype == torch.bfloat16
    assert torch.equal(loaded["weight"].dequantize(), store["weight"].dequantize())
    twin = nn.Linear(16, 8)
    with torch.no_grad():
        twin.bias.copy_(model.bias)
        assert torch.equal(fp8ctx.functional_call(twin, loaded, x), expected)


def test_pickle_round_trips_a_complete_store():
    store = FP8Store.from_module(small_model(), granularity="block", block_size=4, complete=True)
    back = pickle.loads(pickle.dumps(store))
    assert list(back) == list(store) and back.complete and list(back.unquantized) == list(store.unquantized)
    for name in store:
        assert isinstance(back[name], FP8Tensor) and back[name].fp8_layout == store[name].fp8_layout
        assert torch.equal(back[name].dequantize(), store[name].dequantize())


# -- validation before use ----------------------------------------------------------------------------


def _edit_layout(field, value):
    def damage(metadata, tensors):
        layouts = json.loads(metadata["fp8ctx.layouts"])
        layouts["fc.weight"][field] = value
        metadata["fp8ctx.layouts"] = json.dumps(layouts)

    return damage


def _set_tensor(key, make):
    def damage(metadata, tensors):
        tensors[key] = make(tensors[key])

    return damage


def _set_metadata(key, value):
    def damage(metadata, tensors):
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value

    return damage


DAMAGES = {
    "codes-uint8": (_set_tensor("fc.weight", lambda t: t.view(torch.uint8)), r"'fc.weight'.*codes must be"),
    "codes-float32": (_set_tensor("fc.weight", lambda t: t.float()), r"'fc.weight'.*codes must be"),
    "codes-relabelled-e5m2": (_set_tensor("fc.weight", lambda t: t.view(torch.float8_e5m2)), r"'fc.weight'.*codes must be"),
    "codes-shape": (_set_tensor("fc.weight", lambda t: t[:5]), r"'fc.weight'.*scales must be float32 of shape \(5,\)"),
    "scale-shape": (_set_tensor("fc.weight:scale", lambda t: t[:1]), r"'fc.weight'.*scales must be float32 of shape \(6,\)"),
    "scale-dtype": (_set_tensor("fc.weight:scale", lambda t: t.double()), r"'fc.weight'.*scales must be float32"),
    "scale-nan": (_set_tensor("fc.weight:scale", lambda t: t.clone().fill_(float("nan"))), r"'fc.weight'.*positive and finite"),
    "scale-inf": (_set_tensor("fc.weight:scale", lambda t: t.clone().fill_(float("inf"))), r"'fc.weight'.*positive and finite"),
    "scale-negative": (_set_tensor("fc.weight:scale", lambda t: -t), r"'fc.weight'.*positive and finite"),
    "scale-zero": (_set_tensor("fc.weight:scale", lambda t: t * 0), r"'fc.weight'.*positive and finite"),
    "dense-fp8": (_set_tensor("fc.bias", lambda t: t.to(torch.float8_e4m3fn)), r"unquantized tensor 'fc.bias' must be"),
    "stray-tensor": (lambda m, t: t.update(extra=torch.zeros(2)), r"\['extra'\] belong to no entry"),
    "no-scale": (lambda m, t: t.pop("fc.weight:scale"), r"'fc.weight' has a layout but no tensor 'fc.weight:scale'"),
    "no-codes": (lambda m, t: t.pop("fc.weight"), r"'fc.weight' has a layout but no tensor 'fc.weight'"),
    "dense-listed-absent": (lambda m, t: t.pop("fc.bias"), r"fp8ctx.unquantized lists 'fc.bias', which has no tensor"),
    "granularity": (_edit_layout("granularity", "rows"), r"layout of entry 'fc.weight'.*granularity"),
    "block-size-type": (_edit_layout("block_size", "128"), r"layout of entry 'fc.weight'.*block_size"),
    "channel-axis": (_edit_layout("channel_axis", 5), r"'fc.weight'.*channel_axis 5"),
    "storage-dtype": (_edit_layout("storage_dtype", "int8"), r"layout of entry 'fc.weight'.*storage_dtype"),
    "dtype": (_edit_layout("dtype", "int8"), r"'fc.weight' needs dtype"),
    "value-dtype": (_edit_layout("value_dtype", "float8_e4m3fn"), r"'fc.weight' needs value_dtype"),
    "layout-not-object": (lambda m, t: m.update({"fp8ctx.layouts": json.dumps({"fc.weight": [1]})}), r"layout of entry 'fc.weight' must be an object"),
    "layouts-bad-json": (_set_metadata("fp8ctx.layouts", "{not json"), r"metadata fp8ctx.layouts is not JSON"),
    "layouts-list": (_set_metadata("fp8ctx.layouts", "[]"), r"fp8ctx.layouts must be a JSON dict"),
    "unquantized-not-list": (_set_metadata("fp8ctx.unquantized", "{}"), r"fp8ctx.unquantized must be a JSON list"),
    "unquantized-names-not-str": (_set_metadata("fp8ctx.unquantized", "[1]"), r"fp8ctx.unquantized lists 1"),
    "complete-not-bool": (_set_metadata("fp8ctx.complete", '"yes"'), r"fp8ctx.complete must be a JSON bool"),
    "config-wrong": (_set_metadata("fp8ctx.config", json.dumps({"granularity": "tensor"})), r"config in its metadata"),
    "config-bad-field": (_set_metadata("fp8ctx.config", json.dumps({"colour": 1})), r"fp8ctx.config.*no field"),
    "format-newer": (_set_metadata("fp8ctx.format", "3"), r"fp8ctx.format is '3'.*upgrade fp8ctx"),
    "format-garbage": (_set_metadata("fp8ctx.format", "two"), r"fp8ctx.format is 'two'"),
    "no-layouts": (_set_metadata("fp8ctx.layouts", None), r"not an fp8ctx store"),
    # one name, two meanings: each would silently pick one of them
    "layouts-name-twice": (lambda m, t: m.update({"fp8ctx.layouts": m["fp8ctx.layouts"].replace(
        '{"fc.weight":', '{"fc.weight": {}, "fc.weight":', 1)}), r"fp8ctx.layouts names 'fc.weight' twice"),
    "unquantized-twice": (lambda m, t: m.update({"fp8ctx.unquantized": json.dumps(
        json.loads(m["fp8ctx.unquantized"]) * 2)}), r"fp8ctx.unquantized lists \['.*'\] more than once"),
    "scales-listed-as-unquantized": (lambda m, t: m.update({"fp8ctx.unquantized": json.dumps(
        json.loads(m["fp8ctx.unquantized"]) + ["fc.weight:scale"])}), r"'fc.weight:scale', the scales of FP8 entry"),
    "schemes-mixed-under-one-config": (_edit_layout("block_size", 64), r"fp8ctx.config declares one scheme"),
}


@pytest.mark.parametrize("damage,message", DAMAGES.values(), ids=DAMAGES.keys())
def test_every_damaged_part_is_refused_naming_file_and_field(saved, damage, message):
    metadata, tensors = read_raw(saved)
    damage(metadata, tensors)
    write_raw(saved, tensors, metadata)
    with pytest.raises(FP8Error, match=message) as caught:
        FP8Store.load(saved)
    assert str(saved) in str(caught.value)


def test_a_bad_device_is_blamed_not_the_file(saved):
    with pytest.raises(FP8Error, match="device='bogus' is not a device name"):
        FP8Store.load(saved, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(FP8Error, match="device='cuda'.*no CUDA device"):
            FP8Store.load(saved, device="cuda")


def test_loading_onto_a_device_puts_every_tensor_there(saved, device):
    loaded = FP8Store.load(saved, device=device)
    kind = torch.device(device).type
    assert all(e.qdata.device.type == kind and e.scale.device.type == kind for e in loaded.values())
    assert all(t.device.type == kind for t in loaded.unquantized.values())


# -- fuzzing: every outcome is a valid store or an FP8Error ------------------------------------------


def _fuzz_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "store.safetensors"
    FP8Store.from_module(small_model(), granularity="block", block_size=4, complete=True).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    return _fuzz_bytes(tmp_path_factory)


def _outcome(data: bytes, path) -> None:
    path.write_bytes(data)
    try:
        store = FP8Store.load(path)
    except FP8Error:
        return
    for entry in store.values():  # a store that loads is usable
        assert torch.isfinite(entry.dequantize().float()).all()


_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_fuzz_truncated_files(good_bytes, tmp_path, cut):
    _outcome(good_bytes[: min(cut, len(good_bytes) - 1)], tmp_path / "cut.safetensors")


@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=6))
def test_fuzz_byte_flips(good_bytes, tmp_path, flips):
    data = bytearray(good_bytes)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    _outcome(bytes(data), tmp_path / "flipped.safetensors")


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)


@_FUZZ
@given(data=st.data())
def test_fuzz_header_json_edits(good_bytes, tmp_path, data):
    size = struct.unpack("<Q", good_bytes[:8])[0]
    header = json.loads(good_bytes[8 : 8 + size])
    metadata = header["__metadata__"]
    key = data.draw(st.sampled_from(sorted(metadata)))
    value = metadata[key]
    parsed = json.loads(value) if value.startswith(("{", "[")) else value
    if isinstance(parsed, dict) and parsed and data.draw(st.booleans()):
        entry = data.draw(st.sampled_from(sorted(parsed)))
        if isinstance(parsed[entry], dict) and parsed[entry]:
            field = data.draw(st.sampled_from(sorted(parsed[entry])))
            parsed[entry][field] = data.draw(_JSON_VALUES)
        else:
            parsed[entry] = data.draw(_JSON_VALUES)
        metadata[key] = json.dumps(parsed)
    else:
        metadata[key] = data.draw(st.text(max_size=20) | _JSON_VALUES.map(json.dumps))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    _outcome(struct.pack("<Q", len(encoded)) + encoded + good_bytes[8 + size :], tmp_path / "edited.safetensors")


def test_an_interrupt_at_any_line_of_save_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    from test_context import InterruptAt

    class Where(InterruptAt):
        struck = ("", 0)

        def _line(self, frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "line" and self.lines + 1 == self.at:
                self.struck = (frame.f_code.co_name, frame.f_lineno)
            return super()._line(frame, event, arg)

    path = tmp_path / "store.safetensors"
    FP8Store.from_module(nn.Linear(4, 4)).save(path)
    old = path.read_bytes()
    new_store = FP8Store.from_module(small_model(), granularity="channel", complete=True)
    counting = InterruptAt()
    with counting:
        new_store.save(tmp_path / "reference.safetensors")
    new = (tmp_path / "reference.safetensors").read_bytes()
    cleanup = [number for number, line in enumerate(inspect.getsource(_storefile).splitlines(), 1)
               if "os.path.exists(partial)" in line or "os.unlink(partial)" in line]
    for at in range(1, counting.lines + 1):
        interrupt = Where(at)
        try:
            with interrupt:
                new_store.save(path)
        except KeyboardInterrupt:
            pass
        assert path.read_bytes() in (old, new), f"a damaged store after an interrupt at {interrupt.struck}"
        left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        if left:  # only an interrupt in the clean-up itself leaves the partial file (never under the name)
            assert interrupt.struck[0] == "_write_safetensors" and interrupt.struck[1] in cleanup, interrupt.struck
            for name in left:
                (tmp_path / name).unlink()
        path.write_bytes(old)
    assert FP8Store.load(tmp_path / "reference.safetensors").keys() == new_store.keys()
