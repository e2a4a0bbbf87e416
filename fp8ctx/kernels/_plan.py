"""Tile configurations of the fused W8A16 matmul, the split-K planner, and the cached launch plan.

Config choice from (T, N, K), measured on an H100 (bench/KERNEL_NOTES.md, run 2, graph-rotate timing). T <= 64
is memory-bound: narrow weight tiles, no swap (mma.sync with the decoded weight as the register B operand),
long K steps. Above T = 64 the fused kernel's tensor-core rate (mixed-input wgmma through Triton) falls to
~40-65 % of cuBLAS, so compute-bound calls are better served by dequantize + cuBLAS; which one wins per shape
is measured by :mod:`._route` where tuning is on, :func:`pick_config` is the deterministic default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from .._errors import FP8Error
from .._layout import FP8Layout, Granularity
from ._capability import INTERPRET, num_sms, use_asm

__all__ = ["KernelConfig", "LaunchPlan", "pick_config", "plan_linear", "split_plan"]


class KernelConfig(NamedTuple):
    """Tile configuration of the fused matmul (T = rows of the flattened activation)."""

    BM: int  # tokens per tile
    BN: int  # output features per tile
    BK: int  # reduction chunk
    swap: bool  # compute y^T = W x^T (the weight as the MMA M operand)
    warps: int
    stages: int
    split: bool = True  # allow split-K when the tile grid underfills the GPU
    group_m: int = 8
    asm: bool | None = None  # inline-PTX fp8 decode; None = on where supported


CFG_T16 = KernelConfig(16, 32, 512, False, 4, 3)
CFG_T32 = CFG_T16  # two 16-row tiles beat 32-row tiles (run 3)
CFG_T64 = KernelConfig(64, 64, 128, True, 4, 4)
CFG_T64_SMALL_W = KernelConfig(64, 128, 128, True, 8, 4)  # fewer x re-reads when N*K is small
CFG_MID = KernelConfig(256, 128, 64, True, 8, 3)
FUSED_CONFIGS = {"t16": CFG_T16, "t64": CFG_T64, "t64_small_w": CFG_T64_SMALL_W, "mid": CFG_MID}
_MID_FUSED_MIN_WEIGHT = 60_000_000  # N*K from which the fused kernel wins at T ~ 256


def pick_config(M: int, N: int, K: int) -> KernelConfig | None:
    """The measured default for ``M`` tokens on an ``(N, K)`` weight; None means dequantize + cuBLAS."""
    if M <= 32:
        return CFG_T16
    if M <= 64:
        return CFG_T64_SMALL_W if N * K < 30_000_000 else CFG_T64
    if M <= 512 and N * K >= _MID_FUSED_MIN_WEIGHT:
        return CFG_MID
    return None


def split_plan(tiles: int, K: int, BK: int, sms: int, allow: bool) -> tuple[int, int]:
    """``(split_k, k_per_split)``: split K until ~2 CTAs per SM, keeping at least 4 K-iterations per split so
    the software pipeline fills."""
    iters = -(-K // BK)
    if not allow or tiles >= sms:
        return 1, iters * BK
    want = -(-2 * sms // tiles)
    split = max(1, min(want, iters // 4))
    per = -(-iters // split)
    split = -(-iters // per)
    return split, per * BK


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: plans are cached, never rebuilt
class LaunchPlan:
    """Everything about one fused-matmul launch that depends only on the problem, computed once per shape.

    Attributes:
        config: the tile configuration.
        tiles: output tiles (grid dimension 0).
        split_k: CTAs per tile along K (grid dimension 1); 1 means no split.
        k_per_split: K elements each split covers (a multiple of the K tile).
        consts: the kernel's constexpr arguments by name.
        const_values: the same in launcher order.
    """

    config: KernelConfig
    tiles: int
    split_k: int
    k_per_split: int
    consts: dict[str, Any]
    const_values: tuple[Any, ...]


_PLANS: dict[tuple[Any, ...], LaunchPlan] = {}


def plan_linear(
    M: int,
    N: int,
    K: int,
    layout: FP8Layout,
    config: KernelConfig,
    device: torch.device,
    has_bias: bool,
    e5m2: bool,
    const_order: Any,
) -> LaunchPlan:
    """The cached :class:`LaunchPlan` of a fused launch (``const_order`` orders the constexpr values).

    Raises:
        FP8Error: a block size without a power-of-two factor >= 16 (a K tile must lie inside one scale block).
    """
    key = (M, N, K, layout.granularity, layout.block_size, config, device, has_bias, e5m2)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    block = layout.granularity is Granularity.BLOCK
    BK = config.BK
    if block:
        while BK > 16 and layout.block_size % BK:
            BK //= 2
        if layout.block_size % BK:
            raise FP8Error(
                f"the fused kernel needs block_size with a power-of-two factor >= 16, got {layout.block_size}; "
                "use a block size such as 64 or 128, or the pure-torch backend (kernels.use_backend('torch'))"
            )
    tiles = -(-M // config.BM) * -(-N // config.BN)
    split_k, k_per = split_plan(tiles, K, BK, num_sms(device), config.split)
    consts = dict(
        SCALE_MODE=layout.granularity.kernel_code,
        SBLOCK=layout.block_size if block else 1,
        BSCALE_ACC=block and config.BM <= 64,
        HAS_BIAS=has_bias,
        FMT_E5M2=e5m2,
        USE_ASM=use_asm(device, config.asm),
        SWAP=config.swap,
        SPLIT=split_k > 1,
        INTERP=INTERPRET,
        BM=config.BM,
        BN=config.BN,
        BK=BK,
        GROUP_M=config.group_m,
    )
    plan = LaunchPlan(config, tiles, split_k, k_per, consts, const_order(consts))
    if len(_PLANS) > 4096:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan
