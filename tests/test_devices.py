"""Every public function that takes a device checks it when called: a clear FP8Error, nothing changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8ctx import FP8Error, FP8Store
from fp8ctx._cli import main

# (what the caller passes, a fragment the message must show)
BAD_DEVICES = [
    ("bogus", "is not a device name"),
    ("meta", "no values"),
    (torch.device("meta"), "no values"),
    ("cuda:99", "cuda"),  # no CUDA here, or an index this machine does not have
    ("mps", "mps"),  # a backend fp8ctx does not hold weights on (or this torch lacks)
    ("xpu:0", "xpu"),
    ("cpu:3", "one host device"),
    (-1, "not a device"),
    (1.5, "must be a device name"),
    (None, "must be a device name"),
    (True, "must be a device name"),
]
IDS = ["bogus", "meta", "meta-device", "cuda-index", "mps", "xpu", "cpu-index", "negative", "float", "none", "bool"]
if not torch.cuda.is_available():
    BAD_DEVICES.append(("cuda", "no CUDA device is available"))
    IDS.append("cuda-without-cuda")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture
def store() -> FP8Store:
    return FP8Store.from_module(model(), complete=True)


def assert_device_error(error: FP8Error, device: object, fragment: str, option: str = "device") -> None:
    message = str(error)
    assert message.startswith(f"{option}=") or message.startswith(f"{option} must"), message  # names the option
    assert repr(device) in message, message  # what came
    assert fragment in message, message
    assert "cpu" in message, message  # what is expected / the way out


@pytest.mark.parametrize("device, fragment", BAD_DEVICES, ids=IDS)
def test_store_load_refuses_a_bad_device_before_reading_the_file(device, fragment, store, tmp_path):
    path = tmp_path / "s.safetensors"
    store.save(path)
    with pytest.raises(FP8Error) as caught:
        FP8Store.load(path, device=device)
    assert_device_error(caught.value, device, fragment)
    assert str(path) not in str(caught.value)  # the file is not blamed


@pytest.mark.parametrize("device, fragment", BAD_DEVICES, ids=IDS)
def test_store_to_and_entry_to_device_refuse_a_bad_device_and_change_nothing(device, fragment, store):
    before = {name: (entry.qdata, entry.scale) for name, entry in store.items()}
    with pytest.raises(FP8Error) as caught:
        store.to(device)
    assert_device_error(caught.value, device, fragment)
    entry = store["0.weight"]
    with pytest.raises(FP8Error) as caught:
        entry.to_device(device)
    assert_device_error(caught.value, device, fragment)
    assert all(store[name].qdata is data and store[name].scale is scale for name, (data, scale) in before.items())
    assert all(e.device.type == "cpu" for e in store.values())


@pytest.mark.parametrize("device, fragment", BAD_DEVICES, ids=IDS)
def test_from_checkpoint_refuses_a_bad_device_before_reading_the_checkpoint(device, fragment, tmp_path):
    with torch.device("meta"):
        skeleton = model()
    with pytest.raises(FP8Error) as caught:
        FP8Store.from_checkpoint(skeleton, tmp_path / "missing.safetensors", device=device)
    assert_device_error(caught.value, device, fragment)


@pytest.mark.parametrize("device, fragment", [d for d in BAD_DEVICES if isinstance(d[0], str)],
                         ids=[i for d, i in zip(BAD_DEVICES, IDS) if isinstance(d[0], str)])
@pytest.mark.parametrize("command", ["report", "quantize"])
def test_cli_refuses_a_bad_device_in_one_line_before_any_work(command, device, fragment, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    source = tmp_path / "no-such-model"  # the device is checked first: the missing source is not reached
    arguments = ["report", "--device", device] if command == "report" else ["quantize", str(source), str(out),
                                                                            "--device", device]
    assert main(arguments) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "--device=" in errors[0] and repr(device) in errors[0] and fragment in errors[0]
    assert not out.exists()


def test_good_spellings_are_accepted(store, tmp_path):
    path = tmp_path / "s.safetensors"
    store.save(path)
    for device in ("cpu", "cpu:0", torch.device("cpu")):
        loaded = FP8Store.load(path, device=device)
        assert all(entry.device == torch.device("cpu") for entry in loaded.values())
        assert all(entry.device == torch.device("cpu") for entry in store.to(device).values())
