"""`plan`: the layers to keep dense so that the output error stays within a budget while saving the most bytes."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ._config import Exclude, FP8Config
from ._errors import FP8Error
from ._options import check_progress_bar, resolve
from ._exclude import check_exclude, literal
from ._plan import Plan, quantize_target
from ._quality import check_metric, combine, describe, sample_errors
from ._runs import caller, measuring, output_of
from ._sensitivity import CANDIDATE_LAYERS, Sensitivity, held_output, measure_layers

__all__ = ["CurvePoint", "FP8Plan", "check_budget", "choose", "plan"]


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """The ``held`` cheapest weights (by error per byte) in FP8: bytes saved, predicted and (where run) measured
    error (worst sample, in the metric's error form)."""

    held: int
    saved_bytes: int
    predicted_error: float
    measured_error: float | None


@dataclasses.dataclass(frozen=True)
class FP8Plan:
    """The result of :func:`plan`: which weights to hold as FP8 and which to keep dense, verified by a run.

    A plan is an exclusion: ``fp8_weights(model, exclude=plan)`` keeps its dense layers dense, and, unless
    ``layers=`` is given too, holds the layer types the plan considered (embedding tables included).
    ``plan.config`` is the same choice as one :class:`FP8Config`.
    """

    model: str
    metric: str
    max_error: float
    config: FP8Config
    held: tuple[str, ...]
    dense: tuple[str, ...]
    saved_bytes: int
    model_bytes: int
    predicted_error: float
    measured_error: float
    curve: tuple[CurvePoint, ...]
    sensitivity: Sensitivity = dataclasses.field(repr=False, compare=False)

    @property
    def exclude(self) -> tuple[Any, ...]:
        """The exclusion, as ``exclude=`` takes it: the caller's own rules, then each layer kept dense by name."""
        return self.config.exclude

    def __iter__(self) -> Iterator[Any]:
        return iter(self.exclude)

    def __len__(self) -> int:
        return len(self.exclude)

    @property
    def saved_fraction(self) -> float:
        """Bytes saved over the whole model's bytes (every parameter and buffer, embeddings included)."""
        return self.saved_bytes / max(self.model_bytes, 1)

    def code(self, name: str = "model") -> str:
        """The line of code that holds this plan."""
        return f"with fp8ctx.fp8_weights({name}, exclude=plan):  # {self.summary()}"

    def summary(self) -> str:
        return (
            f"{len(self.held)} weights FP8, {len(self.dense)} dense: saves {self.saved_bytes / 2**20:.2f} MiB "
            f"({self.saved_fraction:.1%} of the model), measured {describe(self.measured_error, self.metric)} "
            f"(budget {describe(self.max_error, self.metric)}, worst sample)"
        )

    def __str__(self) -> str:
        dense = ", ".join(self.dense[:8]) + (f", ... ({len(self.dense)} in all)" if len(self.dense) > 8 else "")
        return f"{self.model} plan: {self.summary()}\n  kept dense: {dense or 'none'}"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{p.held}</td><td>{p.saved_bytes / 2**20:.2f}</td><td>{html.escape(describe(p.predicted_error, self.metric))}</td>"
            f"<td>{html.escape(describe(p.measured_error, self.metric)) if p.measured_error is not None else ''}</td></tr>"
            for p in self.curve if p.measured_error is not None
        )
        return (
            f"<div><p>{html.escape(str(self)).replace(chr(10), '<br>')}</p><table><thead><tr><th>FP8 weights</th>"
            f"<th>saved MiB</th><th>predicted</th><th>measured</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def to_pandas(self) -> Any:
        """The error-versus-bytes curve as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas

        return pandas.DataFrame([dataclasses.asdict(point) for point in self.curve])


def plan(
    model: nn.Module,
    inputs: Any = None,
    *,
    run: Callable[[nn.Module], Any] | None = None,
    max_error: float,
    metric: str = "cosine",
    config: FP8Config | None = None,
    storage_dtype: torch.dtype | str | None = None,
    granularity: str | None = None,
    block_size: int | None = None,
    layers: Any = None,
    exclude: Exclude = None,
    compute: str | None = None,
    progress_bar: bool | None = None,
) -> FP8Plan:
    """The weights to hold as FP8 that save the most bytes while the output error stays within ``max_error``.

    1. :func:`fp8ctx.sensitivity`: each weight alone in FP8, its exact output error per sample (one run each).
    2. Order weights by error per byte saved; predict the error of the first ``k`` together (errors add in
       power, per sample), for every ``k``: the error-versus-bytes curve.
    3. Verify with real held runs: starting at the largest ``k`` the prediction allows, a bisection over ``k``
       on *measured* errors finds the largest ``k`` whose run stays within the budget. The plan's error is
       that measurement.

    Args:
        model: the model (left exactly as it was).
        inputs, run: what to run, as in :func:`fp8ctx.report`.
        max_error: the budget, in the metric's error form, for the worst sample: ``rel_l2`` relative L2;
            ``cosine`` ``1 − cosine`` (0.001 keeps every sample's cosine ≥ 0.999); ``psnr`` ``10^(−PSNR/10)``
            (1e-4 is 40 dB); ``ssim`` ``1 − SSIM``.
        metric: ``"cosine"`` (default), ``"rel_l2"``, ``"psnr"`` or ``"ssim"``.
        config, storage_dtype, granularity, block_size, layers, exclude, compute: as in :class:`FP8Config`;
            ``layers`` defaults to ``fp8ctx.CANDIDATE_LAYERS`` (embedding tables included) unless a config is
            passed; excluded layers stay dense and are no candidates.
        progress_bar: a bar over the per-weight runs.

    Returns:
        An :class:`FP8Plan`, usable as ``exclude=``.

    Raises:
        FP8Error: a bad option, metric or budget, no inputs, or an exclude pattern naming no layer.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        >>> chosen = fp8ctx.plan(model, torch.randn(4, 32), max_error=1e-3)
        >>> chosen.measured_error <= 1e-3
        True
        >>> with fp8ctx.fp8_weights(model, exclude=chosen) as store:
        ...     sorted(store) == sorted(chosen.held)
        True
    """
    max_error = check_budget(max_error)
    options = resolve(config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size,
                      layers=layers if layers is not None or config is not None else CANDIDATE_LAYERS,
                      exclude=exclude, compute=compute)
    metric, progress_bar = check_metric(metric), check_progress_bar(progress_bar)
    call = caller(inputs, run)
    check_exclude([model], options.config.exclude)
    measured = measure_layers(model, call, options.config, metric, progress_bar)
    return choose(model, call, measured, max_error)


def check_budget(max_error: object) -> float:
    """``max_error`` as a float.

    Raises:
        FP8Error: not a number >= 0.
    """
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not max_error >= 0:
        raise FP8Error(f"max_error must be a number >= 0 (the budget in the metric's error form), got {max_error!r}")
    return float(max_error)


def choose(model: nn.Module, call: Callable[[nn.Module], Any], measured: Sensitivity, max_error: float) -> FP8Plan:
    """Step 2 and 3 of :func:`plan`, on a sensitivity already measured."""
    config, metric, rows = measured.config, measured.metric, measured.rows
    saved = [0]
    for row in rows:
        saved.append(saved[-1] + row.saved_bytes)
    predicted = [0.0] + [float(combine(measured.sample_errors[:k], metric).max()) for k in range(1, len(rows) + 1)]
    targets = {target.name: target for target in Plan.make(model, config).targets}
    entries: dict[str, Any] = {}
    runs: dict[int, float] = {0: 0.0}

    def measure(k: int) -> float:
        names = [row.name for row in rows[:k]]
        for name in names:
            if name not in entries:
                entries[name] = quantize_target(targets[name], config)
        actual = held_output(model, call, [targets[n] for n in names], {n: entries[n] for n in names}, config)
        runs[k] = float(sample_errors(actual, expected, metric).max())
        return runs[k]

    with measuring(model):
        expected = output_of(call, model)
        low, high = 0, len(rows)  # the answer lies in [low, high]; k = low is known to be within budget
        probe = max((k for k, error in enumerate(predicted) if error <= max_error), default=0)
        while low < high:
            k = probe if low < probe <= high else (low + high + 1) // 2
            probe = -1
            if measure(k) <= max_error:
                low = k
            else:
                high = k - 1
    held = tuple(row.name for row in rows[:low])
    dense_layers = [row.layer for row in rows[low:]]
    chosen = config.replace(exclude=config.exclude + tuple(literal(name) for name in dense_layers))
    curve = tuple(CurvePoint(k, saved[k], predicted[k], runs.get(k)) for k in range(len(rows) + 1))
    return FP8Plan(
        measured.model, metric, max_error, chosen, held, tuple(row.name for row in rows[low:]), saved[low],
        measured.model_bytes, predicted[low], runs[low], curve, measured,
    )
