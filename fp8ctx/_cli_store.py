"""The store commands of the command line: ``fp8ctx quantize SRC OUT`` and ``fp8ctx inspect FILE``."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from ._config import DEFAULT_LAYERS, FP8Config
from ._devices import check_device
from ._metrics import format_bytes as _size
from ._store import FP8Store
from ._storefile import StoreFile

__all__ = ["add_commands", "inspect", "quantize"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_commands(commands: argparse._SubParsersAction, count: type) -> None:  # type: ignore[type-arg]
    """Add ``quantize`` and ``inspect`` to the parser's subcommands."""
    quantize = commands.add_parser(
        "quantize",
        help="write a complete FP8 store from a model directory or checkpoint, never loading dense weights",
        description="Build the model on the meta device from SRC's config, read its checkpoint tensor by tensor "
        "and write a complete store: run it with fp8_weights(skeleton, store=FP8Store.load(OUT, device=...)). "
        "SRC is a model directory, a checkpoint file beside its config.json, a pipeline directory (then OUT is a "
        "directory with one COMPONENT.fp8.safetensors per component) or a Hugging Face id in the local cache.",
    )
    quantize.add_argument("src", metavar="SRC")
    quantize.add_argument("out", metavar="OUT")
    quantize.add_argument("--component", action="append", metavar="NAME", help="pipeline component (repeatable); default vae and text_encoder")
    quantize.add_argument("--granularity", choices=("tensor", "channel", "block"), default="channel")
    quantize.add_argument("--block-size", type=int, default=128)
    quantize.add_argument("--storage-dtype", choices=("e4m3", "e5m2"), default="e4m3")
    quantize.add_argument("--dtype", choices=sorted(_DTYPES), help="compute dtype; default: the config's, else bf16")
    quantize.add_argument("--embedding", action="store_true", help="hold embedding tables as FP8 too")
    quantize.add_argument("--device", default="cpu", help="where to quantize (cuda is faster); the file is the same")
    quantize.add_argument("--verbose", action="store_true", help="log progress; show tracebacks")
    inspect = commands.add_parser("inspect", help="what a store file holds", description="Print a store file's "
                                  "entries, layouts and bytes, and the library and format versions that wrote it.")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--rows", type=count, default=20, help="entries listed (0: all)")
    inspect.add_argument("--verbose", action="store_true", help="show tracebacks")


def quantize(args: argparse.Namespace) -> int:
    """``fp8ctx quantize``: one complete store per model."""
    from .integrations.skeletons import resolve_source, skeletons

    device = check_device(args.device, "--device")  # before any download or skeleton is built
    layers = DEFAULT_LAYERS + ((torch.nn.Embedding,) if args.embedding else ())
    config = FP8Config(args.storage_dtype, args.granularity, args.block_size, layers=layers)
    models = skeletons(resolve_source(args.src), args.component, _DTYPES.get(args.dtype))
    out = Path(args.out)
    pipeline = len(models) > 1 or bool(args.component)
    if pipeline:
        out.mkdir(parents=True, exist_ok=True)
    for model in models:
        target = out / f"{model.name}.fp8.safetensors" if pipeline else out
        store = FP8Store.from_checkpoint(
            model.module, model.checkpoint, config, device=device, progress_bar=sys.stderr.isatty() or None
        )
        store.save(target)
        print(f"{target}: {store}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    """``fp8ctx inspect``: read the file's header (no tensor data), checked as ``FP8Store.load`` checks it."""
    file = StoreFile(args.file, torch.device("cpu"))
    headers = file.reader.headers
    fp8 = sum(_nbytes(*headers[name]) + _nbytes(*headers[name + ":scale"]) for name in file.layouts)
    dense = sum(_nbytes(*headers[name]) for name in file.unquantized)
    schemes = Counter(
        f"{layout.storage_dtype}".removeprefix("torch.") + f" {layout.granularity}"
        + (f" {layout.block_size}" if layout.granularity == "block" else "")
        for layout, _, _ in file.layouts.values()
    )
    print(f"{file.path}")
    print(f"  written by fp8ctx {file.version}, store format {file.format}; complete: {'yes' if file.complete else 'no'}")
    print(f"  {len(file.layouts)} FP8 entries, {_size(fp8)} (codes + scales): "
          + ", ".join(f"{n} x {scheme}" for scheme, n in schemes.most_common()))
    print(f"  {len(file.unquantized)} unquantized tensors, {_size(dense)}; {_size(fp8 + dense)} in all")
    rows = list(file.layouts.items())
    shown = rows if not args.rows else rows[: args.rows]
    if shown:
        width = max(len(name) for name, _ in shown)
        print(f"  {'entry':<{width}}  {'shape':<16} {'dtype':<9} {'layout':<22} bytes")
        for name, (layout, dtype, value_dtype) in shown:
            shape = "x".join(map(str, headers[name][1]))
            kind = f"{layout.granularity}" + (f"({layout.block_size})" if layout.granularity == "block" else "")
            kind += f" axis {layout.channel_axis}" if layout.channel_axis else ""
            size = _nbytes(*headers[name]) + _nbytes(*headers[name + ":scale"])
            spelled = str(dtype).removeprefix("torch.") + ("" if value_dtype == dtype else f"<-{str(value_dtype).removeprefix('torch.')}")
            print(f"  {name:<{width}}  {shape:<16} {spelled:<9} {kind:<22} {_size(size)}")
        if len(shown) < len(rows):
            print(f"  ({len(shown)} of {len(rows)} entries shown; --rows 0 shows all)")
    if file.unquantized:
        names = file.unquantized if not args.rows else file.unquantized[: args.rows]
        print("  unquantized: " + ", ".join(names) + (" ..." if len(names) < len(file.unquantized) else ""))
    return 0


def _nbytes(dtype: torch.dtype | None, shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size * (torch.empty((), dtype=dtype).element_size() if dtype is not None else 0)


