"""The ``fp8ctx`` command line: ``fp8ctx report [MODEL] [options]``, ``fp8ctx quantize SRC OUT``, ``fp8ctx inspect FILE``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

from ._cli_store import add_commands, inspect, quantize
from ._config import FP8Config
from ._devices import check_device
from ._errors import FP8Error
from ._quality import METRICS

DEFAULT = FP8Config()
DEFAULT_ROWS = 12  # as fp8ctx._report.DEFAULT_ROWS, which imports more than --help needs

__all__ = ["main"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8ctx", description="Run models with FP8-held weights and see what it does.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="memory saved, weight and output error, exact restore",
        description="Load a local diffusers/transformers directory or a Hugging Face id already in the local cache "
        "(or, with none, the embedded default: "
        "all-MiniLM-L6-v2 and a reduced Qwen-Image VAE), run it on a small built-in input with and without "
        "FP8 weights, and print the report.",
    )
    report.add_argument(
        "model_dir", nargs="?", metavar="MODEL", help="local model or pipeline directory, or a Hugging Face id in the local cache"
    )
    report.add_argument("--component", action="append", metavar="NAME", help="pipeline component (repeatable); default vae and text_encoder")
    report.add_argument(
        "--granularity", choices=("tensor", "channel", "block"), default=DEFAULT.granularity.value,
        help="scale granularity (default: %(default)s, as in the API; per-channel scales measured most accurate "
        "for their cost, docs/accuracy.md)",
    )
    report.add_argument("--block-size", type=int, default=128)
    report.add_argument("--storage-dtype", choices=("e4m3", "e5m2"), default="e4m3")
    report.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype the model is loaded in")
    report.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    report.add_argument(
        "--rows", type=_count, default=DEFAULT_ROWS,
        help="layers shown, worst first: by output error alone where measured, else lowest SQNR (default: %(default)s; 0: all)",
    )
    report.add_argument("--metric", choices=METRICS, default="cosine", help="output metric of the verdict (default: %(default)s)")
    report.add_argument(
        "--max-error", type=float, metavar="E",
        help="the verdict's budget in the metric's error form (1 - cosine, relative L2, 10^(-PSNR/10), 1 - SSIM); "
        "default: cosine 1e-3, rel_l2 0.05, psnr 1e-4 (40 dB), ssim 0.01",
    )
    report.add_argument(
        "--layer-errors", action="store_true",
        help="measure each weight alone in FP8 (one run per weight); done anyway when the output is over budget",
    )
    report.add_argument("--json", metavar="PATH", help="also write the full reports as JSON")
    report.add_argument("--verbose", action="store_true", help="log progress; show tracebacks")
    add_commands(commands, _count)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count of 0 or more, got {text!r}")
    return value


def _report(args: argparse.Namespace) -> int:
    from ._report import report
    from .integrations.cli_models import default_subjects, load_subjects

    config = FP8Config(args.storage_dtype, args.granularity, args.block_size)  # a bad --block-size fails here
    device = check_device(args.device, "--device")
    dtype = DTYPES[args.dtype]
    if args.model_dir is None:
        if args.component:
            raise FP8Error("--component needs a MODEL_DIR (a pipeline directory)")
        subjects = default_subjects(device, dtype)
    else:
        subjects = load_subjects(args.model_dir, args.component, device, dtype)
    results = []
    for subject in subjects:
        result = report(
            subject.model,
            run=subject.run,
            config=config,
            progress_bar=None if sys.stderr.isatty() else False,  # no bar frames in logs and pipes
            # image metrics for image models; a text encoder beside a VAE is judged by cosine
            metric=args.metric if args.metric in ("cosine", "rel_l2") or hasattr(subject.model, "decode") else "cosine",
            max_error=args.max_error,
            layer_errors=args.layer_errors,
        )
        results.append(result)
        print(f"== {subject.title}")
        print(result.table(max_rows=args.rows or None).replace("table(None) shows all", "--rows 0 shows all"))
        if subject.run is None:
            print("(no built-in input for this model type: weights only)")
        print("\n".join(result.summary_lines()))
        print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([r.to_dict() for r in results], handle, indent=2, allow_nan=False)
    return 0 if all(r.restored_exactly is not False for r in results) else 1


def _quiet_libraries() -> None:
    """The report is the output: keep the libraries' own warnings and progress bars out of it."""
    for name in ("diffusers", "transformers"):
        try:
            library = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        library.set_verbosity_error()
        if hasattr(library, "disable_progress_bar"):
            library.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fp8ctx`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return {"report": _report, "quantize": quantize, "inspect": inspect}[args.command](args)
    except KeyboardInterrupt:
        print("fp8ctx: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the model's own code can raise anything; one line, --verbose for the traceback
        if args.verbose:
            raise
        kind = "" if isinstance(error, (FP8Error, OSError)) else f"{type(error).__name__}: "
        print(f"fp8ctx: error: {kind}{error} (--verbose shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
