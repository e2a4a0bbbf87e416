"""FP8 from disk to device (issue 9): the usual load-then-hold path against checkpoint -> store -> meta skeleton.

On the Qwen2.5-VL-7B text tower's shapes (28 layers, hidden 3584, intermediate 18944, 28 heads / 4 KV heads,
vocab 152064) with random bf16 weights written once as a sharded checkpoint, each in its own process:

  (a) dense     ``Qwen2_5_VLTextModel.from_pretrained(dir, dtype=bf16, device_map="cuda")`` then one forward
                inside ``fp8_weights(model)`` (originals="cpu", the default: dense originals go to host memory)
  convert       ``FP8Store.from_checkpoint(meta skeleton, dir, device="cuda").save(file)``: done once, offline
  (b) skeleton  meta skeleton + ``FP8Store.load(file, device="cuda")`` + one forward inside
                ``fp8_weights(skeleton, store=store)``; ``(b+emb)`` the same with the embedding held too

Each records peak device memory (``torch.cuda.max_memory_allocated``), peak host RSS (VmHWM) and the time
from the start of loading to the first output (imports excluded, the same for all), and the outputs are
compared. Targets: (b) peak device <= 0.60x (a)'s (<= 0.53x with the embedding held), peak RSS <= 0.6x,
first output no slower.

    python3 bench/from_disk.py --out results/              # GPU: everything, under 9 minutes on an H200
    python3 bench/from_disk.py --tiny --device cpu --out /tmp/fd   # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = dict(  # Qwen2.5-VL-7B-Instruct's text_config
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
TINY = dict(SHAPES, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return -1


def config(tiny: bool):
    from transformers import Qwen2_5_VLTextConfig

    return Qwen2_5_VLTextConfig(**(TINY if tiny else SHAPES))


def skeleton(tiny: bool):
    import torch
    from transformers import Qwen2_5_VLTextModel

    with torch.device("meta"):
        return Qwen2_5_VLTextModel._from_config(config(tiny), dtype=torch.bfloat16).eval()


def inputs(tiny: bool, device: str):
    import torch

    vocab = (TINY if tiny else SHAPES)["vocab_size"]
    return torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(0)).to(device)


# -- steps, each run in its own process ------------------------------------------------------------------


def write_checkpoint(args) -> dict:
    """Random bf16 weights, written shard by shard (~4 GB each) with an index, as save_pretrained lays them out."""
    import torch
    from safetensors.torch import save_file

    directory = Path(args.dir)
    if (directory / "model.safetensors.index.json").exists():
        return {"written": False}
    directory.mkdir(parents=True, exist_ok=True)
    config(args.tiny).save_pretrained(directory)
    names = skeleton(args.tiny).state_dict()
    generator = torch.Generator(device=args.device).manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}
    for name, meta in names.items():
        if name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(meta.shape, generator=generator, device=args.device)
        else:
            value = 0.02 * torch.randn(meta.shape, generator=generator, device=args.device)
        current[name] = value.to(torch.bfloat16).cpu()
        size += current[name].numel() * 2
        if size > 4 * 2**30:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    total = 0
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"written": True, "bytes": total, "shards": len(shards)}


def _measure(run) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output, extra = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    figures = {"first_output_s": seconds, "peak_rss": peak_rss(), **extra}
    if cuda:
        figures["peak_device"] = torch.cuda.max_memory_allocated()
        figures["peak_device_reserved"] = torch.cuda.max_memory_reserved()
    suffix = "-emb" if args_global.embedding else ""
    torch.save(output[0, :8].float().cpu(), Path(args_global.out) / f"output-{args_global.step}{suffix}.pt")
    return figures


def dense(args) -> dict:
    import torch
    from transformers import Qwen2_5_VLTextModel

    import fp8ctx

    ids = inputs(args.tiny, args.device)

    def run():
        model = Qwen2_5_VLTextModel.from_pretrained(args.dir, dtype=torch.bfloat16, device_map=args.device).eval()
        with torch.no_grad(), fp8ctx.fp8_weights(model, granularity=args.granularity) as store:
            out = model(input_ids=ids).last_hidden_state
            held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return out, {"device_while_held": held, "store_bytes": store.nbytes}

    return _measure(run)


def convert(args) -> dict:
    import torch
    from torch import nn

    import fp8ctx

    layers = fp8ctx.DEFAULT_LAYERS + ((nn.Embedding,) if args.embedding else ())
    start = time.perf_counter()
    store = fp8ctx.FP8Store.from_checkpoint(
        skeleton(args.tiny), args.dir, granularity=args.granularity, layers=layers, device=args.device
    )
    made = time.perf_counter() - start
    store.save(args.store)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "quantize_s": made, "save_s": time.perf_counter() - start - made, "peak_rss": peak_rss(),
        "fp8_bytes": store.nbytes, "unquantized_bytes": store.unquantized_nbytes, "file_bytes": os.path.getsize(args.store),
    }


def from_store(args) -> dict:
    import torch
    from transformers import Qwen2_5_VLTextModel  # noqa: F401  (imported before the clock starts, as in dense)

    import fp8ctx

    ids = inputs(args.tiny, args.device)

    def run():
        model = skeleton(args.tiny)
        store = fp8ctx.FP8Store.load(args.store, device=args.device)
        with torch.no_grad(), fp8ctx.fp8_weights(model, store=store):
            out = model(input_ids=ids).last_hidden_state
            held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        assert all(t.is_meta for t in model.parameters())
        return out, {"device_while_held": held, "store_total_bytes": store.total_nbytes}

    return _measure(run)


STEPS = {"write": write_checkpoint, "dense": dense, "convert": convert, "store": from_store}


# -- the orchestrator -------------------------------------------------------------------------------------


def run_step(args, step: str, **extra: str) -> dict:
    command = [sys.executable, __file__, "--step", step, "--dir", args.dir, "--out", args.out, "--device", args.device,
               "--granularity", args.granularity]
    command += ["--tiny"] * args.tiny + [item for key, value in extra.items() for item in (f"--{key}", value)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"step {step} failed")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - started
    print(f"{step} {extra or ''}: {figures}", flush=True)
    return figures


def main() -> None:
    global args_global
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=sorted(STEPS))
    parser.add_argument("--dir", default="/tmp/qwen25vl7b-text")
    parser.add_argument("--out", default=os.environ.get("OUT", "from-disk-out"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--granularity", default="channel")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--store")
    parser.add_argument("--embedding", type=int, default=0)
    args = args_global = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return
    import torch
    import transformers

    import fp8ctx

    results: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "fp8ctx": fp8ctx.__version__},
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "date": time.strftime("%Y-%m-%d"), "granularity": args.granularity}
    results["write"] = run_step(args, "write")
    plain, held = str(Path(args.dir) / "text.fp8.safetensors"), str(Path(args.dir) / "text-emb.fp8.safetensors")
    results["convert"] = run_step(args, "convert", store=plain, embedding="0")
    results["convert_emb"] = run_step(args, "convert", store=held, embedding="1")
    results["a"] = run_step(args, "dense")
    results["b"] = run_step(args, "store", store=plain, embedding="0")
    results["b_emb"] = run_step(args, "store", store=held, embedding="1")
    out = Path(args.out)
    a, b = torch.load(out / "output-dense.pt"), torch.load(out / "output-store.pt")
    results["outputs_equal"] = bool(torch.equal(a, b))
    results["ratios"] = {
        name: {key: results[name][key] / results["a"][key] for key in ("peak_device", "peak_rss", "first_output_s")
               if key in results[name] and results["a"].get(key)}
        for name in ("b", "b_emb")
    }
    (out / "from_disk.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["ratios"], indent=2), "outputs equal:", results["outputs_equal"])


args_global: argparse.Namespace


if __name__ == "__main__":
    main()
