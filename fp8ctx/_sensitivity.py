"""`sensitivity`: how much each layer alone in FP8 moves the model's output, against the bytes it saves."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._config import DEFAULT_LAYERS, Exclude, FP8Config
from ._hold import holding
from ._metrics import weight_error
from ._options import check_progress_bar, resolve
from ._exclude import check_exclude
from ._plan import Plan
from ._progress import progress
from ._quality import check_metric, metric_value, sample_errors
from ._runs import caller, measuring, output_of
from ._select import Target
from ._store import FP8Store
from ._tensor import FP8Tensor

__all__ = ["CANDIDATE_LAYERS", "LayerSensitivity", "Sensitivity", "model_bytes", "sensitivity"]

CANDIDATE_LAYERS: tuple[type[nn.Module], ...] = DEFAULT_LAYERS + (nn.Embedding,)
"""Layer types :func:`sensitivity` and :func:`fp8ctx.plan` consider unless ``layers=`` says otherwise: the
defaults and embedding tables (often the largest single weight of a text model)."""


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One weight alone in FP8: its bytes, its weight SQNR, and the model-level output error it causes
    (``error``: the worst sample; ``mean_error``: over samples; both in the metric's error form)."""

    name: str
    layer: str
    layer_type: str
    shape: tuple[int, ...]
    dense_bytes: int
    fp8_bytes: int
    sqnr_db: float
    error: float
    mean_error: float

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.fp8_bytes

    @property
    def error_per_mib(self) -> float:
        """Output error per MiB saved: the order in which layers are worth holding as FP8."""
        return self.error / max(self.saved_bytes, 1) * 2**20


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """The result of :func:`sensitivity`: one row per weight, cheapest error per byte saved first."""

    model: str
    metric: str
    config: FP8Config
    rows: tuple[LayerSensitivity, ...]
    model_bytes: int
    sample_errors: torch.Tensor = dataclasses.field(repr=False, compare=False)
    """Per row, the error of each sample (rows x samples, float64), for combining layers."""

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (needs pandas), with ``saved_bytes`` and ``error_per_mib``."""
        import pandas

        return pandas.DataFrame(
            [{**dataclasses.asdict(row), "saved_bytes": row.saved_bytes, "error_per_mib": row.error_per_mib}
             for row in self.rows]
        )

    def table(self, max_rows: int | None = None) -> str:
        """The rows as text; ``max_rows`` keeps the first (cheapest) ones."""
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        cells = [_cells(row, self.metric) for row in rows]
        header = _columns(self.metric)
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in cells])

    def __str__(self) -> str:
        return f"{self.model}: output {self.metric} with one weight at a time in FP8 ({len(self.rows)} weights)\n" + self.table()

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in _columns(self.metric))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(row, self.metric)) + "</tr>" for row in self.rows
        )
        title = html.escape(f"{self.model}: output {self.metric} with one weight at a time in FP8")
        return f"<div><p>{title}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _columns(metric: str) -> tuple[str, ...]:
    return ("weight", "type", "saved", "SQNR dB", f"worst {metric}", f"mean {metric}", "error/MiB")


def _cells(row: LayerSensitivity, metric: str) -> tuple[str, ...]:
    worst, mean = metric_value(row.error, metric), metric_value(row.mean_error, metric)
    spec = ".1f" if metric == "psnr" else ".6f" if metric in ("cosine", "ssim") else ".2e"
    return (row.name, row.layer_type, f"{row.saved_bytes / 2**20:.2f} MiB", f"{row.sqnr_db:.1f}",
            format(worst, spec), format(mean, spec), f"{row.error_per_mib:.2e}")


def model_bytes(model: nn.Module) -> int:
    """Every distinct parameter and buffer of ``model``, in bytes as they are now."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sensitivity(
    model: nn.Module,
    inputs: Any = None,
    *,
    run: Callable[[nn.Module], Any] | None = None,
    metric: str = "rel_l2",
    config: FP8Config | None = None,
    storage_dtype: torch.dtype | str | None = None,
    granularity: str | None = None,
    block_size: int | None = None,
    layers: Any = None,
    exclude: Exclude = None,
    compute: str | None = None,
    progress_bar: bool | None = None,
) -> Sensitivity:
    """Per weight, the model's output error when only that weight is held as FP8, with its bytes and SQNR.

    Exact, not estimated: the model runs once plainly (kept), then once per weight with that weight alone in
    FP8, on the same inputs; each weight is quantized once. The cost is one forward pass per weight (an
    8-layer 7B-shaped text tower has 57), with nothing but one FP8 weight beyond the model in memory.

    Args:
        model: the model (left exactly as it was).
        inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments; or
        run: a function ``run(model) -> output`` (e.g. ``lambda vae: vae.decode(z).sample``).
        metric: ``"rel_l2"`` (default), ``"cosine"``, ``"psnr"`` or ``"ssim"`` (images; torchmetrics), measured
            per sample of the output's first axis (see ``fp8ctx._quality``).
        config: an :class:`FP8Config`; the keywords below that are given replace its fields.
        storage_dtype, granularity, block_size, layers, exclude, compute: as in :class:`FP8Config`; ``layers``
            defaults to :data:`CANDIDATE_LAYERS` (embedding tables included) unless a config is passed.
        progress_bar: a bar over the weights (default: only for many).

    Returns:
        A :class:`Sensitivity`: rows sorted by output error per byte saved, cheapest first.

    Raises:
        FP8Error: a bad option or metric, no inputs, or an exclude pattern naming no layer.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        >>> result = fp8ctx.sensitivity(model, torch.randn(4, 32), metric="cosine")
        >>> [row.name for row in result.rows] == sorted(["0.weight", "2.weight"], key=lambda n: [r.error_per_mib for r in result.rows if r.name == n])
        True
    """
    options = resolve(config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size,
                      layers=layers if layers is not None or config is not None else CANDIDATE_LAYERS,
                      exclude=exclude, compute=compute)
    metric, progress_bar = check_metric(metric), check_progress_bar(progress_bar)
    call = caller(inputs, run)
    check_exclude([model], options.config.exclude)
    return measure_layers(model, call, options.config, metric, progress_bar)


def measure_layers(
    model: nn.Module, call: Callable[[nn.Module], Any], config: FP8Config, metric: str, progress_bar: bool | None
) -> Sensitivity:
    """:func:`sensitivity` once options are checked: quantize each target once, run it alone in FP8."""
    plan = Plan.make(model, config)
    rows, errors = [], []
    with measuring(model):
        expected = output_of(call, model)
        # one weight quantized at a time, dropped after its run: memory beyond the model is one FP8 weight
        entries = plan.entries(False)
        for target in progress(plan.targets, "fp8ctx: one layer at a time", progress_bar):
            _, entry = next(entries)
            actual = held_output(model, call, [target], {target.name: entry}, config)
            per_sample = sample_errors(actual, expected, metric)
            errors.append(per_sample)
            rows.append(_row(model, target, entry, per_sample))
    order = sorted(range(len(rows)), key=lambda i: (rows[i].error_per_mib, -rows[i].saved_bytes))
    stacked = torch.stack([errors[i] for i in order]) if errors else torch.zeros(0, 0, dtype=torch.float64)
    return Sensitivity(type(model).__name__, metric, config, tuple(rows[i] for i in order), model_bytes(model), stacked)


def held_output(
    model: nn.Module,
    call: Callable[[nn.Module], Any],
    targets: Sequence[Target],
    entries: dict[str, FP8Tensor],
    config: FP8Config,
) -> torch.Tensor:
    """The output of ``call(model)`` with exactly ``targets`` held as the given FP8 entries."""
    plan = Plan(model, tuple(targets), config, FP8Store(entries))
    with holding([plan], compute=config.compute, offload=False):
        return output_of(call, model)


def _row(model: nn.Module, target: Target, entry: FP8Tensor, per_sample: torch.Tensor) -> LayerSensitivity:
    sqnr, _ = weight_error(target.param, entry.dequantize())
    return LayerSensitivity(
        target.name,
        target.layer,
        type(model.get_submodule(target.layer)).__name__,
        tuple(target.param.shape),
        target.param.numel() * target.param.element_size(),
        entry.nbytes,
        sqnr,
        float(per_sample.max()),
        float(per_sample.mean()),
    )
