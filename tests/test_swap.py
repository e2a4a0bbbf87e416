"""`Journal` and `find_slots`: the only code that writes module parameters, checked object by object."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from fp8ctx._swap import ABSENT, Journal, find_slots


class RecordingDict(dict):
    """A module's ``_parameters`` that logs every assignment, and can be told to fail on one value."""

    def __init__(self, source: dict, log: list, fail_on: object = None, error: BaseException | None = None) -> None:
        super().__init__(source)
        self.log, self.fail_on, self.error = log, fail_on, error

    def __setitem__(self, key, value) -> None:
        if self.error is not None and value is self.fail_on:
            raise self.error
        self.log.append((key, value))
        super().__setitem__(key, value)


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Conv1d(6, 6, 1)), nn.LayerNorm(6))
    return net.eval()


def fresh(param: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.full_like(param, 7.0), requires_grad=False)


def test_swap_then_undo_puts_back_the_very_same_objects():
    net = model()
    before = snapshot(net)
    targets = [(net[0], "weight"), (net[0], "bias"), (net[2][0], "weight"), (net[2][1], "weight"), (net[3], "bias")]
    originals = [layer._parameters[attribute] for layer, attribute in targets]
    replacements = [fresh(p) for p in originals]
    journal = Journal()
    for (layer, attribute), replacement in zip(targets, replacements):
        journal.swap(layer, attribute, replacement)
    for (layer, attribute), replacement in zip(targets, replacements):
        assert layer._parameters[attribute] is replacement
        assert getattr(layer, attribute) is replacement  # what forward reads
    assert list(net[0]._parameters) == ["weight", "bias"]  # order of registration kept
    journal.undo()
    for (layer, attribute), original in zip(targets, originals):
        assert layer._parameters[attribute] is original
    assert_restored(net, before)
    journal.undo()  # a second undo has nothing left to do
    assert_restored(net, before)


def test_swap_fires_no_parameter_registration_hooks_and_adds_no_attributes():
    net = model()
    seen = []
    handle = register_module_parameter_registration_hook(lambda module, name, param: seen.append(name))
    try:
        attributes = sorted(vars(net[0]))
        journal = Journal()
        journal.swap(net[0], "weight", fresh(net[0].weight))
        assert sorted(vars(net[0])) == attributes
        journal.undo()
        assert seen == []
        net[0].weight = nn.Parameter(net[0].weight.detach().clone())  # the hook does fire on a normal assignment
        assert seen == ["weight"]
    finally:
        handle.remove()


@pytest.mark.parametrize("times", [2, 3], ids=["twice", "three-times"])
def test_undo_runs_newest_first(times):
    layer = nn.Linear(3, 3)
    original = layer.weight
    log: list = []
    layer._parameters = RecordingDict(layer._parameters, log)
    replacements = [fresh(original) for _ in range(times)]
    journal = Journal()
    for replacement in replacements:
        journal.swap(layer, "weight", replacement)
    assert layer.weight is replacements[-1]
    log.clear()
    journal.undo()
    # each step puts back what its swap found: the latest replacement first, the original last
    assert [value for _, value in log] == replacements[-2::-1] + [original]
    assert layer.weight is original


@pytest.mark.parametrize("error", [RuntimeError("mid-swap"), KeyboardInterrupt()], ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("done", [0, 1, 2, 4], ids=lambda n: f"after-{n}-swaps")
def test_half_done_sequence_is_fully_rolled_back(done, error):
    net = model()
    before = snapshot(net)
    targets = [(net[0], "weight"), (net[0], "bias"), (net[2][0], "weight"), (net[2][1], "weight"), (net[3], "weight")]
    journal = Journal()
    with pytest.raises(type(error)) as caught:
        try:
            for step, (layer, attribute) in enumerate(targets):
                if step == done:
                    raise error
                journal.swap(layer, attribute, fresh(layer._parameters[attribute]))
                journal.offload(layer._parameters[attribute])  # a CPU tensor: recorded as nothing
        except BaseException:
            journal.undo()
            raise
    assert caught.value is error
    assert_restored(net, before)


def test_offload_of_cpu_parameters_is_a_no_op():
    net = model()
    before = snapshot(net)
    params = list(net.parameters())
    pointers = [p.data_ptr() for p in params]
    journal = Journal()
    for param in params:
        journal.offload(param)
    assert [p.data_ptr() for p in params] == pointers  # no copy, nothing freed
    assert not any(torch.isnan(p).any() for p in params)  # no placeholder
    journal.undo()
    assert [p.data_ptr() for p in net.parameters()] == pointers
    assert_restored(net, before)


def test_a_failing_undo_step_does_not_stop_the_others_and_the_first_error_is_raised(caplog):
    layers = [nn.Linear(2, 2) for _ in range(4)]
    originals = [layer.weight for layer in layers]
    first, second = RuntimeError("restore of layer 2 failed"), ValueError("restore of layer 0 failed")
    journal = Journal()
    for layer in layers:
        journal.swap(layer, "weight", fresh(layer.weight))
    # undo runs newest first: layer 3, then 2 (fails first), 1, then 0 (fails second)
    for index, error in ((2, first), (0, second)):
        layers[index]._parameters = RecordingDict(layers[index]._parameters, [], originals[index], error)
    with caplog.at_level(logging.ERROR, logger="fp8ctx"):
        with pytest.raises(RuntimeError) as caught:
            journal.undo()
    assert caught.value is first
    assert layers[3].weight is originals[3] and layers[1].weight is originals[1]  # the steps after a failure ran
    assert layers[2].weight is not originals[2] and layers[0].weight is not originals[0]
    assert sum("restore step failed" in record.getMessage() for record in caplog.records) == 2


def test_a_conversion_of_the_stand_in_is_applied_to_the_original_on_undo():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).bfloat16()
    weight, bias = layer.weight, layer.bias
    values = weight.detach().clone()
    journal = Journal()
    journal.swap(layer, "weight", fresh(weight))
    layer.half()  # inside the block: the stand-in (same object) becomes float16, the bias too
    journal.undo()
    assert layer.weight is weight and layer.bias is bias
    assert weight.dtype == torch.float16 and torch.equal(weight.detach(), values.half())  # the user's move, kept


def test_a_slot_reassigned_inside_still_gets_its_original_back(caplog):
    layer = nn.Linear(4, 3)
    weight = layer.weight
    values = weight.detach().clone()
    journal = Journal()
    journal.swap(layer, "weight", fresh(weight))
    layer.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.float16))  # not a move of the stand-in
    with caplog.at_level(logging.WARNING, logger="fp8ctx"):
        journal.undo()
    assert layer.weight is weight and weight.dtype == torch.float32 and torch.equal(weight.detach(), values)
    assert any("reassigned inside the block" in record.getMessage() for record in caplog.records)


def test_find_slots_finds_every_slot_of_a_tied_weight():
    torch.manual_seed(0)
    embed = nn.Embedding(10, 4)
    shared = nn.Linear(4, 4)  # one module reachable by two paths: one slot, found once
    root = nn.ModuleDict(
        {
            "embed": embed,
            "blocks": nn.ModuleList([nn.Sequential(nn.Linear(4, 10, bias=False)), nn.Linear(4, 10, bias=False)]),
            "a": shared,
            "b": nn.Sequential(shared),
            "head": nn.Linear(4, 10, bias=False),
        }
    )
    root["blocks"][0][0].weight = embed.weight
    root["blocks"][1].weight = embed.weight
    root["head"].weight = embed.weight
    alone = nn.Parameter(torch.zeros(3))  # not in the tree
    found = find_slots(root, [embed.weight, shared.weight, shared.bias, alone])
    key = lambda slots: sorted((id(m), a) for m, a in slots)  # noqa: E731
    assert set(found) == {id(embed.weight), id(shared.weight), id(shared.bias), id(alone)}
    assert key(found[id(embed.weight)]) == key(
        [(embed, "weight"), (root["blocks"][0][0], "weight"), (root["blocks"][1], "weight"), (root["head"], "weight")]
    )
    assert key(found[id(shared.weight)]) == [(id(shared), "weight")]
    assert key(found[id(shared.bias)]) == [(id(shared), "bias")]
    assert found[id(alone)] == []
    # swapping every slot with one object keeps the tie, and undo brings the original back to all four
    journal = Journal()
    replacement = fresh(embed.weight)
    for module, attribute in found[id(embed.weight)]:
        journal.swap(module, attribute, replacement)
    assert root["head"].weight is replacement and root["blocks"][0][0].weight is replacement
    journal.undo()
    assert all(m.weight is embed.weight for m in (root["head"], root["blocks"][0][0], root["blocks"][1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload only moves parameters off an accelerator")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_offload_frees_device_memory_and_restores_bits_and_strides(layout):
    torch.manual_seed(0)
    dense = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    param = nn.Parameter(dense if layout == "contiguous" else dense.t(), requires_grad=False)
    del dense
    bits, stride = param.detach().cpu().view(torch.int16).clone(), param.stride()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    journal = Journal()
    journal.offload(param)
    torch.cuda.synchronize()
    assert allocated - torch.cuda.memory_allocated() >= 1024 * 2048 * 2 - 1024  # only a 1-element placeholder left
    assert param.shape == ((1024, 2048) if layout == "contiguous" else (2048, 1024))
    assert param.device.type == "cuda" and torch.isnan(param).all()  # loudly wrong if still used
    journal.undo()
    torch.cuda.synchronize()
    assert param.device.type == "cuda" and param.stride() == stride
    assert torch.equal(param.detach().cpu().view(torch.int16), bits)


def test_set_attributes_on_a_bookkeeping_object_are_undone_including_absent_ones():
    class Record:  # stands for another library's per-parameter record (FSDP2's FSDPParam)
        pass

    record, buffers, cached = Record(), [torch.zeros(2)], torch.ones(3)
    record.buffers, record.cached = buffers, cached
    journal = Journal()
    journal.set_attributes(record, {"buffers": [], "cached": ABSENT, "extension": "new"})
    assert record.buffers == [] and not hasattr(record, "cached") and record.extension == "new"
    order = []
    journal.on_undo(lambda: order.append(("first undone", hasattr(record, "extension"))))
    journal.undo()
    assert order == [("first undone", True)]  # a step recorded last runs before the earlier ones
    assert record.buffers is buffers and record.cached is cached and not hasattr(record, "extension")


def test_offload_storage_leaves_cpu_storage_in_place():
    shard = torch.randn(4, 8)
    before = shard.untyped_storage().data_ptr()
    journal = Journal()
    journal.offload_storage(shard)
    assert shard.untyped_storage().nbytes() == 32 * 4 and shard.untyped_storage().data_ptr() == before
    journal.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload only moves storage off an accelerator")
def test_offload_storage_frees_device_memory_and_brings_the_same_bytes_back_into_the_same_storage():
    torch.manual_seed(0)
    padded = torch.randn(1024 * 2048, device="cuda", dtype=torch.bfloat16)
    shard = padded.view(1024, 2048)[:1000]  # a view of part of it, as FSDP2's shard of its padded data
    storage, bits = padded.untyped_storage(), padded.cpu().view(torch.int16).clone()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    journal = Journal()
    journal.offload_storage(shard)
    torch.cuda.synchronize()
    assert allocated - torch.cuda.memory_allocated() >= 1024 * 2048 * 2
    assert padded.untyped_storage().nbytes() == 0 and shard.shape == (1000, 2048)  # objects kept
    journal.undo()
    assert padded.untyped_storage().data_ptr() == storage.data_ptr()  # the same storage, re-allocated
    assert torch.equal(padded.cpu().view(torch.int16), bits) and torch.equal(shard.cpu(), padded.view(1024, 2048)[:1000].cpu())


def _swapped_layers(count: int = 3) -> tuple[list[nn.Linear], list[nn.Parameter], Journal]:
    layers = [nn.Linear(2, 2) for _ in range(count)]
    originals = [layer.weight for layer in layers]
    journal = Journal()
    for layer in layers:
        journal.swap(layer, "weight", nn.Parameter(torch.zeros(2, 2)))
    return layers, originals, journal


def test_an_interrupted_undo_is_finished_by_calling_it_again():
    layers, originals, journal = _swapped_layers()
    step = journal._undo[1]
    interrupted = []

    def interrupted_once() -> None:  # a Ctrl-C inside the second step to run
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        step()

    journal._undo[1] = interrupted_once
    with pytest.raises(KeyboardInterrupt):
        journal.undo()
    assert journal.pending == 2  # the interrupted step stays recorded, and so does the one below it
    assert layers[2].weight is originals[2] and layers[0].weight is not originals[0]
    journal.undo()
    journal.undo()  # idempotent once done
    assert journal.pending == 0
    assert all(layer.weight is original for layer, original in zip(layers, originals))


def test_a_failing_undo_step_stays_pending_and_the_rest_still_run():
    layers, originals, journal = _swapped_layers()
    step = journal._undo[1]
    failures = []

    def fails_once() -> None:
        if not failures:
            failures.append(True)
            raise RuntimeError("restore step failed")
        step()

    journal._undo[1] = fails_once
    with pytest.raises(RuntimeError, match="restore step failed"):
        journal.undo()
    assert journal.pending == 1 and layers[0].weight is originals[0] and layers[2].weight is originals[2]
    journal.undo()
    assert journal.pending == 0 and layers[1].weight is originals[1]


def test_putting_back_twice_is_harmless_and_a_deleted_slot_gets_the_original_back(caplog):
    layers, originals, journal = _swapped_layers(1)
    del layers[0].weight
    journal._undo[0]()  # the step ran, but an interrupt came before it left the record
    journal.undo()
    assert layers[0].weight is originals[0]
    assert "deleted inside the block" in caplog.text
