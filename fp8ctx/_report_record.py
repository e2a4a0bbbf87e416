"""`Report` and `LayerReport`: what :func:`fp8ctx.report` returns, and how it reads — text, HTML, dict, DataFrame."""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

from ._config import FP8Config
from ._inventory import DenseInventory
from ._memory import MemoryReport
from ._metrics import OutputReport
from ._metrics import format_bytes as _size
from ._quality import describe
from ._verdict import Verdict

__all__ = ["DEFAULT_ROWS", "LayerReport", "Report"]

DEFAULT_ROWS = 12
"""Rows a report shows unless asked for all: the worst ones."""


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

