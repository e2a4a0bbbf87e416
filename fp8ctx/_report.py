"""`report`: what FP8 storage does to a model — bytes saved, weight error per layer, output error, exact restore.

This module measures; the :class:`Report` it returns, and how that reads, is ``_report_record``'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._budget import check_budget, choose
from ._config import Exclude, FP8Config
from ._context import fp8_weights
from ._exclude import check_exclude
from ._inventory import DenseEntry, DenseInventory, dense_inventory
from ._memory import MemoryReport, PeakMeter, params_and_buffers
from ._metrics import OutputReport, compare_outputs, fingerprint, weight_error
from ._options import check_originals, check_progress_bar, resolve, stores_for
from ._plan import Plan
from ._quality import check_metric, sample_errors
from ._report_record import DEFAULT_ROWS, LayerReport, Report
from ._runs import caller, measuring, output_of
from ._sensitivity import measure_layers, model_bytes
from ._store import FP8Store
from ._verdict import DEFAULT_BUDGETS, decide

__all__ = ["DEFAULT_ROWS", "DenseEntry", "DenseInventory", "LayerReport", "OutputReport", "Report", "report"]

logger = logging.getLogger("fp8ctx")


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
