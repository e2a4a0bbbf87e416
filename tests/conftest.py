"""Shared fixtures: the device matrix, the exact-restore check, and an independent FP8 reference."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))  # tests/_models.py: small real models built in code

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


# -- exact restore ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """Everything about a module tree that fp8_weights must give back unchanged."""

    params: list[tuple[str, int, torch.Tensor, torch.dtype, torch.device, bool, tuple[int, ...], tuple[int, ...]]]
    buffers: list[tuple[str, int, torch.Tensor]]
    modules: list[tuple[str, type, list[str], list[int], list[int], list[int], Any]]
    global_hooks: tuple[int, ...]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_meta:  # no values to compare; identity and metadata still are
        return torch.empty(0, dtype=torch.uint8)
    if type(tensor).__name__ == "DTensor":  # a sharded parameter: this rank's shard, and the local object
        local = tensor._local_tensor
        return torch.cat([_bits(local), torch.tensor([id(local)]).view(torch.uint8)])
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def _global_hook_counts() -> tuple[int, ...]:
    from torch.nn.modules import module as m

    names = [n for n in dir(m) if n.startswith("_global_") and n.endswith(("hooks", "hook"))]
    return tuple(len(getattr(m, n)) for n in sorted(names) if isinstance(getattr(m, n), dict))


def snapshot(model: nn.Module) -> Snapshot:
    params = [
        (n, id(p), _bits(p), p.dtype, p.device, p.requires_grad, tuple(p.shape), tuple(p.stride()))
        for n, p in model.named_parameters(remove_duplicate=False)
    ]
    buffers = [(n, id(b), _bits(b)) for n, b in model.named_buffers(remove_duplicate=False)]
    modules = [
        (
            n,
            type(m),
            sorted(vars(m)),
            list(m._forward_hooks),
            list(m._forward_pre_hooks),
            list(m._backward_hooks),
            vars(m).get("forward"),
        )
        for n, m in model.named_modules(remove_duplicate=False)
    ]
    return Snapshot(params, buffers, modules, _global_hook_counts())


def assert_restored(model: nn.Module, before: Snapshot) -> None:
    """Same Parameter objects, same bits, dtype, device, grad flag, strides; same classes, instance
    attributes and hooks; no global hooks left."""
    after = snapshot(model)
    assert [p[:2] for p in after.params] == [p[:2] for p in before.params], f"Parameter objects differ: {[a[0] for a, b in zip(after.params, before.params) if a[:2] != b[:2]]}"
    for old, new in zip(before.params, after.params):
        name = old[0]
        assert torch.equal(old[2], new[2]), f"{name}: bits differ"
        assert old[3:] == new[3:], f"{name}: dtype/device/requires_grad/shape/stride differ: {old[3:]} vs {new[3:]}"
    assert [b[:2] for b in after.buffers] == [b[:2] for b in before.buffers], "buffer objects differ"
    for old, new in zip(before.buffers, after.buffers):
        assert torch.equal(old[2], new[2]), f"buffer {old[0]}: bits differ"
    assert after.modules == before.modules, "module classes, attributes or hooks differ"
    assert after.global_hooks == before.global_hooks, "global module hooks left behind"


# -- an FP8 reference written from the formula, independent of fp8ctx -----------------------------


def reference_qdq(
    weight: torch.Tensor,
    granularity: str = "channel",  # the library's default
    block_size: int = 128,
    storage_dtype: torch.dtype = torch.float8_e4m3fn,
    channel_axis: int = 0,
) -> torch.Tensor:
    """Quantize-dequantize ``weight`` by the documented formula, group by group, with plain loops."""
    fmax = FP8_MAX[storage_dtype]
    w = weight.detach().float().movedim(channel_axis, 0)
    shape = w.shape
    w = w.reshape(shape[0], math.prod(shape[1:]))  # sizes spelled out: a weight may have no channels
    out = torch.empty_like(w)

    def qdq(group: torch.Tensor) -> torch.Tensor:
        if group.numel() == 0:  # nothing to round
            return group
        amax = group.abs().max()
        scale = amax / fmax if amax > 0 else torch.tensor(1.0)
        q = torch.clamp(group / scale, -fmax, fmax).to(storage_dtype)
        return q.float() * scale

    if granularity == "tensor":
        out = qdq(w)
    elif granularity == "channel":
        for c in range(w.shape[0]):
            out[c] = qdq(w[c])
    else:
        for r in range(math.ceil(w.shape[0] / block_size)):
            for c in range(math.ceil(w.shape[1] / block_size)):
                rows = slice(r * block_size, (r + 1) * block_size)
                cols = slice(c * block_size, (c + 1) * block_size)
                out[rows, cols] = qdq(w[rows, cols])
    return out.reshape(shape).movedim(0, channel_axis).to(weight.dtype)


def fake_quantized_copy(
    model: nn.Module,
    granularity: str = "channel",  # the library's default
    block_size: int = 128,
    storage_dtype: torch.dtype = torch.float8_e4m3fn,
    layers: tuple[type, ...] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` whose targeted weights are replaced by :func:`reference_qdq` values."""
    from fp8ctx import DEFAULT_LAYERS

    layers = layers or DEFAULT_LAYERS
    twin = copy.deepcopy(model)
    done: set[int] = set()
    with torch.no_grad():
        for layer in twin.modules():
            weight = getattr(layer, "weight", None)
            if not isinstance(layer, layers) or weight is None or id(weight) in done:
                continue
            axis = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
            weight.copy_(reference_qdq(weight, granularity, block_size, storage_dtype, axis))
            done.add(id(weight))
    return twin


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
