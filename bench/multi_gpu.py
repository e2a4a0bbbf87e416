#!/usr/bin/env python3
"""fp8ctx on models spread over several devices (issue 14): accelerate device maps, torchrun replicas, FSDP2.

    python3 bench/multi_gpu.py --out DIR                    # everything this machine allows, in one call
    python3 bench/multi_gpu.py --tiny --device cpu --out DIR   # CPU smoke test: toy shapes, gloo, 2 ranks

On the Qwen2.5-VL-7B text tower shapes (``bench/_workloads.py``: hidden 3584, intermediate 18944, 28/4 heads,
``--layers`` decoder layers, random N(0, 0.02) weights, bf16), it measures:

- ``accelerate``: the tower dispatched with ``accelerate.dispatch_model`` over GPU 0 + CPU (always) and over
  GPU 0 + GPU 1 (with two GPUs): memory on each GPU outside and inside ``fp8_weights``, the output against
  the single-device FP8 run, forward time, and whether exit restored every parameter bit for bit with the
  hooks in place;
- ``replicas``: ``torchrun --nproc-per-node N`` (N = the GPUs), one replica per rank: tokens/s in bf16 and
  inside ``fp8_weights``, memory, output error against bf16;
- ``fsdp``: the tower sharded with FSDP2 (``fully_shard`` per decoder layer and on the root) over N ranks: per
  rank memory, all-gather bytes per forward and forward time, bf16 against FP8 shards.

Writes ``DIR/multi_gpu.json`` (everything) and prints a summary. The torchrun parts run this file again with
``--worker`` (one process per rank). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import _workloads as W  # noqa: E402
import fp8ctx  # noqa: E402

GiB = 2**30


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    config = W.TINY_TEXT if args.tiny else W.QWEN25VL_7B_TEXT
    return W._build_text(device, config, args.layers, seed=0)


def prompts(args: argparse.Namespace, device: torch.device, seed: int = 0) -> torch.Tensor:
    vocab = (W.TINY_TEXT if args.tiny else W.QWEN25VL_7B_TEXT)["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (args.batch, args.tokens), generator=generator).to(device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run, iters: int) -> tuple[torch.Tensor, float]:
    """The output of ``run()`` and its median time in ms (after one warm-up)."""
    out = run()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        out = run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def allocated() -> dict[str, float]:
    return {f"cuda:{i}": torch.cuda.memory_allocated(i) / GiB for i in range(torch.cuda.device_count())}


def local(tensor: torch.Tensor) -> torch.Tensor:
    return getattr(tensor, "_local_tensor", tensor)


def fingerprint(model: torch.nn.Module) -> list:
    """Identity, device and two checksums of the bits of every parameter (an FSDP2 shard: its local tensor)."""
    rows = []
    for name, param in model.named_parameters(remove_duplicate=False):
        words = local(param).detach().contiguous().view(-1).view(torch.int16).to(torch.int32)
        rows.append((name, id(param), str(param.device), int(words.sum(dtype=torch.int64)),
                     int((words ^ (words >> 5)).sum(dtype=torch.int64))))
    return rows


def hooks(model: torch.nn.Module) -> list:
    return [(name, id(vars(m).get("_hf_hook")), id(vars(m).get("forward"))) for name, m in model.named_modules()]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float().cpu(), expected.float().cpu()
    return float((actual - expected).norm() / expected.norm())


# -- accelerate device maps (one process) -----------------------------------------------------------------


def accelerate_maps(args: argparse.Namespace) -> dict:
    from accelerate import dispatch_model

    gpu = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    results: dict = {}
    with torch.no_grad():
        reference = build(args, gpu)
        ids = prompts(args, gpu)
        with fp8ctx.fp8_weights(reference, granularity="channel"):
            single_fp8 = reference(input_ids=ids).last_hidden_state.cpu()
        plain = reference(input_ids=ids).last_hidden_state.cpu()
        del reference
    maps = {"gpu+cpu": [gpu, "cpu"]}
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        maps["2gpu"] = [torch.device("cuda:0"), torch.device("cuda:1")]
    for label, devices in maps.items():
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        model = build(args, gpu)
        layers = len(model.layers)
        device_map = {"embed_tokens": devices[0], "rotary_emb": devices[0]}
        # two GPUs: half the layers each; GPU + CPU: the last --cpu-layers on the CPU (a CPU forward is slow)
        first = layers // 2 if label == "2gpu" else layers - args.cpu_layers
        for index in range(layers):
            device_map[f"layers.{index}"] = devices[0] if index < first else devices[1]
        device_map["norm"] = devices[1]
        main_device = "cpu" if "cpu" in devices else devices[0]  # a GPU main device would offload the CPU half
        model = dispatch_model(model, device_map, main_device=main_device, force_hooks=True)
        before, installed = fingerprint(model), hooks(model)
        with torch.no_grad():
            sync()
            outside = allocated() if torch.cuda.is_available() else {}
            dense, t_dense = timed(lambda: model(input_ids=ids).last_hidden_state, args.iters)
            with fp8ctx.fp8_weights(model, granularity="channel") as store:
                sync()
                inside = allocated() if torch.cuda.is_available() else {}
                out, t_fp8 = timed(lambda: model(input_ids=ids).last_hidden_state, args.iters)
                held = {}
                for entry in store.values():
                    held[str(entry.qdata.device)] = held.get(str(entry.qdata.device), 0) + entry.nbytes / GiB
        results[label] = {
            "device_map": {key: str(value) for key, value in device_map.items()},
            "allocated_outside_GiB": outside, "allocated_inside_GiB": inside, "fp8_held_GiB_by_device": held,
            "ms_bf16": t_dense, "ms_fp8": t_fp8,
            "rel_err_vs_single_device_fp8": relative_error(out, single_fp8),
            "max_abs_vs_single_device_fp8": float((out.float().cpu() - single_fp8.float()).abs().max()),
            "rel_err_fp8_vs_bf16": relative_error(out, plain), "rel_err_dispatched_bf16_vs_bf16": relative_error(dense, plain),
            "exact_restore": fingerprint(model) == before, "hooks_in_place": hooks(model) == installed,
        }
        del model, store
    return results


# -- torchrun workers (one process per rank) --------------------------------------------------------------


class AllGatherBytes:
    def __init__(self, dist) -> None:
        self.bytes, self._real = 0, dist.all_gather_single

    def __call__(self, output_tensor, input_tensor, *rest, **options):
        self.bytes += input_tensor.numel() * input_tensor.element_size()
        return self._real(output_tensor, input_tensor, *rest, **options)


def replicas(args: argparse.Namespace, rank: int, device: torch.device) -> dict:
    model = build(args, device)
    ids = prompts(args, device, seed=rank)
    before = fingerprint(model)
    with torch.no_grad():
        sync()
        outside = allocated() if device.type == "cuda" else {}
        dense, t_dense = timed(lambda: model(input_ids=ids).last_hidden_state, args.iters)
        with fp8ctx.fp8_weights(model, granularity="channel"):
            sync()
            inside = allocated() if device.type == "cuda" else {}
            out, t_fp8 = timed(lambda: model(input_ids=ids).last_hidden_state, args.iters)
    tokens = args.batch * args.tokens
    return {"tokens_per_s_bf16": tokens / t_dense * 1e3, "tokens_per_s_fp8": tokens / t_fp8 * 1e3,
            "ms_bf16": t_dense, "ms_fp8": t_fp8, "allocated_outside_GiB": outside, "allocated_inside_GiB": inside,
            "rel_err_fp8_vs_bf16": relative_error(out, dense), "exact_restore": fingerprint(model) == before}


def fsdp(args: argparse.Namespace, rank: int, device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = build(args, device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = prompts(args, device, seed=rank)
    result: dict = {}
    with torch.no_grad():
        model(input_ids=ids)  # FSDP2 initializes lazily
        for label in ("bf16", "fp8"):
            model.reshard()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            before = fingerprint(model)
            block = fp8ctx.fp8_weights(model, granularity="channel") if label == "fp8" else contextlib.nullcontext()
            with block as store:
                sync()
                resident = allocated() if device.type == "cuda" else {}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                counter = AllGatherBytes(dist)
                with mock.patch.object(dist, "all_gather_single", counter):
                    out = model(input_ids=ids).last_hidden_state
                per_forward = counter.bytes
                out, ms = timed(lambda: model(input_ids=ids).last_hidden_state, args.iters)
                peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
                model.reshard()
            result[label] = {"allocated_GiB": resident, "peak_GiB": peak, "all_gather_bytes_first_forward": per_forward,
                             "ms": ms, "out": out.float().cpu()}
            if label == "fp8":
                result[label]["exact_restore"] = fingerprint(model) == before
                # this rank's held weights: FP8 codes + scales, against the same shards in bf16
                result[label]["held_shard_bytes"] = store.nbytes
                result[label]["held_shard_dense_bytes"] = store.dense_nbytes
    result["rel_err_fp8_vs_bf16"] = relative_error(result["fp8"].pop("out"), result["bf16"].pop("out"))
    return result


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        result = {"replicas": replicas, "fsdp": fsdp}[args.worker](args, rank, device)
        Path(args.out, "ranks").mkdir(exist_ok=True)
        Path(args.out, "ranks", f"{args.worker}-rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, part: str, ranks: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
               "--worker", part, *args.passthrough]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        return [{"error": f"torchrun rc={done.returncode}", "log": done.stderr[-4000:]}]
    return [json.loads(Path(args.out, "ranks", f"{part}-rank{rank}.json").read_text()) for rank in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="multi_gpu_out")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--cpu-layers", type=int, default=1, help="decoder layers on the CPU in the GPU + CPU map")
    parser.add_argument("--ranks", type=int, default=0, help="torchrun ranks (default: the GPUs; 2 on CPU)")
    parser.add_argument("--parts", default="accelerate,replicas,fsdp")
    parser.add_argument("--worker", choices=["replicas", "fsdp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    args.passthrough = [f"--{key}={getattr(args, key)}" for key in ("out", "device", "layers", "batch", "tokens", "iters")]
    args.passthrough += ["--tiny"] if args.tiny else []
    ranks = args.ranks or (torch.cuda.device_count() if args.device == "cuda" else 2)
    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "ranks": ranks,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "shapes": "tiny" if args.tiny else "Qwen2.5-VL-7B text tower", "layers": args.layers,
            "batch": args.batch, "tokens": args.tokens}
    results: dict = {"info": info}
    for part in args.parts.split(","):
        start = time.perf_counter()
        results[part] = accelerate_maps(args) if part == "accelerate" else launch(args, part, ranks)
        print(f"== {part} ({time.perf_counter() - start:.0f} s)\n{json.dumps(results[part], indent=1)}", flush=True)
        Path(args.out, "multi_gpu.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
