"""One rank of the multi-process tests in tests/test_distributed.py, started by ``torch.distributed.run``.

Each rank runs every scenario below on the tiny Qwen2.5-VL text tower under the ``gloo`` backend, checks
what only the rank can see (its own exact restore, what FSDP2 holds and all-gathers), and writes its
outputs and measurements to ``<out>/<scenario>-rank<R>.pt`` for the test to compare with a single-process run.

Scenarios:
    replicas: one replica per rank, each inside its own ``fp8_weights`` block, on this rank's prompts.
    fsdp: the tower sharded with FSDP2 (``fully_shard`` per decoder layer and on the root), held as FP8 shards
        in each granularity and with FP8 compute; all-gather bytes counted against the bf16 FSDP2 run.
    fsdp_refusals: small sharded models that cannot be held; every rank must refuse, leaving them as they were.
    fsdp_mixed_precision: FSDP2's MixedPrecisionPolicy (bf16 compute) over float32 weights held as FP8.
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tests/ helpers, and this checkout's fp8ctx (not an installed one)
import _models  # noqa: E402
from conftest import assert_restored, snapshot  # noqa: E402

import fp8ctx  # noqa: E402
from fp8ctx import FP8Error, fp8_weights  # noqa: E402

PROMPTS_PER_RANK, TOKENS = 2, 12
# the FSDP2 runs: each granularity (block 8: k_proj's 32 rows on up to 4 ranks), and FP8 compute through the gather
HELD = {
    "tensor": {"granularity": "tensor"},
    "channel": {"granularity": "channel"},
    "block": {"granularity": "block", "block_size": 8},
    "channel-fp8-compute": {"granularity": "channel", "compute": "fp8"},
}


def prompts(world: int) -> torch.Tensor:
    """Every rank's prompts, rank r's at rows [2r, 2r + 2)."""
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, _models.QWEN25VL_VOCAB_SIZE, (world * PROMPTS_PER_RANK, TOKENS), generator=generator)


def mine(ids: torch.Tensor, rank: int) -> torch.Tensor:
    return ids[rank * PROMPTS_PER_RANK : (rank + 1) * PROMPTS_PER_RANK]


def replicas(rank: int, world: int) -> dict:
    model = _models.qwen25vl_text_tower()
    before = snapshot(model)
    with torch.no_grad(), fp8_weights(model, granularity="channel") as store:
        out = model(input_ids=mine(prompts(world), rank)).last_hidden_state
        held = {name: entry.qdata.dtype for name, entry in store.items()}
    assert_restored(model, before)
    return {"out": out, "held": held}


# the collective FSDP2 all-gathers with: torch 2.13 names it all_gather_single, older torch all_gather_into_tensor
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class AllGatherBytes:
    """Counts the bytes each rank sends into FSDP2's all-gathers (device-independent)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._real = getattr(dist, ALL_GATHER)

    def __call__(self, output_tensor, input_tensor, *args, **kwargs):
        self.bytes += input_tensor.numel() * input_tensor.element_size()
        return self._real(output_tensor, input_tensor, *args, **kwargs)


def sharded_tower():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _models.qwen25vl_text_tower()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _records(model) -> list:
    from fp8ctx._fsdp import _groups  # FSDP2 keeps one group or several, by torch version

    return [record for layer in model.layers for group in _groups(layer) for record in group.fsdp_params]


def fsdp(rank: int, world: int) -> dict:
    ids = mine(prompts(world), rank)
    model = sharded_tower()
    with torch.no_grad():
        # FSDP2 initializes lazily at the first forward and leaves the root all-gathered after it
        refusals = {}
        try:
            with fp8_weights(model):
                pass
        except FP8Error as error:
            refusals["before_first_forward"] = str(error)
        counter = AllGatherBytes()
        with mock.patch.object(dist, ALL_GATHER, counter):
            plain = model(input_ids=ids).last_hidden_state
        dense_gathered = counter.bytes
        try:
            with fp8_weights(model):
                pass
        except FP8Error as error:
            refusals["unsharded_root"] = str(error)
        model.reshard()
        try:
            with fp8_weights(model, store=fp8ctx.FP8Store.from_module(_models.qwen25vl_text_tower())):
                pass
        except FP8Error as error:
            refusals["store"] = str(error)
        before = snapshot(model)
        records = _records(model)
        sharded_before = [(record.sharded_param, record.all_gather_outputs) for record in records]
        results = {"plain": plain, "dense_gathered": dense_gathered, "refusals": refusals}
        for label, options in HELD.items():
            counter = AllGatherBytes()
            with fp8_weights(model, **options) as store:
                shards = {}
                for name, entry in store.items():
                    slot = model.get_parameter(name)  # between forwards: FSDP2's sharded parameter
                    local = slot._local_tensor
                    shards[name] = (type(local).__name__, local.qdata.dtype, tuple(local.shape), tuple(slot.shape),
                                    slot.dtype)
                with mock.patch.object(dist, ALL_GATHER, counter):
                    out = model(input_ids=ids).last_hidden_state
                model.reshard()  # the root too, so that the next forward gathers everything again
                # the next all-gathers land in the buffers the first FP8 weights view (fsdp_post_all_gather's out=)
                assert torch.equal(model(input_ids=ids).last_hidden_state, out)
                # after each layer's forward FSDP2 freed its all-gathered FP8 weight
                freed = all(t.untyped_storage().nbytes() == 0 for record in _records(model)
                            for t in record.all_gather_outputs)
                results[label] = {
                    "out": out, "gathered": counter.bytes, "shards": shards, "freed_after_forward": freed,
                    "store_nbytes": store.nbytes, "dense_nbytes": store.dense_nbytes,
                }
            assert_restored(model, before)
            assert [(r.sharded_param, r.all_gather_outputs) for r in records] == sharded_before
        # an error in the middle of a forward: FSDP2 never reaches its post-forward (layer 1 stays all-gathered
        # with FP8 weights); the block reshards it and restores every weight it held
        layers_before = snapshot(model.layers)
        failing = model.layers[1].mlp.register_forward_pre_hook(lambda *_: 1 / 0)
        try:
            with fp8_weights(model, granularity="channel"):
                model(input_ids=ids)
        except ZeroDivisionError:
            results["error_propagated"] = True
        finally:
            failing.remove()
        assert_restored(model.layers, layers_before)
        # (the root's own embedding and norm stay all-gathered after an error, as FSDP2 leaves them without fp8ctx)
        counter = AllGatherBytes()
        with mock.patch.object(dist, ALL_GATHER, counter):
            results["plain_after"] = model(input_ids=ids).last_hidden_state
        results["dense_gathered_after"] = counter.bytes
        model.reshard()
        assert_restored(model, before)
    return results


def _sharded(model, example):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    with torch.no_grad():
        model(example)  # FSDP2's lazy initialization
    model.reshard()
    return model


def fsdp_refusals(rank: int, world: int) -> dict:
    """What FSDP2 shards cannot be, refused on every rank with the model left as it was."""
    torch.manual_seed(0)
    nn = torch.nn
    rows, image = torch.randn(2, 16), torch.randn(1, 2 * world, 3, 3)
    nan = nn.Sequential(nn.Linear(16, 2 * world))
    with torch.no_grad():
        nan[0].weight[-1, 0] = float("nan")  # in the last rank's shard only
    cases = {
        "uneven": (nn.Sequential(nn.Linear(16, 2 * world + 1)), rows, {}),
        "block_straddles": (nn.Sequential(nn.Linear(16, 4 * world)), rows, {"granularity": "block", "block_size": 3}),
        "channel_on_dim_1": (nn.Sequential(nn.ConvTranspose2d(2 * world, 3, 1)), image, {"granularity": "channel"}),
        "nan_on_one_rank": (nan, rows, {"granularity": "channel"}),
    }
    messages = {}
    for label, (model, example, options) in cases.items():
        model = _sharded(model, example)
        before = snapshot(model)
        try:
            with fp8_weights(model, **options):
                pass
        except FP8Error as error:
            messages[label] = str(error)
        assert_restored(model, before)
    return messages


def fsdp_mixed_precision(rank: int, world: int) -> dict:
    """FSDP2 computing in bf16 (MixedPrecisionPolicy) over float32 weights held as FP8, and the same in one process:
    the FP8 weight dequantized in float32, then cast to bf16, as FSDP2 casts a dense weight."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(16, 8 * world), nn.GELU(), nn.Linear(8 * world, 8))
    twin, x = copy.deepcopy(model), torch.randn(4, 16)
    mesh, policy = init_device_mesh("cpu", (world,)), MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    with torch.no_grad():
        plain = model(x)
        model.reshard()
        before = snapshot(model)
        with fp8_weights(model, granularity="channel"):
            out = model(x)
        model.reshard()
        assert_restored(model, before)
        with fp8_weights(twin, granularity="channel"):
            twin.bfloat16()
            expected = twin(x.bfloat16())
    return {"out": out, "expected": expected, "plain": plain}


SCENARIOS = {
    "replicas": replicas, "fsdp": fsdp, "fsdp_refusals": fsdp_refusals, "fsdp_mixed_precision": fsdp_mixed_precision,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        for name in args.scenarios.split(","):
            result = SCENARIOS[name](rank, world)
            torch.save(result, os.path.join(args.out, f"{name}-rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
