"""Triton GPU kernels for FP8-stored weights (pure functions, thin launchers).

Storage contract (fixed by the core): a Linear weight ``W`` of shape ``(N, K)``
is stored as ``qdata`` (float8_e4m3fn or float8_e5m2, contiguous, shape (N, K))
plus a float32 ``scale`` that is MULTIPLIED on dequantize:

* ``"tensor"``:  scale shape ``()``
* ``"channel"``: scale shape ``(N,)`` (one per output row)
* ``"block"``:   scale shape ``(ceil(N/B), ceil(K/B))``; tile (i, j) covers rows
  ``i*B:(i+1)*B`` and columns ``j*B:(j+1)*B``.

Reference semantics: ``Wd = (qdata.float() * scale_b).to(x.dtype)`` and
``y = F.linear(x, Wd, bias)``.

Public functions: :func:`w8a16_linear`, :func:`dequantize`, :func:`embedding`,
:func:`is_supported`.  The module imports without Triton or CUDA (CPU-only CI);
the functions then raise ``RuntimeError`` and ``is_supported`` returns False.

Design notes (the why; numbers live in bench/KERNEL_NOTES.md):

* The matmul streams FP8 tiles (half the bytes of bf16) and converts them in
  registers; accumulation is fp32 on the tensor cores (``tl.dot`` on bf16/fp16).
* fp8 -> bf16/fp16 is exact (every e4m3/e5m2 value is representable), so for
  "tensor" and "channel" the scale is applied to the fp32 accumulator per output
  column in the epilogue (one multiply per output instead of per weight).
  For "block" the per-(row-block, k-block) scale is applied inside the K loop,
  either to the weight tile in registers (giving exactly the reference bf16
  weights) or to a per-iteration partial product (cheaper when T is small).
* On sm_90 the stock Triton e4m3 -> bf16 conversion goes through two scalar
  ``cvt`` per element pair, and conversions have low throughput; we instead move
  the exponent/mantissa bits into bf16 position with integer ops and re-bias the
  exponent with one packed bf16x2 multiply by 2^120 (exact, subnormals included).
  The fallback (``FP8CTX_TRITON_NO_ASM=1`` or the Triton interpreter) uses the
  stock conversion.
* Two MMA orientations (constexpr SWAP): no-swap ``y = x W^T`` with the
  decoded weight tile as the register B operand of mma.sync (best for
  T <= 32: least repacking per weight byte), and swap ``y^T = W x^T`` with the
  decoded tile as the register A operand of wgmma and tokens as the MMA N
  dimension (T = 64 .. 512).
* Small T is memory-bound and may have too few output tiles to fill 132 SMs,
  so the K loop can be split across CTAs.  Partials go to an fp32 workspace
  slice per split; the last CTA of each tile (found with an atomic counter)
  sums the slices in a fixed order (deterministic), applies scale/bias and
  writes the output, then resets its counter to 0 so the cached counters stay
  zeroed for the next call.
* Compute-bound calls (large T, or mid T on small weights) go through
  :func:`dequantize` (one pass, ~90% of HBM bandwidth) + cuBLAS: in Triton 3.6
  the fused kernel reaches only 45-65% of cuBLAS's tensor-core rate.
* Host cost matters for eager decode: launch plans are cached per shape and
  repeated launches call Triton's compiled launcher directly (_FastLaunch).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.nn.functional as F

try:  # Triton is optional: the core falls back to torch when it is absent.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

if TYPE_CHECKING:  # the launchers only read a layout's fields; this file stays loadable on its own
    from .._layout import FP8Layout

__all__ = [
    "HAS_TRITON",
    "is_supported",
    "w8a16_linear",
    "dequantize",
    "embedding",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Escape hatch: use Triton's stock fp8 conversions instead of the inline PTX.
_NO_ASM = os.environ.get("FP8CTX_TRITON_NO_ASM", "0") == "1"

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_ACT_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- #
# Capability check
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton interpreter on CPU tensors
        return 132
    return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())


def is_supported(x: torch.Tensor, qdata: Optional[torch.Tensor] = None) -> bool:
    """Tell the dispatcher whether the Triton fast path applies.

    Args:
        x: the activation (..., K) for :func:`w8a16_linear`; or, called with
            one argument, the FP8 tensor itself (dequantize / embedding).
        qdata: the FP8 weight (2-D for the matmul).

    Returns:
        True when Triton is importable, the tensors are on one CUDA (not ROCm)
        device of compute capability >= 8.9 (Triton's fp8e4nv needs sm_89),
        the FP8 tensor is e4m3fn/e5m2 and, for the matmul, x is bf16/fp16 and
        qdata is 2-D.
    """
    if not HAS_TRITON or getattr(torch.version, "hip", None):
        return False
    if qdata is None:
        x, qdata, need_act = qdata, x, False
    else:
        need_act = True
    if not isinstance(qdata, torch.Tensor) or not qdata.is_cuda or qdata.dtype not in _FP8_DTYPES:
        return False
    if need_act:
        if not isinstance(x, torch.Tensor) or not x.is_cuda or x.device != qdata.device:
            return False
        if x.dtype not in _ACT_DTYPES or qdata.dim() != 2:
            return False
    index = qdata.device.index if qdata.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def _sm90(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def _use_asm(device: torch.device) -> bool:
    # mul.rn.bf16x2 needs sm_90; the interpreter cannot run PTX.
    return not (_NO_ASM or _INTERPRET) and _sm90(device)


def _asm_flag(device: torch.device, want: Optional[bool]) -> bool:
    """Default (None) follows the environment; True/False force it where legal."""
    if want is None:
        return _use_asm(device)
    return bool(want) and not _INTERPRET and _sm90(device)


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError("fp8ctx.kernels._triton: Triton is not installed")


if HAS_TRITON:

    # ----------------------------------------------------------------------- #
    # fp8 bit patterns (uint8) -> exact bf16 / fp16
    # ----------------------------------------------------------------------- #
    @triton.jit
    def _e4m3_to_bf16_asm(q):
        # Per 4 codes: spread bytes into the high byte of 16-bit lanes, drop the
        # sign, shift exponent|mantissa right by 4 into bf16 position, restore the
        # sign, then multiply by 2^120 (bf16 0x7B80) to re-bias the exponent
        # (7 -> 127).  e4m3 subnormals become bf16 subnormals, which the
        # multiply handles exactly.  The NaN codes 0x7F/0xFF decode to +-480
        # (quantizers never emit NaN; dequantize() keeps NaN exact).
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 a<2>, b<2>, e120;
            mov.u32 e120, 0x7B807B80;
            prmt.b32 a0, 0, $2, 0x5140;
            prmt.b32 a1, 0, $2, 0x7362;
            and.b32 b0, a0, 0x7F007F00;
            and.b32 b1, a1, 0x7F007F00;
            shr.b32 b0, b0, 4;
            shr.b32 b1, b1, 4;
            lop3.b32 b0, b0, 0x80008000, a0, 0xf8;
            lop3.b32 b1, b1, 0x80008000, a1, 0xf8;
            mul.rn.bf16x2 $0, b0, e120;
            mul.rn.bf16x2 $1, b1, e120;
            }
            """,
            constraints="=r,=r,r",
            args=[q],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=4,
        )

    @triton.jit
    def _e5m2_to_f16_asm(q):
        # An e5m2 code is exactly the high byte of the fp16 with the same value:
        # two byte permutes per 4 codes, no arithmetic.
        return tl.inline_asm_elementwise(
            asm="""
            {
            prmt.b32 $0, 0, $2, 0x5140;
            prmt.b32 $1, 0, $2, 0x7362;
            }
            """,
            constraints="=r,=r,r",
            args=[q],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )

    @triton.jit
    def _fp8_decode(q, FMT_E5M2: tl.constexpr, OUT_BF16: tl.constexpr, USE_ASM: tl.constexpr):
        """uint8 fp8 codes -> bf16 (OUT_BF16) or fp16, exactly."""
        if USE_ASM and OUT_BF16 and not FMT_E5M2:
            w = _e4m3_to_bf16_asm(q)
        elif USE_ASM and (not OUT_BF16) and FMT_E5M2:
            w = _e5m2_to_f16_asm(q)
        else:
            # Stock paths: e4m3->f16 is one packed cvt; e5m2->bf16 already uses
            # a bit trick inside Triton (it maps +-inf to +-65536; quantizers
            # never emit inf, and dequantize() keeps inf exact).
            if FMT_E5M2:
                f = q.to(tl.float8e5, bitcast=True)
            else:
                f = q.to(tl.float8e4nv, bitcast=True)
            if OUT_BF16:
                w = f.to(tl.bfloat16)
            else:
                w = f.to(tl.float16)
        return w

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
            w = _fp8_decode(qt, FMT_E5M2, OUT_BF16, USE_ASM)  # (BN, BK), exact
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

    # ----------------------------------------------------------------------- #
    # Dequantize (2-D) and embedding gather
    # ----------------------------------------------------------------------- #
    @triton.jit(do_not_specialize=["stride_sn"])
    def _dequant_kernel(q_ptr, s_ptr, o_ptr, R, C, stride_sn,
                        SCALE_MODE: tl.constexpr, SBLOCK: tl.constexpr,
                        FMT_E5M2: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r * BR + tl.arange(0, BR)
        offs_c = pid_c * BC + tl.arange(0, BC)
        r_ok = offs_r < R
        mask = r_ok[:, None] & (offs_c[None, :] < C)
        off = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        q = tl.load(q_ptr + off, mask=mask, other=0)
        if FMT_E5M2:
            v = q.to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        # Same arithmetic as the reference: fp32 product, one rounding to out.
        if SCALE_MODE == 0:
            v = v * tl.load(s_ptr)
        elif SCALE_MODE == 1:
            v = v * tl.load(s_ptr + offs_r, mask=r_ok, other=0.0)[:, None]
        else:
            sp = s_ptr + (offs_r // SBLOCK)[:, None] * stride_sn + (offs_c // SBLOCK)[None, :]
            v = v * tl.load(sp, mask=mask, other=0.0)
        tl.store(o_ptr + off, v.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_idx", "stride_sn"])
    def _embedding_kernel(idx_ptr, q_ptr, s_ptr, o_ptr, n_idx, D, stride_sn,
                          SCALE_MODE: tl.constexpr, SBLOCK: tl.constexpr,
                          FMT_E5M2: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        r_ok = rows < n_idx
        idx = tl.load(idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        if SCALE_MODE == 0:
            s0 = tl.load(s_ptr)
        elif SCALE_MODE == 1:
            s1 = tl.load(s_ptr + idx, mask=r_ok, other=0.0)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask = r_ok[:, None] & (offs_d[None, :] < D)
            q = tl.load(q_ptr + idx[:, None] * D + offs_d[None, :], mask=mask, other=0)
            if FMT_E5M2:
                v = q.to(tl.float8e5, bitcast=True).to(tl.float32)
            else:
                v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            if SCALE_MODE == 0:
                v = v * s0
            elif SCALE_MODE == 1:
                v = v * s1[:, None]
            else:
                sp = s_ptr + (idx // SBLOCK)[:, None] * stride_sn + (offs_d // SBLOCK)[None, :]
                v = v * tl.load(sp, mask=mask, other=0.0)
            tl.store(o_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                     v.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_kernel(q_ptr, o_ptr, n, FMT_E5M2: tl.constexpr, OUT_BF16: tl.constexpr,
                       USE_ASM: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        q = tl.load(q_ptr + offs, mask=m, other=0)
        tl.store(o_ptr + offs, _fp8_decode(q, FMT_E5M2, OUT_BF16, USE_ASM), mask=m)


# --------------------------------------------------------------------------- #
# Launch configuration
# --------------------------------------------------------------------------- #
class KernelConfig(NamedTuple):
    """Tile configuration of the fused matmul (T = rows of flattened x)."""

    BM: int          # tokens per tile
    BN: int          # output features per tile
    BK: int          # reduction chunk
    swap: bool       # compute y^T = W x^T (weights as the MMA M operand)
    warps: int
    stages: int
    split: bool = True  # allow split-K when the tile grid underfills the GPU
    group_m: int = 8
    asm: Optional[bool] = None  # inline-PTX fp8 decode; None = on where supported
    method: str = "fused"  # "fused" kernel, or "dequant": dequantize() + cuBLAS


# Config choice from (T, N, K); measured on an H100 (bench/KERNEL_NOTES.md,
# run 2, graph-rotate timing).  T <= 64 is memory-bound: narrow weight tiles,
# no swap (mma.sync with the decoded weight as the register B operand), long K
# steps.  Above T = 64 the fused kernel's tensor-core rate (mixed-input wgmma
# through Triton) falls to ~40-65% of cuBLAS, so compute-bound calls go through
# dequantize() (~90% of HBM bandwidth) + cuBLAS, except mid-T calls on large
# weights where the fused kernel still wins.
_CFG_T16 = KernelConfig(16, 32, 512, False, 4, 3)
_CFG_T32 = _CFG_T16  # two 16-row tiles beat 32-row tiles (run 3)
_CFG_T64 = KernelConfig(64, 64, 128, True, 4, 4)
_CFG_T64_SMALL_W = KernelConfig(64, 128, 128, True, 8, 4)  # fewer x re-reads when N*K is small
_CFG_MID = KernelConfig(256, 128, 64, True, 8, 3)
_CFG_DEQUANT = KernelConfig(0, 0, 0, False, 0, 0, method="dequant")
_MID_FUSED_MIN_WEIGHT = 60_000_000  # N*K from which the fused kernel wins at T ~ 256


def _pick_config(M: int, N: int = 0, K: int = 0) -> KernelConfig:
    if M <= 16:
        return _CFG_T16
    if M <= 32:
        return _CFG_T32
    if M <= 64:
        return _CFG_T64_SMALL_W if N * K < 30_000_000 else _CFG_T64
    if M <= 512 and N * K >= _MID_FUSED_MIN_WEIGHT:
        return _CFG_MID
    return _CFG_DEQUANT


def _split_plan(tiles: int, K: int, BK: int, sms: int, allow: bool):
    """Return (split_k, k_per_split).  Split K until ~2 CTAs per SM, keeping
    at least 4 K-iterations per split so the software pipeline fills."""
    iters = -(-K // BK)
    if not allow or tiles >= sms:
        return 1, iters * BK
    want = -(-2 * sms // tiles)
    split = max(1, min(want, iters // 4))
    per = -(-iters // split)
    split = -(-iters // per)
    return split, per * BK


_WORKSPACES: dict = {}


def _workspace(device: torch.device, ws_elems: int, n_cnt: int):
    """fp32 partial-sum workspace and zeroed int32 arrival counters.

    Cached per (device, stream): the kernel leaves the counters at zero, and
    launches on one stream never overlap.  Under CUDA-graph capture fresh
    buffers are allocated (captured as a memset) so the cache never holds
    memory from a graph pool.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return (torch.empty(ws_elems, dtype=torch.float32, device=device),
                torch.zeros(n_cnt, dtype=torch.int32, device=device))
    key = (device, _raw_stream(device.index or 0))
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < ws_elems:
        ws = torch.empty(max(ws_elems, 1 << 20), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 4096), dtype=torch.int32, device=device)
    _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def _check_scale(scale: torch.Tensor, layout: "FP8Layout", N: int, K: int, device) -> torch.Tensor:
    want = layout.scale_shape((N, K))
    if scale.shape != want:
        raise ValueError(f"scale shape {tuple(scale.shape)} != expected {want}")
    if scale.dtype is not torch.float32 or scale.device != device or not scale.is_contiguous():
        scale = scale.to(device=device, dtype=torch.float32).contiguous()
    return scale


# --------------------------------------------------------------------------- #
# Public launchers
# --------------------------------------------------------------------------- #
class _FastLaunch:
    """Launch a @triton.jit kernel with little host overhead.

    The first call for a specialisation goes through Triton's normal path
    (compile or cache load) and keeps the returned CompiledKernel; later calls
    with the same specialisation key call its compiled launcher directly,
    skipping Triton's per-call argument binding and cache-key work (measured:
    ~83 us -> see KERNEL_NOTES.md).  The key mirrors what Triton specialises
    on: tensor dtype + 16-byte alignment, int == 1 / % 16 / 64-bit, and the
    constexpr values.  Launch hooks (profilers) force the normal path.
    """

    def __init__(self, fn):
        self.fn = fn
        self.cache = {}
        try:
            names = list(fn.arg_names)
            const_names = [n for n, p in zip(names, fn.params) if p.is_constexpr]
        except AttributeError:  # interpreter, or Triton internals changed
            self.ok, self.const_names = False, []
            return
        # Constexprs must trail the runtime args: launcher args are positional.
        self.ok = not _INTERPRET and const_names == names[len(names) - len(const_names):]
        self.const_names = const_names

    @staticmethod
    def _spec(args):
        T = torch.Tensor
        return tuple((a.dtype, (a.data_ptr() & 15) == 0) if isinstance(a, T)
                     else (a == 1, (a & 15) == 0, a >= 2147483648 or a < -2147483648) if isinstance(a, int)
                     else a for a in args)

    def const_values(self, consts):
        return tuple(consts[n] for n in self.const_names)

    def __call__(self, grid, device_index, args, consts, cvals, num_warps, num_stages):
        """cvals: const_values(consts), precomputed by the caller's plan cache."""
        if not self.ok:
            self.fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
            return
        key = (device_index, self._spec(args), cvals, num_warps, num_stages)
        kern = self.cache.get(key)
        rt = triton.knobs.runtime
        if kern is not None and _no_hook(rt.launch_enter_hook) and _no_hook(rt.launch_exit_hook):
            stream = _raw_stream(device_index)
            gx, gy, gz = (*grid, 1, 1)[:3]  # the launcher takes all three grid dimensions
            kern.run(gx, gy, gz, stream, kern.function, kern.packed_metadata,
                     None, None, None, *args, *cvals)
            return
        kern = self.fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        if kern is not None and hasattr(kern, "packed_metadata"):
            self.cache[key] = kern


def _no_hook(h) -> bool:
    # Triton 3.6 keeps launch hooks in an (empty) HookChain, not None.
    return h is None or getattr(h, "calls", None) == []


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


if HAS_TRITON:
    _launch_w8a16 = _FastLaunch(_w8a16_kernel)
    _launch_dequant = _FastLaunch(_dequant_kernel)

_PLANS: dict = {}


def _plan(M: int, N: int, K: int, gran: int, B: int, cfg: Optional[KernelConfig], device: torch.device,
          has_bias: bool, e5m2: bool, asm: Optional[bool]):
    """Everything about a launch that depends only on the problem, cached:
    (config, tiles, split_k, k_per_split, constexpr dict, constexpr values)."""
    key = (M, N, K, gran, B, cfg, device, has_bias, e5m2, asm)
    plan = _PLANS.get(key)
    if plan is None:
        c = cfg if cfg is not None else _pick_config(M, N, K)
        if c.method == "dequant":
            plan = (c, 0, 1, 0, None, None)
        else:
            BK = c.BK
            if gran == 2:
                # A K tile must lie inside one scale block: BK | B.
                while BK > 16 and B % BK:
                    BK //= 2
                if B % BK:
                    raise ValueError(f"block_size {B} needs a power-of-two factor >= 16")
            tiles = -(-M // c.BM) * -(-N // c.BN)
            split_k, k_per = _split_plan(tiles, K, BK, _num_sms(device), c.split)
            consts = dict(
                SCALE_MODE=gran, SBLOCK=B if gran == 2 else 1,
                BSCALE_ACC=(gran == 2 and c.BM <= 64),
                HAS_BIAS=has_bias, FMT_E5M2=e5m2,
                USE_ASM=_asm_flag(device, c.asm if asm is None else asm),
                SWAP=c.swap, SPLIT=split_k > 1, INTERP=_INTERPRET,
                BM=c.BM, BN=c.BN, BK=BK, GROUP_M=c.group_m,
            )
            plan = (c, tiles, split_k, k_per, consts, _launch_w8a16.const_values(consts))
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def w8a16_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                 layout: "FP8Layout", bias: Optional[torch.Tensor] = None, *,
                 config: Optional[KernelConfig] = None,
                 _asm: Optional[bool] = None) -> torch.Tensor:
    """y = F.linear(x, dequant(qdata, scale), bias) with FP8 weights decoded in registers.

    Args:
        x: (..., K) bfloat16 or float16 CUDA tensor, any strides.
        qdata: (N, K) float8_e4m3fn / float8_e5m2 (made contiguous if not).
        scale: float32 of ``layout.scale_shape((N, K))``: () / (N,) /
            (ceil(N/B), ceil(K/B)) for "tensor" / "channel" / "block".
        layout: the weight's FP8Layout (channel axis 0). For "block", its
            block_size B sets the K tile (which shrinks to a divisor of B, so B
            needs a power-of-two factor >= 16; 64 and 128 are typical).
        bias: optional (N,) tensor (any float dtype), added in fp32.
        config: override the KernelConfig chosen from (T, N, K) (tests, tuning).
        _asm: force the inline-PTX fp8 decode on/off (benchmarking only).

    Returns:
        (..., N) tensor in x.dtype.  fp32 accumulation; deterministic.
    """
    _require_triton()
    gran = layout.granularity.kernel_code
    if qdata.dim() != 2:
        raise ValueError("qdata must be 2-D (N, K)")
    N, K = qdata.shape
    if x.shape[-1] != K:
        raise ValueError(f"x last dim {x.shape[-1]} != K={K}")
    if x.dtype not in _ACT_DTYPES or qdata.dtype not in _FP8_DTYPES:
        raise TypeError(f"unsupported dtypes x={x.dtype} qdata={qdata.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dev = x.device
    if M == 0 or N == 0 or K == 0:
        y = torch.zeros((M, N), dtype=x.dtype, device=dev)
        if bias is not None and M:
            y += bias.to(y.dtype)
        return y.reshape(*lead, N)
    if not qdata.is_contiguous():
        qdata = qdata.contiguous()
    B = layout.block_size
    scale = _check_scale(scale, layout, N, K, dev)
    cfg, tiles, split_k, k_per, consts, cvals = _plan(
        M, N, K, gran, B, config, dev, bias is not None, qdata.dtype == torch.float8_e5m2, _asm)
    if consts is None:
        # Compute-bound T: one pass of the dequantize kernel (~90% of HBM
        # bandwidth) then cuBLAS, which beats the fused kernel there.
        wd = dequantize(qdata, scale, layout, x.dtype)
        b = bias.to(x.dtype) if bias is not None else None
        return F.linear(x2, wd, b).reshape(*lead, N)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    if split_k > 1:
        ws, cnt = _workspace(dev, split_k * tiles * cfg.BM * cfg.BN, tiles)
    else:
        ws = cnt = y  # unused (SPLIT is a constexpr False)
    args = (x2, qdata.view(torch.uint8), scale, y if bias is None else bias, y, ws, cnt,
            M, N, K, x2.stride(0), x2.stride(1), N, scale.stride(0) if gran == 2 else 0,
            k_per, split_k)
    _launch_w8a16((tiles, split_k, 1), dev.index or 0, args, consts, cvals, cfg.warps, cfg.stages)
    return y.reshape(*lead, N)


def dequantize(qdata2d: torch.Tensor, scale: torch.Tensor, layout: "FP8Layout",
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Single-pass fp8 -> out_dtype with the scale applied.

    Args:
        qdata2d: (R, C) float8_e4m3fn / float8_e5m2 CUDA tensor (made contiguous).
        scale: float32; () / (R,) / (ceil(R/B), ceil(C/B)).
        layout: the weight's FP8Layout (granularity and B = block_size).
        out_dtype: bfloat16, float16 or float32.

    Returns:
        (R, C) tensor, bit-identical to ``(q.float() * scale_b).to(out_dtype)``
        (NaN codes stay NaN).
    """
    _require_triton()
    gran = layout.granularity.kernel_code
    if qdata2d.dim() != 2 or qdata2d.dtype not in _FP8_DTYPES:
        raise ValueError("qdata2d must be a 2-D float8 tensor")
    R, C = qdata2d.shape
    q = qdata2d.contiguous()
    B = layout.block_size
    scale = _check_scale(scale, layout, R, C, q.device)
    out = torch.empty((R, C), dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    BR, BC = 16, 256  # 4K elements per program: 16-byte fp8 loads, ~2 waves+ on big weights
    grid = (-(-R // BR), -(-C // BC))
    consts = dict(SCALE_MODE=gran, SBLOCK=B if gran == 2 else 1, FMT_E5M2=q.dtype == torch.float8_e5m2, BR=BR, BC=BC)
    args = (q.view(torch.uint8), scale, out, R, C, scale.stride(0) if gran == 2 else 0)
    # every conv layer and every compute-bound linear comes through here: skip Triton's per-call binding
    _launch_dequant(grid, q.device.index or 0, args, consts, _launch_dequant.const_values(consts), 4, 3)
    return out


def embedding(indices: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
              layout: "FP8Layout", out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Gather rows of an FP8 table and dequantize only those rows.

    Args:
        indices: integer CUDA tensor of any shape; values must lie in
            [0, num_embeddings) (not checked on device).
        qdata: (num_embeddings, D) float8 table; "channel" scale is per row.
        scale: float32; () / (num_embeddings,) / (ceil(E/B), ceil(D/B)).
        layout: as for :func:`dequantize`.
        out_dtype: output dtype.

    Returns:
        indices.shape + (D,) tensor, equal to
        ``dequantize(qdata, ...)[indices]`` bit for bit.
    """
    _require_triton()
    gran = layout.granularity.kernel_code
    E, D = qdata.shape
    q = qdata.contiguous()
    B = layout.block_size
    scale = _check_scale(scale, layout, E, D, q.device)
    idx = indices.reshape(-1)
    if not idx.is_contiguous():
        idx = idx.contiguous()
    n = idx.numel()
    out = torch.empty((n, D), dtype=out_dtype, device=q.device)
    if n and D:
        ROWS = 4
        BD = min(1024, max(16, triton.next_power_of_2(D)))
        _embedding_kernel[(-(-n // ROWS),)](
            idx, q.view(torch.uint8), scale, out, n, D, scale.stride(0) if gran == 2 else 0,
            SCALE_MODE=gran, SBLOCK=B if gran == 2 else 1,
            FMT_E5M2=q.dtype == torch.float8_e5m2, ROWS=ROWS, BD=BD, num_warps=4,
        )
    return out.reshape(*indices.shape, D)


def _decode_fp8(q: torch.Tensor, out_dtype: torch.dtype, use_asm: Optional[bool] = None) -> torch.Tensor:
    """Test helper: the in-register decode used by the matmul, elementwise."""
    _require_triton()
    use = _use_asm(q.device) if use_asm is None else use_asm
    flat = q.contiguous().view(torch.uint8).reshape(-1)
    out = torch.empty(flat.shape, dtype=out_dtype, device=q.device)
    BLOCK = 1024
    _decode_kernel[(-(-flat.numel() // BLOCK),)](
        flat, out, flat.numel(), FMT_E5M2=q.dtype == torch.float8_e5m2,
        OUT_BF16=out_dtype == torch.bfloat16, USE_ASM=use, BLOCK=BLOCK)
    return out.reshape(q.shape)


# --------------------------------------------------------------------------- #
# Per-token activation quantization for the FP8-compute path (torch._scaled_mm)
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row: the row is read once for its amax and once (from L1/L2) to quantize it
        row = tl.program_id(0)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.max(amax, axis=0)
        # an all-zero row gets scale 1 so its zeros stay exact (the library's convention)
        # times the reciprocal, as torch does for a tensor divided by a Python number on the GPU
        scale = tl.where(m > 0, m * (1.0 / FP8_MAX), 1.0)
        tl.store(s_ptr + row, scale)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            # clamp: rounding of v / scale can land a hair above the format's max
            # div_rn: Triton's `/` on float32 is approximate; torch's tensor / tensor rounds correctly
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows(x2d: torch.Tensor, storage_dtype: torch.dtype = torch.float8_e4m3fn):
    """Per-row (per-token) FP8 quantization in one kernel: ``(q, scale)`` with ``x ≈ q * scale``.

    Args:
        x2d: (T, K) bf16/fp16/fp32 CUDA tensor whose last dim is contiguous.
        storage_dtype: the FP8 format of ``q``.

    Returns:
        ``q`` (T, K) contiguous in ``storage_dtype`` and ``scale`` (T, 1) float32
        (``amax / finfo.max`` per row; 1 for an all-zero row).
    """
    _require_triton()
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    T, K = x2d.shape
    q = torch.empty((T, K), dtype=storage_dtype, device=x2d.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x2d.device)
    if T:
        block = min(4096, triton.next_power_of_2(max(K, 16)))
        _quantize_rows_kernel[(T,)](
            x2d, q, scale, K, x2d.stride(0), FP8_MAX=float(torch.finfo(storage_dtype).max), BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return q, scale
