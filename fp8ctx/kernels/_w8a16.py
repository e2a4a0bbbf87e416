"""The fused W8A16 matmul: ``y = x @ (q * s)^T + bias`` with FP8 weight tiles decoded in registers.

The matmul streams FP8 tiles (half the bytes of bf16) and converts them in registers; accumulation is fp32 on
the tensor cores. fp8 -> bf16/fp16 is exact, so for "tensor" and "channel" the scale is applied to the fp32
accumulator per output column in the epilogue (one multiply per output instead of per weight), together with
the bias (fused: no separate add). For "block" the per-(row-block, k-block) scale is applied inside the K loop,
to the weight tile in registers (giving exactly the reference bf16 weights) or to a per-iteration partial
product (cheaper when T is small).

Two MMA orientations (constexpr SWAP): ``y = x W^T`` with the decoded weight tile as the register B operand of
mma.sync (best for T <= 32), and ``y^T = W x^T`` with the decoded tile as the register A operand of wgmma and
tokens as the MMA N dimension (T = 64 .. 512). Small T may have too few output tiles to fill the GPU, so K can
be split across CTAs: partials go to an fp32 workspace slice per split; the last CTA of each tile (found with
an atomic counter) sums the slices in a fixed order (deterministic), applies scale and bias, writes the output
and resets its counter so the cached counters stay zeroed.
"""

from __future__ import annotations

import torch

from .._layout import FP8Layout, Granularity
from ._capability import HAS_TRITON, tl, triton
from ._decode import fp8_decode
from ._launch import launcher, workspace
from ._plan import KernelConfig, LaunchPlan, plan_linear

__all__ = ["fused_linear", "plan_for"]

if HAS_TRITON:

    @triton.jit
    def _mma(a, b, acc, INTERP: tl.constexpr):
        # The Triton interpreter mis-computes bf16 dots; upcast only there.
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _epilogue(acc, s_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym,
                  SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr):
        # acc is (BN, BM) when SWAP else (BM, BN); scale/bias are per output column n.
        n_ok = offs_n < N
        if SCALE_MODE == 0:
            acc = acc * tl.load(s_ptr)
        elif SCALE_MODE == 1:
            s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
            if SWAP:
                acc = acc * s[:, None]
            else:
                acc = acc * s[None, :]
        if HAS_BIAS:
            bv = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if SWAP:
                acc = acc + bv[:, None]
            else:
                acc = acc + bv[None, :]
        rows = offs_m.to(tl.int64) * stride_ym
        if SWAP:
            ptrs = y_ptr + rows[None, :] + offs_n[:, None]
            mask = n_ok[:, None] & (offs_m[None, :] < M)
        else:
            ptrs = y_ptr + rows[:, None] + offs_n[None, :]
            mask = (offs_m[:, None] < M) & n_ok[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M", "stride_sn", "split_k"])
    def _w8a16_kernel(
        x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_ym, stride_sn,
        k_per_split, split_k,
        SCALE_MODE: tl.constexpr,      # 0 tensor, 1 channel, 2 block
        SBLOCK: tl.constexpr,          # block size B for SCALE_MODE == 2
        BSCALE_ACC: tl.constexpr,      # block scale on per-iteration partials
        HAS_BIAS: tl.constexpr,
        FMT_E5M2: tl.constexpr,
        USE_ASM: tl.constexpr,
        SWAP: tl.constexpr,
        SPLIT: tl.constexpr,
        INTERP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        OUT_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        # Grouped tile order: GROUP_M row-tiles share weight tiles while hot in L2.
        group = GROUP_M * num_pid_n
        gid = pid // group
        first_m = gid * GROUP_M
        gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % gsize
        pid_n = (pid % group) // gsize

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        if SCALE_MODE == 2:
            s_rows = s_ptr + (offs_n // SBLOCK) * stride_sn

        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)

        # Loop bounds are launch arguments (uniform across CTAs); the last split
        # may run past K, where every load is masked off (no traffic, and its
        # iteration count equals the other splits', so no wall-time cost).
        k_lo = pid_k * k_per_split
        for kk in range(0, k_per_split, BK):
            k0 = k_lo + kk
            k_ok = (k0 + offs_k) < K
            xt = tl.load(x_ptrs + k0 * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            qt = tl.load(q_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0)
            w = fp8_decode(qt, FMT_E5M2, OUT_BF16, USE_ASM)  # (BN, BK), exact
            if SCALE_MODE == 2:
                # BK divides SBLOCK and k0 is a multiple of BK: one k-block per tile.
                sb = tl.load(s_rows + k0 // SBLOCK, mask=n_ok, other=0.0)
                if BSCALE_ACC:
                    if SWAP:
                        part = _mma(w, tl.trans(xt), tl.zeros((BN, BM), dtype=tl.float32), INTERP)
                        acc += part * sb[:, None]
                    else:
                        part = _mma(xt, tl.trans(w), tl.zeros((BM, BN), dtype=tl.float32), INTERP)
                        acc += part * sb[None, :]
                else:
                    # Same rounding as the reference: bf16(q * s).
                    w = (w.to(tl.float32) * sb[:, None]).to(xt.dtype)
                    if SWAP:
                        acc = _mma(w, tl.trans(xt), acc, INTERP)
                    else:
                        acc = _mma(xt, tl.trans(w), acc, INTERP)
            else:
                if SWAP:
                    acc = _mma(w, tl.trans(xt), acc, INTERP)
                else:
                    acc = _mma(xt, tl.trans(w), acc, INTERP)

        if SPLIT:
            # Deterministic split-K: every split writes its partial tile to its own
            # workspace slice; the last one to arrive sums the slices in order.
            num_tiles = num_pid_m * num_pid_n
            if SWAP:
                tile_offs = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
            else:
                tile_offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
            tile_base = ws_ptr + pid.to(tl.int64) * (BM * BN)
            slice_stride = num_tiles.to(tl.int64) * (BM * BN)
            tl.store(tile_base + pid_k * slice_stride + tile_offs, acc)
            # All threads' stores must precede thread 0's release atomic.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                total = tl.zeros_like(acc)
                for s in range(0, split_k):
                    # .cg: read at L2, never a stale L1 line.
                    total += tl.load(tile_base + s * slice_stride + tile_offs, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
                _epilogue(total, s_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym,
                          SCALE_MODE, HAS_BIAS, SWAP)
        else:
            _epilogue(acc, s_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym,
                      SCALE_MODE, HAS_BIAS, SWAP)

else:  # pragma: no cover - without Triton nothing launches these
    _w8a16_kernel = None

_launch = launcher(_w8a16_kernel)


def _int_spec(value: int) -> tuple[bool, bool]:
    return value == 1, value % 16 == 0


def fused_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    bias: torch.Tensor | None,
    config: KernelConfig,
    plan: LaunchPlan | None = None,
) -> torch.Tensor:
    """One launch of the fused kernel on checked inputs.

    Args:
        x: ``(..., K)`` bf16/fp16 CUDA activations, 2-D with any strides or contiguous (M, N, K > 0).
        data: ``(N, K)`` contiguous FP8 codes.
        scale: float32 contiguous scales of ``layout`` on the same device.
        layout: the weight's scheme (channel axis 0).
        bias: ``(N,)`` contiguous tensor of any float dtype, or None; added in fp32 before the one rounding.
        config: the tile configuration.
        plan: the plan :func:`plan_for` gave for this problem (looked up when None).

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    K = x.shape[-1]
    N = data.shape[0]
    if x.dim() == 2:
        M, stride_m, stride_k = x.shape[0], x.stride(0), x.stride(1)
    else:  # contiguous (the caller made sure): rows are K apart, no reshaped view needed
        M, stride_m, stride_k = x.numel() // K, K, 1
    device = x.device
    if plan is None:
        plan = plan_for(M, N, K, layout, config, device, bias is not None, data.dtype)
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=device)
    if plan.split_k > 1:
        ws, cnt = workspace(device, plan.split_k * plan.tiles * config.BM * config.BN, plan.tiles)
    else:
        ws = cnt = y  # unused: SPLIT is a constexpr False
    block_stride = scale.stride(0) if layout.granularity is Granularity.BLOCK else 0
    b = y if bias is None else bias
    args = (
        x, data.view(torch.uint8), scale, b, y, ws, cnt,
        M, N, K, stride_m, stride_k, N, block_stride, plan.k_per_split, plan.split_k,
    )  # fmt: skip
    # what Triton specialises on beyond the plan: dtypes, 16-byte alignment of inputs (outputs and workspaces are
    # fresh allocations), and the activation strides
    key = (
        plan, x.dtype, b.dtype, x.data_ptr() & 15, data.data_ptr() & 15, scale.data_ptr() & 15, b.data_ptr() & 15,
        _int_spec(stride_m), _int_spec(stride_k),
    )  # fmt: skip
    _launch((plan.tiles, plan.split_k, 1), device, args, plan.consts, plan.const_values, config.warps, config.stages, key)
    return y


def plan_for(
    M: int, N: int, K: int, layout: FP8Layout, config: KernelConfig, device: torch.device, has_bias: bool,
    fp8_dtype: torch.dtype,
) -> LaunchPlan:
    """The cached launch plan of the fused kernel for this problem."""
    return plan_linear(M, N, K, layout, config, device, has_bias, fp8_dtype == torch.float8_e5m2, _launch.const_values)
