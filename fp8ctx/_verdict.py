"""The report's decision: a one-line verdict against stated thresholds, and the next line of code to try."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ._config import FP8Config
from ._quality import describe

__all__ = ["DEFAULT_BUDGETS", "SQNR_FLOOR_DB", "Verdict", "decide"]

DEFAULT_BUDGETS = {"cosine": 1e-3, "rel_l2": 0.05, "psnr": 1e-4, "ssim": 1e-2}
"""The output error a report accepts by default, per metric (error form): cosine ≥ 0.999, relative L2 ≤ 5 %,
PSNR ≥ 40 dB, SSIM ≥ 0.99; for the worst sample."""

SQNR_FLOOR_DB = 20.0
"""Below this weight SQNR a weight is flagged even when the output passes (e4m3 gives about 31 dB on
trained weights; 20 dB is three bits short)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the measured output error is within the budget, the thresholds used, and what to try next."""

    passed: bool
    line: str
    next_code: str


def decide(
    metric: str,
    max_error: float,
    output_error: float | None,
    worst_sqnr: tuple[str, float] | None,
    config: FP8Config,
    planned: tuple[Sequence[str], int, float] | None,
    measured_layers: bool,
) -> Verdict:
    """The verdict for one report.

    Args:
        metric, max_error: the output metric and its budget (error form, worst sample).
        output_error: the measured worst-sample error, or None when the model was not run.
        worst_sqnr: the weight with the lowest SQNR and its value, or None.
        config: the config the report held.
        planned: from the planner when the output failed: layers to keep dense, bytes then saved, measured error.
        measured_layers: whether per-layer output errors were measured (a plan could be made).
    """
    budget = describe(max_error, metric)
    keywords = _keywords(config)
    sqnr_ok = worst_sqnr is None or worst_sqnr[1] >= SQNR_FLOOR_DB or math.isinf(worst_sqnr[1])
    sqnr_text = (
        "" if worst_sqnr is None else
        f"; lowest weight SQNR {worst_sqnr[1]:.1f} dB ({worst_sqnr[0]}) {'>=' if sqnr_ok else '<'} {SQNR_FLOOR_DB:.0f} dB"
    )
    if output_error is None:
        verdict = "weights only" if sqnr_ok else "CHECK"
        line = f"verdict: {verdict} — no output measured (pass inputs or run=){sqnr_text}"
        code = f"fp8ctx.report(model, inputs{keywords})  # measure the output too"
        if not sqnr_ok and worst_sqnr is not None:
            code = f"with fp8ctx.fp8_weights(model{keywords}, exclude=[{worst_sqnr[0].removesuffix('.weight')!r}]):"
        return Verdict(sqnr_ok, line, code)
    within = output_error <= max_error
    line = (
        f"verdict: {'OK' if within and sqnr_ok else 'OK (output)' if within else 'OVER BUDGET'} — worst-sample "
        f"{describe(output_error, metric)} {'within' if within else 'beyond'} the budget {budget}{sqnr_text}"
    )
    if within:
        return Verdict(True, line, f"with fp8ctx.fp8_weights(model{keywords}):")
    if planned is not None:
        dense, saved, error = planned
        names = ", ".join(repr(name) for name in dense)
        return Verdict(
            False, line,
            f"with fp8ctx.fp8_weights(model{keywords}, exclude=[{names}]):  # saves {saved / 2**20:.2f} MiB, "
            f"measured {describe(error, metric)}",
        )
    hint = "" if measured_layers else ", inputs"
    return Verdict(
        False, line,
        f"plan = fp8ctx.plan(model{hint}, max_error={max_error:g}, metric={metric!r}{keywords}); "
        "then fp8ctx.fp8_weights(model, exclude=plan)",
    )


def _keywords(config: FP8Config) -> str:
    """The non-default scheme fields of ``config`` as keyword text (``", granularity='tensor'"``)."""
    default = FP8Config()
    parts = []
    if config.storage_dtype != default.storage_dtype:
        parts.append(f"storage_dtype={str(config.storage_dtype).removeprefix('torch.')!r}")
    if config.granularity != default.granularity:
        parts.append(f"granularity={config.granularity.value!r}")
    if config.granularity == "block" and config.block_size != default.block_size:
        parts.append(f"block_size={config.block_size}")
    if config.compute != default.compute:
        parts.append(f"compute={config.compute!r}")
    return "".join(f", {part}" for part in parts)
