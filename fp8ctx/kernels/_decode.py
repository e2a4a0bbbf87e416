"""FP8 codes (as uint8) to exact bf16/fp16 inside Triton kernels.

On sm_90 the stock Triton e4m3 -> bf16 conversion goes through two scalar ``cvt`` per element pair on a
low-throughput pipe; instead the exponent/mantissa bits are moved into bf16 position with integer ops and the
exponent re-biased with one packed bf16x2 multiply by 2^120 (exact, subnormals included). The stock
conversion stays as the fallback (``FP8CTX_TRITON_NO_ASM=1``, the interpreter, sm_89).
"""

from __future__ import annotations

from ._capability import HAS_TRITON, tl, triton

__all__ = ["fp8_decode"]

if HAS_TRITON:

    @triton.jit
    def _e4m3_to_bf16_asm(q):
        # Per 4 codes: spread bytes into the high byte of 16-bit lanes, drop the sign, shift
        # exponent|mantissa right by 4 into bf16 position, restore the sign, then multiply by 2^120
        # (bf16 0x7B80) to re-bias the exponent (7 -> 127). e4m3 subnormals become bf16 subnormals, which
        # the multiply handles exactly. The NaN codes 0x7F/0xFF decode to +-480 (quantizers never emit NaN;
        # dequantize keeps NaN exact).
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
        # an e5m2 code is exactly the high byte of the fp16 of the same value: two byte permutes per 4 codes
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
    def fp8_decode(q, FMT_E5M2: tl.constexpr, OUT_BF16: tl.constexpr, USE_ASM: tl.constexpr):
        """uint8 fp8 codes -> bf16 (OUT_BF16) or fp16, exactly."""
        if USE_ASM and OUT_BF16 and not FMT_E5M2:
            w = _e4m3_to_bf16_asm(q)
        elif USE_ASM and (not OUT_BF16) and FMT_E5M2:
            w = _e5m2_to_f16_asm(q)
        else:
            # stock paths: e4m3 -> f16 is one packed cvt; e5m2 -> bf16 already uses a bit trick inside Triton
            # (it maps +-inf to +-65536; quantizers never emit inf, and dequantize keeps inf exact)
            if FMT_E5M2:
                f = q.to(tl.float8e5, bitcast=True)
            else:
                f = q.to(tl.float8e4nv, bitcast=True)
            if OUT_BF16:
                w = f.to(tl.bfloat16)
            else:
                w = f.to(tl.float16)
        return w

else:  # pragma: no cover - without Triton nothing launches these
    fp8_decode = None
