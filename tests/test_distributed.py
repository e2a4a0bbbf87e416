"""Several processes on CPU under gloo, started by ``torch.distributed.run`` (torchrun): one replica per rank, and
FSDP2 shards held as FP8 (``fp8ctx/_fsdp.py``).

One launch per world size runs every scenario of ``tests/_distributed_worker.py``; each rank asserts its own exact
restore (a failure there fails the launch) and saves its outputs and byte counts, which are compared here with a
single-process run of the same model. World sizes: ``FP8CTX_TEST_RANKS`` (default ``2``; ``2,4`` adds a four-rank
launch, about 30 s on two cores).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import _distributed_worker as worker
import _models
from fp8ctx import fp8_weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

RANKS = [int(n) for n in os.environ.get("FP8CTX_TEST_RANKS", "2").split(",")]
# FSDP2 all-gathers through the device's stream events; torch 2.6's CPU stream has none, so there the sharded
# model fails at its first forward without fp8ctx as well
FSDP2_ON_CPU = hasattr(torch.cpu.Stream(), "record_event")
needs_fsdp2 = pytest.mark.skipif(
    not FSDP2_ON_CPU,
    reason=f"torch {torch.__version__}'s FSDP2 cannot all-gather on a CPU (torch.cpu.Stream has no record_event): "
    "the sharded model fails without fp8ctx too",
)
SCENARIOS = list(worker.SCENARIOS) if FSDP2_ON_CPU else ["replicas"]


@pytest.fixture(scope="module", params=RANKS, ids=lambda n: f"{n}ranks")
def launch(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"ranks{world}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               worker.__file__, "--out", str(out), "--scenarios", ",".join(SCENARIOS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    results = {name: [torch.load(out / f"{name}-rank{rank}.pt", weights_only=False) for rank in range(world)]
               for name in SCENARIOS}
    return world, results


@pytest.fixture(scope="module")
def single_process():
    """The same tower in one process: plain, and inside fp8_weights with each of the worker's options, on every
    rank's prompts."""
    model = _models.qwen25vl_text_tower()
    ids = worker.prompts(max(RANKS))
    with torch.no_grad():
        runs = {"plain": model(input_ids=ids).last_hidden_state}
        runs["replicas"] = _fp8_run(model, ids, granularity="channel")
        for label, options in worker.HELD.items():
            runs[label] = _fp8_run(model, ids, **options)
    return model, runs


def _fp8_run(model, ids, **options):
    with fp8_weights(model, **options):
        return model(input_ids=ids).last_hidden_state


def _rows(tensor, rank):
    return tensor[rank * worker.PROMPTS_PER_RANK : (rank + 1) * worker.PROMPTS_PER_RANK]


def test_torchrun_replicas_each_match_the_single_process_fp8_run(launch, single_process):
    world, results = launch
    _, runs = single_process
    for rank, result in enumerate(results["replicas"]):
        assert set(result["held"].values()) == {torch.float8_e4m3fn}
        assert torch.equal(result["out"], _rows(runs["replicas"], rank)), f"rank {rank}"
        assert not torch.equal(result["out"], _rows(runs["plain"], rank)), "nothing was quantized"


@needs_fsdp2
def test_fsdp2_shards_are_held_as_fp8_and_match_the_single_process_fp8_run(launch, single_process):
    world, results = launch
    model, runs = single_process
    for rank, result in enumerate(results["fsdp"]):
        assert torch.equal(result["plain"], _rows(runs["plain"], rank))  # FSDP2 itself changes nothing on CPU
        for label in worker.HELD:
            held = result[label]
            for name, (kind, storage, local_shape, shape, dtype) in held["shards"].items():
                full = model.get_parameter(name)
                assert kind == "FP8Shard" and storage == torch.float8_e4m3fn
                assert shape == tuple(full.shape) and dtype == full.dtype  # what the model reports is unchanged
                assert local_shape == (full.shape[0] // world, *full.shape[1:])  # this rank's rows only
            assert torch.equal(held["out"], _rows(runs[label], rank)), f"rank {rank}, {label}"
            assert held["freed_after_forward"], "an all-gathered FP8 weight outlived its layer's forward"


def _fp8_shard_bytes(
    model: nn.Module, world: int, granularity: str, block_size: int = 128, compute: str = "weight_only"
) -> tuple[int, int, int]:
    """One rank's shards of the tower's Linear weights, from the shapes: (bf16 bytes, FP8 bytes all-gathered,
    FP8 bytes held). Codes and per-row/per-tile scales are gathered; a per-tensor scale is held by every rank."""
    dense = gathered = held = 0
    for layer in model.layers.modules():
        if not isinstance(layer, nn.Linear):
            continue
        rows, cols = layer.weight.shape
        dense += rows * cols * layer.weight.element_size() // world
        codes = rows * cols // world
        if granularity == "tensor":
            gathered, held = gathered + codes, held + codes + 4
            continue
        scales = rows // world if granularity == "channel" else math.ceil(rows / block_size) // world * math.ceil(cols / block_size)
        gathered, held = gathered + codes + 4 * scales, held + codes + 4 * scales
    return dense, gathered, held


@needs_fsdp2
def test_fsdp2_all_gather_carries_fp8_codes_and_scales(launch, single_process):
    world, results = launch
    model, _ = single_process
    for result in results["fsdp"]:
        for label, options in worker.HELD.items():
            dense, gathered, held = _fp8_shard_bytes(model, world, **options)
            run = result[label]
            # the same all-gathers as the bf16 run (embedding, norms and biases unchanged), the weights in FP8
            assert run["gathered"] == result["dense_gathered"] - dense + gathered, label
            assert run["store_nbytes"] == held and run["dense_nbytes"] == dense


@needs_fsdp2
def test_fsdp2_exit_after_an_error_and_the_refusals(launch, single_process):
    _, results = launch
    for result in results["fsdp"]:
        assert result["error_propagated"]
        assert torch.equal(result["plain_after"], result["plain"])  # FSDP2 runs bf16 again, same output
        refusals = result["refusals"]
        assert "initialized it yet" in refusals["before_first_forward"] and "one forward" in refusals["before_first_forward"]
        assert "model.reshard()" in refusals["unsharded_root"]
        assert "store= does not apply to FSDP2 shards" in refusals["store"]


@needs_fsdp2
def test_fsdp2_shards_that_cannot_be_held_are_refused_on_every_rank(launch):
    world, results = launch
    for messages in results["fsdp_refusals"]:  # each rank also asserted its model was left as it was
        assert f"has {2 * world + 1} rows over {world} ranks" in messages["uneven"]
        assert "not a multiple of block_size 3" in messages["block_straddles"]
        assert "per-channel scales on dim 1 span the sharded dim 0" in messages["channel_on_dim_1"]
        # the NaN sits in the last rank's shard; every rank refuses (none is left waiting in a collective)
        assert "contains NaN or Inf on some rank" in messages["nan_on_one_rank"]


@needs_fsdp2
def test_fsdp2_mixed_precision_computes_in_its_param_dtype_from_the_fp8_weights(launch):
    _, results = launch
    for result in results["fsdp_mixed_precision"]:
        assert result["out"].dtype == torch.bfloat16
        assert torch.equal(result["out"], result["expected"])  # the one-process FP8 run converted with .bfloat16()
        assert not torch.equal(result["out"], result["plain"]), "nothing was quantized"
