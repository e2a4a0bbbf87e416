"""Dedicated paths for the weights fp8ctx holds: Linear, Conv*, ConvTranspose*, Embedding, transformers' Conv1D
(``torch.addmm``), and mixture-of-experts tensors (picking an expert, gathering experts, grouped matmuls).

Each handler is registered in :data:`FUNCTIONS` for the torch functions it replaces (in :data:`OPERATORS`, by
qualified name, for a library's own ``torch.ops`` operators), with the argument that holds the weight;
``FP8Tensor.__torch_function__`` runs it when that argument is the call's only FP8 weight (otherwise the call
runs as torch would, on dequantized values). Layering: this module knows FP8 weights only
through their public attributes, so ``_tensor`` imports it, not the other way round.

Memory bound: inside a forward, at most one weight's dense copy exists at a time. A handler dequantizes
its weight (or not at all, on the fused GPU path), runs the op, and drops the copy before returning.
When autograd records the op (an input requires grad), the dense copy is not kept for backward: a
saved-tensor hook stores the FP8 weight instead and dequantizes it again when backward needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from . import kernels
from ._errors import FP8Error

if TYPE_CHECKING:
    from ._tensor import FP8Tensor

__all__ = ["FUNCTIONS", "LIBRARY_OPERATORS", "OPERATORS", "Handler", "implements", "implements_operator", "operator_handler"]


@dataclasses.dataclass(frozen=True)
class Handler:
    """A dedicated path for one torch function, taken when its weight argument is the call's only FP8 weight."""

    run: Callable[..., Any]
    weight_at: int  # the weight's position ...
    weight_keyword: str  # ... or keyword in the torch function's signature
    when: Callable[..., bool] | None = None  # a further condition on the call's arguments

    def applies(self, fp8_type: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether ``run`` takes this call: the weight is an ``fp8_type``, no other argument is one, and ``when``
        (if any) accepts the arguments."""
        position = self.weight_at
        weight = args[position] if len(args) > position else kwargs.get(self.weight_keyword)
        if not isinstance(weight, fp8_type):
            return False
        if sum(isinstance(value, fp8_type) for value in (*args, *kwargs.values())) != 1:
            return False
        return self.when is None or bool(self.when(*args, **kwargs))


# torch function -> its dedicated FP8 path
FUNCTIONS: dict[Callable[..., Any], Handler] = {}


def implements(
    *functions: Callable[..., Any],
    weight_at: int = 1,
    weight_keyword: str = "weight",
    when: Callable[..., bool] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler that runs instead of each of ``functions`` when its weight argument is FP8 (and
    ``when``, given the call's arguments, says yes)."""

    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        for function in functions:
            FUNCTIONS[function] = Handler(run, weight_at, weight_keyword, when)
        return run

    return register


# a library's own operator (``torch.ops.<namespace>.<name>``), by qualified name -> its dedicated FP8 path: the
# operator object exists only once its library has registered it, which fp8ctx does not import
OPERATORS: dict[str, Handler] = {}
LIBRARY_OPERATORS = (torch._ops.OpOverloadPacket, torch._ops.OpOverload)


def implements_operator(
    *names: str,
    weight_at: int = 1,
    weight_keyword: str = "weight",
    when: Callable[..., bool] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Like :func:`implements`, for library operators named ``"namespace::name"`` (any of their overloads)."""

    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            OPERATORS[name] = Handler(run, weight_at, weight_keyword, when)
        return run

    return register


def operator_handler(operator: torch._ops.OpOverloadPacket | torch._ops.OpOverload) -> Handler | None:
    """The handler registered for a library operator (called as a packet or as one of its overloads), if any."""
    packet = getattr(operator, "overloadpacket", operator)
    return OPERATORS.get(packet._qualified_op_name)


def _records_grad(*tensors: Any) -> bool:
    """Whether autograd will save this op's inputs (and so our hook must keep the dense copy out)."""
    # cheapest first: inference (no_grad / inference_mode) answers with one C call on every layer call
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        # under torch.compile, AOTAutograd decides what backward saves; fake tensors have no storage to match
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


@dataclasses.dataclass(frozen=True)
class _DenseView:
    """A saved view of a dense weight copy, to be rebuilt from FP8 in backward."""

    weight: FP8Tensor
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def rebuild(self) -> torch.Tensor:
        return self.weight.dequantize().as_strided(self.size, self.stride, self.offset)


@contextlib.contextmanager
def _saved_as_fp8(weight: FP8Tensor, dense: torch.Tensor) -> Iterator[None]:
    """While active, autograd saves views of ``dense`` as references to ``weight`` instead."""
    # match by storage address, and hold no reference to `dense` itself: autograd keeps these hooks alive
    try:
        address, dtype, device = dense.untyped_storage().data_ptr(), dense.dtype, dense.device
    except RuntimeError:
        # a tracer's fake tensor has no storage (torch.compile before 2.12 runs handlers on them while
        # is_compiling() is False); the compiler decides what backward saves anyway
        yield
        return

    def pack(saved: torch.Tensor) -> Any:
        if (
            type(saved) is torch.Tensor
            and saved.dtype == dtype
            and saved.device == device
            and saved.untyped_storage().data_ptr() == address
        ):
            return _DenseView(weight, saved.size(), saved.stride(), saved.storage_offset())
        return saved

    def unpack(packed: Any) -> torch.Tensor:
        return packed.rebuild() if isinstance(packed, _DenseView) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _with_dense_weight(func: Callable[..., Any], input: Any, weight: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    """Dequantize ``weight`` once, run ``func`` on it, let the copy go when the call returns."""
    dense = weight.dequantize()
    if _records_grad(input, *args, *kwargs.values()):
        with _saved_as_fp8(weight, dense):
            return func(input, dense, *args, **kwargs)
    return func(input, dense, *args, **kwargs)


def _channel_first(input: Any, weight: Any, bias: Any = None) -> bool:
    # the Linear path reads scales along dim 0; a weight grouped along dim 1 takes the dense route instead
    return weight.dim() == 2 and weight.fp8_layout.channel_axis == 0 and weight.fp8_layout.batch_dims == 0


@implements(F.linear, when=_channel_first)
def _linear(input: torch.Tensor, weight: FP8Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.value_dtype != weight.compute_dtype or _records_grad(input, bias):
        return _with_dense_weight(F.linear, input, weight, bias)
    if weight.compute == "fp8":
        # FP8 x FP8 GEMMs take the weight column-major: codes seen through .transposed() (a Conv1D or an expert
        # stored (in, out)) are laid out again, one byte per element, for this call
        data = weight.qdata.contiguous()
        return kernels.fp8_linear(input, data, weight.scale, weight.fp8_layout, weight.compute_dtype, bias)
    return kernels.linear(input, weight.qdata, weight.scale, weight.fp8_layout, weight.compute_dtype, bias)


def _convolution(func: Callable[..., Any]) -> Callable[..., Any]:
    def handler(input: torch.Tensor, weight: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
        return _with_dense_weight(func, input, weight, *args, **kwargs)

    return handler


for _conv in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    implements(_conv)(_convolution(_conv))


@implements(F.embedding)
def _embedding(
    input: torch.Tensor,
    weight: FP8Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    if max_norm is not None:
        raise FP8Error(
            f"embedding {weight.param_name!r} has max_norm={max_norm}, which renormalizes the table in place; an "
            "FP8-held table is read-only. Leave this layer out with exclude=."
        )
    if weight.value_dtype != weight.compute_dtype:
        return F.embedding(input, weight.dequantize())
    # padding_idx and scale_grad_by_freq only shape the weight's gradient, which FP8 weights never get
    return kernels.embedding(input, weight.qdata, weight.scale, weight.fp8_layout, weight.compute_dtype)


# -- transformers' Conv1D: a Linear stored (in, out), run as torch.addmm(bias, x, weight) -----------------


def _addmm_plain(input: Any, mat1: Any, mat2: Any, *, beta: Any = 1, alpha: Any = 1, out: Any = None) -> bool:
    return mat2.dim() == 2 and beta == 1 and alpha == 1 and out is None and isinstance(input, torch.Tensor)


@implements(torch.addmm, torch.Tensor.addmm, weight_at=2, weight_keyword="mat2", when=_addmm_plain)
def _addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: FP8Tensor, **_: Any) -> torch.Tensor:
    # x @ W + b is F.linear(x, W.T, b): the (out, in) view of the codes takes the Linear path (fused on GPU)
    if input.dim() != 1:  # a full (rows, out) addend: not a bias
        return F.linear(mat1, mat2.transposed()) + input
    return F.linear(mat1, mat2.transposed(), input)


# -- mixture-of-experts tensors (batched weights: experts x out x in) ------------------------------------


def _batched(weight: Any) -> bool:
    return weight.fp8_layout.batch_dims > 0


def _expert_index(index: Any) -> str | None:
    """``"one"`` for an index picking one expert (an int, a 0-d integer tensor), ``"gather"`` for a 1-D integer
    tensor of experts, None for anything else."""
    if isinstance(index, int) and not isinstance(index, bool):
        return "one"
    if isinstance(index, torch.Tensor) and not index.is_floating_point() and index.dtype != torch.bool:
        return {0: "one", 1: "gather"}.get(index.dim())
    return None


@implements(
    torch.Tensor.__getitem__,
    weight_at=0,
    weight_keyword="self",
    when=lambda weight, index: _batched(weight) and _expert_index(index) is not None,
)
def _pick_experts(weight: FP8Tensor, index: Any) -> Any:
    if _expert_index(index) == "one":
        # the eager loop (``F.linear(x, experts[i])``): the expert stays FP8 until its own layer call
        return weight.matrix(index)
    # batched_mm (``experts[ids]``, one row per routed token): each expert used is dequantized once, into
    # the rows that name it; the result is the gathered dense stack that the unquantized model makes too
    ids = index.reshape(-1)
    out = torch.empty((ids.numel(), *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    for expert in torch.unique(ids).tolist():
        out[ids == expert] = weight.matrix(expert).dequantize()
    return out


def _transposes_matrices(weight: Any, dim0: int, dim1: int) -> bool:
    ndim = weight.dim()
    return _batched(weight) and ndim == weight.fp8_layout.batch_dims + 2 and {dim0 % ndim, dim1 % ndim} == {ndim - 2, ndim - 1}


@implements(torch.Tensor.transpose, torch.transpose, weight_at=0, weight_keyword="input", when=_transposes_matrices)
def _transpose(weight: FP8Tensor, dim0: int, dim1: int) -> FP8Tensor:
    # grouped_mm is given ``experts.transpose(-2, -1)``: a view of the codes, not a dense copy of every expert
    return weight.transposed()


def _grouped_by_offsets(mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> bool:
    return offs is not None and bias is None and mat_a.dim() == 2 and mat_b.dim() == 3 and _batched(mat_b)


# F.grouped_mm (torch >= 2.10) calls torch._grouped_mm; either may be what a subclass sees first
_GROUPED_MM = tuple(f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None)


@implements(*_GROUPED_MM, weight_at=1, weight_keyword="mat_b", when=_grouped_by_offsets)
def _grouped_mm(
    mat_a: torch.Tensor, mat_b: FP8Tensor, offs: torch.Tensor, bias: None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    # rows offs[e-1]:offs[e] of mat_a go through expert e, (K, N); experts without rows are never touched.
    # Expert by expert, each as a Linear of its (N, K) view: at most one expert dense at a time, or none on
    # the fused GPU path. Rows past offs[-1] (expert-parallel sentinels) are zeros.
    out = mat_a.new_zeros((mat_a.shape[0], mat_b.shape[-1]), dtype=out_dtype or mat_a.dtype)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(mat_a[start:end], mat_b.matrix(expert).transposed())
        start = end
    return out


@implements_operator(
    "transformers::grouped_mm_fallback",
    when=lambda input, weight, offs: _grouped_by_offsets(input, weight, offs),
)
def _transformers_grouped_mm(input: torch.Tensor, weight: FP8Tensor, offs: torch.Tensor) -> torch.Tensor:
    # transformers' own grouped matmul, taken where torch has no grouped_mm kernel (torch < 2.9 on a CPU,
    # unaligned CPU tensors, torch.compile with non-bf16 weights): the same per-expert path, not a dense copy of
    # every expert through the operator's generic fall-back
    return _grouped_mm(input, weight, offs)


def _batched_matmul(input: Any, mat2: Any, **kwargs: Any) -> bool:
    return not kwargs and input.dim() == 3 and mat2.dim() == 3 and _batched(mat2) and input.shape[0] == mat2.shape[0]


@implements(torch.bmm, torch.Tensor.bmm, weight_at=1, weight_keyword="mat2", when=_batched_matmul)
def _bmm(input: torch.Tensor, mat2: FP8Tensor) -> torch.Tensor:
    # every expert over its own rows (Llama 4's experts: ``torch.bmm(x.view(experts, -1, in), experts_weight)``):
    # one expert at a time on the Linear path instead of a dense copy of all of them
    out = input.new_empty((*input.shape[:2], mat2.shape[-1]))
    for expert in range(mat2.shape[0]):
        out[expert] = F.linear(input[expert], mat2.matrix(expert).transposed())
    return out
