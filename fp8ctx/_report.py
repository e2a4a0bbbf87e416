"""`report`: what FP8 storage does to a model — bytes saved, weight error per layer, output error, exact restore."""

from __future__ import annotations

import dataclasses
import html
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._config import Exclude, FP8Config
from ._context import fp8_weights
from ._budget import check_budget, choose
from ._memory import MemoryReport, PeakMeter, params_and_buffers
from ._metrics import OutputReport, compare_outputs, fingerprint, weight_error
from ._metrics import format_bytes as _size
from ._inventory import DenseEntry, DenseInventory, dense_inventory
from ._options import check_originals, check_progress_bar, resolve, stores_for
from ._exclude import check_exclude
from ._plan import Plan
from ._quality import check_metric, describe, sample_errors
from ._runs import caller, measuring, output_of
from ._sensitivity import measure_layers, model_bytes
from ._store import FP8Store
from ._verdict import DEFAULT_BUDGETS, Verdict, decide

__all__ = ["DEFAULT_ROWS", "DenseEntry", "DenseInventory", "LayerReport", "OutputReport", "Report", "report"]

DEFAULT_ROWS = 12
"""Rows a report shows unless asked for all: the worst ones."""

logger = logging.getLogger("fp8ctx")


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One weight: where it is, how big it is dense and as FP8, and how far FP8 moved it."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    dense_bytes: int
    fp8_bytes: int
    sqnr_db: float | None
    relative_error: float | None
    output_error: float | None = None
    """The model's output error (the report's metric, worst sample, error form) with this weight alone in
    FP8; measured when the report is asked for it or the output is over budget."""


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of :func:`report`: per-layer rows, totals, output error, the verdict, the restore check, and
    what stays dense.

    Printing gives the worst rows (by per-layer output error where measured, else by weight SQNR), the totals
    with the whole model's bytes, a one-line verdict with its thresholds and the next line of code to try;
    Jupyter shows the same as HTML; ``table(None)`` has every row; ``to_dict()`` / ``to_pandas()`` give data.
    ``kept_dense`` lists every parameter left dense with the reason (None for a report on a store alone).
    ``memory`` states the whole model before and inside the block, and whether that reduces memory where the
    model lives (with measured device peaks on a GPU).
    """

    model: str
    config: FP8Config
    layers: tuple[LayerReport, ...]
    output: OutputReport | None
    restored_exactly: bool | None
    kept_dense: DenseInventory | None = None
    model_bytes: int | None = None
    metric: str = "cosine"
    max_error: float | None = None
    output_error: float | None = None
    verdict: Verdict | None = None
    memory: MemoryReport | None = None

    @property
    def dense_bytes(self) -> int:
        return sum(row.dense_bytes for row in self.layers)

    @property
    def fp8_bytes(self) -> int:
        return sum(row.fp8_bytes for row in self.layers)

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.fp8_bytes

    @property
    def worst_sqnr_db(self) -> float | None:
        values = [row.sqnr_db for row in self.layers if row.sqnr_db is not None]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): figures that are not finite, such as the SQNR of a weight FP8 holds
        exactly (+inf), are None."""
        data = {
            "model": self.model,
            "config": self.config.to_dict(),
            "layers": [dataclasses.asdict(row) for row in self.layers],
            "totals": {
                "layers": len(self.layers),
                "dense_bytes": self.dense_bytes,
                "fp8_bytes": self.fp8_bytes,
                "saved_bytes": self.saved_bytes,
                "worst_sqnr_db": self.worst_sqnr_db,
            },
            "output": dataclasses.asdict(self.output) if self.output else None,
            "restored_exactly": self.restored_exactly,
            "kept_dense": None
            if self.kept_dense is None
            else {
                "bytes": self.kept_dense.bytes,
                "by_reason": self.kept_dense.by_reason(),
                "entries": [dataclasses.asdict(entry) for entry in self.kept_dense.entries],
            },
            "model_bytes": self.model_bytes,
            "metric": self.metric,
            "max_error": self.max_error,
            "output_error": self.output_error,
            "verdict": dataclasses.asdict(self.verdict) if self.verdict else None,
            "memory": None if self.memory is None else self.memory.to_dict(),
        }
        return _finite(data)

    def to_pandas(self) -> Any:
        """The per-layer rows as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas

        return pandas.DataFrame([dataclasses.asdict(row) for row in self.layers])

    def summary_lines(self) -> list[str]:
        config = self.config
        lines = [
            f"{self.model}: {len(self.layers)} weights as {str(config.storage_dtype).removeprefix('torch.')}, "
            f"granularity={config.granularity}" + (f" ({config.block_size})" if config.granularity == "block" else ""),
            f"  weights: {_size(self.dense_bytes)} dense -> {_size(self.fp8_bytes)} FP8 "
            f"(saves {_size(self.saved_bytes)}, {self.fp8_bytes / max(self.dense_bytes, 1):.1%} of dense)",
        ]
        if self.model_bytes:
            lines.append(
                f"  whole model: {_size(self.model_bytes)} -> {_size(self.model_bytes - self.saved_bytes)} "
                f"(saves {self.saved_bytes / self.model_bytes:.1%} of every parameter and buffer)"
            )
        if self.kept_dense is not None:
            total = self.dense_bytes + self.kept_dense.bytes
            lines.append(
                f"  coverage: {self.dense_bytes / max(total, 1):.1%} of parameter bytes held as FP8; "
                f"{_size(self.kept_dense.bytes)} in {len(self.kept_dense.entries)} tensors kept dense (see below)"
            )
        if self.worst_sqnr_db is not None:
            lines.append(f"  weight SQNR: worst layer {self.worst_sqnr_db:.1f} dB")
        if self.output is not None:
            out = self.output
            psnr = f", PSNR {out.psnr_db:.1f} dB" if out.psnr_db is not None else ""
            psnr += f", SSIM {out.ssim:.5f}" if out.ssim is not None else ""
            lines.append(
                f"  output vs unquantized: relative L2 {out.relative_l2:.2e}, cosine {out.cosine:.6f}, "
                f"max |err| {out.max_abs_error:.2e}{psnr}"
            )
        if self.restored_exactly is not None:
            lines.append(f"  model restored bit-exact after the block: {'yes' if self.restored_exactly else 'NO'}")
        if self.memory is not None:
            lines.extend(self.memory.lines())
        if self.verdict is not None:
            lines += [self.verdict.line, f"next: {self.verdict.next_code}"]
        return lines

    def worst(self, max_rows: int | None = DEFAULT_ROWS) -> list[LayerReport]:
        """The rows, worst first: by per-layer output error where it was measured, else by lowest SQNR;
        ``max_rows`` of them (``None``: all)."""
        if any(row.output_error is not None for row in self.layers):
            rows = sorted(self.layers, key=lambda r: -r.output_error if r.output_error is not None else math.inf)
        else:
            rows = sorted(self.layers, key=lambda r: r.sqnr_db if r.sqnr_db is not None else math.inf)
        return rows if max_rows is None else rows[:max_rows]

    def table(self, max_rows: int | None = DEFAULT_ROWS) -> str:
        """The per-layer table as text, worst rows first (see :meth:`worst`); ``max_rows=None`` shows all."""
        rows = self.worst(max_rows)
        header = self._columns()
        cells = [self._cells(row) for row in rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*c) for c in cells]
        if len(rows) < len(self.layers):
            out.append(f"({len(rows)} of {len(self.layers)} weights shown, worst first; table(None) shows all)")
        return "\n".join(out)

    def dense_lines(self) -> list[str]:
        """The "kept dense" section: bytes per (layer type, reason), largest first (empty without an inventory)."""
        return [] if self.kept_dense is None else self.kept_dense.lines(_size)

    def _columns(self) -> tuple[str, ...]:
        measured = any(row.output_error is not None for row in self.layers)
        return _LAYER_COLUMNS + ((f"alone: {self.metric}",) if measured else ())

    def _cells(self, row: LayerReport) -> tuple[str, ...]:
        cells = _layer_cells(row)
        if len(self._columns()) > len(cells):
            cells += ("-" if row.output_error is None else describe(row.output_error, self.metric).split()[-1],)
        return cells

    def __str__(self) -> str:
        text = self.table() + "\n\n" + "\n".join(self.summary_lines())
        return text + ("\n\n" + "\n".join(self.dense_lines()) if self.kept_dense is not None else "")

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in self._columns())
        rows = self.worst()
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in self._cells(row)) + "</tr>" for row in rows
        )
        more = f"<p>{len(rows)} of {len(self.layers)} weights, worst first</p>" if len(rows) < len(self.layers) else ""
        summary = "<br>".join(html.escape(line) for line in self.summary_lines())
        dense = "<br>".join(html.escape(line).replace("  ", "&nbsp;&nbsp;") for line in self.dense_lines())
        return (
            f"<div><p>{summary}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"
            + (f"<p>{dense}</p>" if dense else "")
            + "</div>"
        )


def _finite(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


_LAYER_COLUMNS = ("layer", "type", "shape", "dense", "fp8", "SQNR dB", "rel err")


def _layer_cells(row: LayerReport) -> tuple[str, ...]:
    """One layer's row, as the text table and the HTML table show it."""
    return (
        row.name,
        row.layer_type,
        "x".join(map(str, row.shape)),
        _size(row.dense_bytes),
        _size(row.fp8_bytes),
        _number(row.sqnr_db, ".1f"),
        _number(row.relative_error, ".2e"),
    )


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def report(
    model: nn.Module | FP8Store,
    inputs: Any = None,
    *,
    run: Callable[[nn.Module], Any] | None = None,
    config: FP8Config | None = None,
    store: FP8Store | None = None,
    storage_dtype: torch.dtype | str | None = None,
    granularity: str | None = None,
    block_size: int | None = None,
    layers: Any = None,
    exclude: Exclude = None,
    compute: str | None = None,
    originals: str | None = None,
    progress_bar: bool | None = None,
    metric: str = "cosine",
    max_error: float | None = None,
    layer_errors: bool = False,
) -> Report:
    """Measure what FP8 storage does to ``model``: per-layer bytes and weight error, output error, restore.

    Every option is checked before anything is quantized or run.

    Args:
        model: the model, or an :class:`FP8Store` alone (then only sizes are reported).
        inputs: optional inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
            With inputs (or ``run``), the model runs unquantized and inside :func:`fp8_weights`, and the
            outputs are compared.
        run: instead of ``inputs``, a function ``run(model) -> output`` (e.g. ``lambda vae: vae.decode(z)``).
        config: an :class:`FP8Config`; the keywords below that are given (not ``None``) replace its fields.
        store: a store to report on instead of quantizing (options must not contradict it, as in
            :func:`fp8_weights`).
        storage_dtype, granularity, block_size, layers, exclude, compute: as in :class:`FP8Config`.
        originals: as in :func:`fp8_weights`, for the run with FP8 weights.
        progress_bar: tqdm while quantizing; default only for many layers.
        metric: the output metric the verdict and the per-layer errors use: ``"cosine"`` (default),
            ``"rel_l2"``, ``"psnr"`` or ``"ssim"`` (see :func:`fp8ctx.plan`); worst sample.
        max_error: the verdict's budget in the metric's error form; default ``DEFAULT_BUDGETS[metric]``
            (cosine >= 0.999, relative L2 <= 0.05, PSNR >= 40 dB, SSIM >= 0.99).
        layer_errors: also measure each weight alone in FP8 (one run per weight, as
            :func:`fp8ctx.sensitivity`) and sort the rows by it. Done anyway when the output is over budget:
            the planner then proposes the ``exclude=`` shown as the next line of code.

    Returns:
        A :class:`Report`.

    Raises:
        FP8Error: bad options, or a store that does not fit (see :func:`fp8_weights`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        >>> result = fp8ctx.report(model, torch.randn(4, 64), granularity="channel")
        >>> result.fp8_bytes < result.dense_bytes, result.restored_exactly
        (True, True)
    """
    options = resolve(config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size,
                      layers=layers, exclude=exclude, compute=compute)
    originals, progress_bar = check_originals(originals), check_progress_bar(progress_bar)
    metric = check_metric(metric)
    budget = check_budget(DEFAULT_BUDGETS[metric] if max_error is None else max_error)
    call = caller(inputs, run, required=False)
    if isinstance(model, FP8Store):
        rows = tuple(
            LayerReport(name, "?", tuple(entry.shape), entry.numel() * entry.element_size(), entry.nbytes, None, None)
            for name, entry in model.items()
        )
        return Report("FP8Store", model.config, rows, None, None)
    stores_for(store, None, 1, options)
    if store is None:
        check_exclude([model], options.config.exclude)
    plan = Plan.make(model, options.config, store)
    targets = plan.targets
    given_store = store is not None
    if store is None:
        store = FP8Store({target.name: entry for target, entry in plan.entries(progress_bar)})
        held_config = options.config
    else:
        # the scheme is the store's; the compute mode is the one asked for
        held_config = store.config.replace(compute=options.config.compute)
    rows = []
    for target in targets:
        original, entry = target.param, store[target.name]
        sqnr, relative = weight_error(original, entry.dequantize())
        rows.append(
            LayerReport(
                target.name,
                type(model.get_submodule(target.layer)).__name__,
                tuple(original.shape),
                original.numel() * original.element_size(),
                entry.nbytes,
                sqnr,
                relative,
            )
        )
    output = restored = output_error = planned = None
    params_bytes, buffers_bytes = params_and_buffers(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    meter = PeakMeter(device)
    if call is not None:
        with measuring(model):
            with meter.measure():
                expected = output_of(call, model)
            before = fingerprint(model)  # after the plain run: buffers it creates lazily are in
            with meter.measure(), fp8_weights(model, store=store, originals=originals, compute=options.config.compute):
                actual = output_of(call, model)
        restored = fingerprint(model) == before
        output = compare_outputs(actual, expected)
        if _measurable(expected, "ssim"):
            output = dataclasses.replace(output, ssim=1 - float(sample_errors(actual, expected, "ssim").mean()))
        output_error = float(sample_errors(actual, expected, metric).max())  # raises for an image metric on a non-image
        logger.info("fp8ctx: output relative L2 %.3e, cosine %.6f", output.relative_l2, output.cosine)
    kept_dense = DenseInventory(tuple(dense_inventory(model, targets, options.config)))
    over = output_error is not None and output_error > budget
    if call is not None and output_error is not None and (layer_errors or over) and not given_store:
        # each weight alone in FP8: the rows' worst-first order, and (over budget) the planner's proposal
        measured = measure_layers(model, call, options.config, metric, progress_bar)
        alone = {row.name: row.error for row in measured.rows}
        rows = [dataclasses.replace(row, output_error=alone.get(row.name)) for row in rows]
        if over:
            chosen = choose(model, call, measured, budget)
            planned = ([name.removesuffix(".weight") for name in chosen.dense], chosen.saved_bytes, chosen.measured_error)
    lowest = min(((row.sqnr_db, row.name) for row in rows if row.sqnr_db is not None), default=None)
    verdict = decide(metric, budget, output_error, lowest and (lowest[1], lowest[0]), held_config, planned,
                     measured_layers=call is not None)
    peaks = meter.peaks or [None, None]
    memory = MemoryReport(
        str(device), originals, params_bytes, buffers_bytes, sum(row.fp8_bytes for row in rows), kept_dense.bytes,
        peaks[0], peaks[1],
    )
    return Report(type(model).__name__, held_config, tuple(rows), output, restored, kept_dense, model_bytes(model),
                  metric, budget, output_error, verdict, memory)


def _measurable(expected: torch.Tensor, metric: str) -> bool:
    """Whether ``metric`` applies to an output like ``expected`` (image metrics need images and torchmetrics)."""
    if metric in ("cosine", "rel_l2"):
        return True
    if expected.dim() not in (4, 5) or (metric == "ssim" and min(expected.shape[-2:]) < 11):
        return False
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        return False
    return True
