"""safetensors files one tensor at a time: the reader keeps little of a file mapped."""

from __future__ import annotations

from torch import nn

from fp8ctx import FP8Store


def test_reading_a_file_does_not_keep_the_whole_file_mapped(tmp_path, monkeypatch):
    """The reader reopens its map every window: the pages it read can go, one window at a time."""
    from fp8ctx import _safetensors

    monkeypatch.setattr(_safetensors, "_WINDOW", 1)
    opened = []
    real = _safetensors.TensorReader._open

    def counting(self):
        fresh = self._handle is None
        handle = real(self)
        opened.append(fresh)
        return handle

    monkeypatch.setattr(_safetensors.TensorReader, "_open", counting)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    FP8Store.from_module(model, complete=True).save(tmp_path / "s.safetensors")
    opened.clear()
    FP8Store.load(tmp_path / "s.safetensors")
    assert sum(opened) > 8  # reopened as it read, not one map over the whole file
