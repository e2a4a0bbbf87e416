"""FSDP2 shards held as FP8: each rank quantizes its own shard, and the all-gather carries FP8 codes and scales.

``torch.distributed.fsdp.fully_shard`` keeps each parameter as a DTensor whose local tensor is this rank's
shard (``Shard(0)``), and swaps the parameters in ``module._parameters`` itself around every forward: the
all-gathered parameter before, the sharded one after. A stand-in put in the module's slot would be
overwritten by the first forward, so fp8ctx holds FSDP2 weights one level down, in FSDP's own record of the
parameter (its ``FSDPParam``):

- the sharded parameter becomes a DTensor (same mesh, placements, shape and dtype) over an :class:`FP8Shard`,
  this rank's FP8 codes and scales;
- ``FP8Shard`` implements FSDP2's all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``):
  the all-gather sends the FP8 codes (one byte per value) and the per-row or per-tile scales, and the
  gathered parameter is an :class:`~fp8ctx.FP8Tensor`, so each layer dequantizes only while it runs;
- FSDP's cached all-gather buffers and unsharded parameter are put aside for the block (they have the dense
  sizes), and every change is recorded in the :class:`~fp8ctx._swap.Journal`, so exit puts back the same
  DTensor parameter objects, the same buffers, and (with ``originals="cpu"`` on an accelerator) the same
  shard bytes.

Scales are the ones the unsharded weight would get: per-channel and per-tile scales of whole rows are local;
the per-tensor scale comes from the largest magnitude over all ranks (one all-reduce per weight, which also
makes every rank refuse a NaN/Inf weight together instead of leaving the others waiting in a collective).

What cannot work is refused before anything changes, naming the limitation: parameters that are not yet
sharded (before FSDP2's lazy initialization, or left unsharded after a forward), uneven shards, shards
along another dim, FSDP2's CPU offload policy, per-channel scales across the sharded dim (ConvTranspose),
block tiles that straddle two ranks, DTensors that FSDP2 does not manage, and ``store=`` (each rank
quantizes its own shard).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import _numerics
from ._errors import FP8Error
from ._layout import FP8Layout, Granularity
from ._swap import ABSENT, Journal, find_slots
from ._tensor import FP8Meta, FP8Tensor

__all__ = ["FP8Shard", "check_sharded", "hold_shard", "is_dtensor", "quantize_shard", "reshard_on_exit"]


# the fields of FSDP's per-parameter record that fp8ctx reads or sets (torch 2.13's FSDPParam)
_RECORD_FIELDS = ("sharded_param", "all_gather_outputs", "_sharded_param_data", "fsdp_placement", "offload_to_cpu",
                  "_orig_size", "shard_mesh", "_module_info")


class FP8Shard(FP8Tensor):
    """One rank's FP8 shard of an FSDP2 parameter: an :class:`~fp8ctx.FP8Tensor` that FSDP2 all-gathers as FP8.

    Shards are whole rows (``Shard(0)``, even sizes), so the gathered codes are the unsharded weight's codes,
    and per-row or per-tile scales gather the same way; a per-tensor scale is the same on every rank and
    travels as metadata.
    """

    def _scales_are_sharded(self) -> bool:
        return self.fp8_layout.granularity is not Granularity.TENSOR

    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: nn.Module, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """What FSDP2 all-gathers for this shard: the FP8 codes, and the scales when they are per row/tile."""
        if self._scales_are_sharded():
            return (self.qdata, self.scale), None
        return (self.qdata,), self.scale

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[FP8Tensor, tuple[torch.Tensor, ...]] | None:
        """The unsharded weight as an FP8Tensor over the gathered codes (and scales).

        FSDP2 frees the gathered buffers after each forward and gathers into the same ones before the next:
        the FP8Tensor made the first time (``out``) already views them, so nothing is left to do then.
        """
        if out is not None:
            return None
        codes = all_gather_outputs[0]
        scale = all_gather_outputs[1] if self._scales_are_sharded() else metadata
        meta = self._meta if param_dtype == self.compute_dtype else _with_dtype(self._meta, param_dtype)
        return FP8Tensor(codes, scale, meta), tuple(all_gather_outputs)


def _with_dtype(meta: FP8Meta, dtype: torch.dtype) -> FP8Meta:
    # FSDP2 mixed precision (param_dtype): compute in it, after rounding to the weight's own dtype, as the cast
    # of the dense weight would
    return dataclasses.replace(meta, compute_dtype=dtype)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (without importing torch.distributed when nothing uses it)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _fsdp_records(module: nn.Module) -> tuple[dict[int, Any], list[nn.Module]]:
    """FSDP's record of each sharded parameter under ``module`` (by the parameter's id), and the modules."""
    from torch.distributed.fsdp import FSDPModule

    records: dict[int, Any] = {}
    owners = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    for owner in owners:
        for group in _groups(owner):
            for record in group.fsdp_params:
                records[id(record.sharded_param)] = record
    return records, owners


def _groups(owner: nn.Module) -> list[Any]:
    """The parameter groups of one fully_shard-ed module (torch >= 2.11 may keep several)."""
    state = owner._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older FSDP2: at most one
        groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
    return list(groups)


def check_sharded(
    module: nn.Module, targets: Sequence[Any], layouts: Sequence[FP8Layout], store_given: bool
) -> dict[int, Any]:
    """FSDP's records of the DTensor targets of ``module``, checked to be holdable as FP8 shards.

    Args:
        module: the module passed to fp8ctx.
        targets: its planned targets (``Target``), each with a ``param`` and a ``name``.
        layouts: the layout each target will be stored in.
        store_given: whether the caller passed ``store=``.

    Returns:
        ``id(param) -> FSDPParam`` for the targets that are FSDP2 shards (empty when there are none).

    Raises:
        FP8Error: a DTensor target that cannot be held (names the weight, the limitation and the way out).
    """
    sharded = [(target, layout) for target, layout in zip(targets, layouts) if is_dtensor(target.param)]
    if not sharded:
        return {}
    records, owners = _fsdp_records(module)
    for owner in owners:
        where = f"{type(owner).__name__} {_name_in(module, owner)!r}"
        if owner._get_fsdp_state()._is_root is None:
            raise FP8Error(
                f"{where} is sharded with fully_shard but FSDP2 has not initialized it yet (it does so lazily, at "
                "the first forward); run one forward before fp8_weights(model)"
            )
        if any(not group.is_sharded for group in _groups(owner)):
            raise FP8Error(
                f"{where} is sharded with fully_shard but its parameters are all-gathered now (FSDP2 leaves the "
                "root unsharded after a forward, and any module with reshard_after_forward=False); call "
                "model.reshard() before fp8_weights(model)"
            )
    found: dict[int, Any] = {}
    for target, layout in sharded:
        record = records.get(id(target.param))
        if record is None:
            raise FP8Error(
                f"weight {target.name!r} is a DTensor that no fully_shard module passed to fp8ctx manages; fp8ctx "
                "holds FSDP2 shards (pass the fully_shard-ed module or its parent) and no other DTensor layouts"
            )
        _check_record(target.name, record, layout, store_given)
        found[id(target.param)] = record
    return found


def _check_record(name: str, record: Any, layout: FP8Layout, store_given: bool) -> None:
    where = f"FSDP2-sharded weight {name!r}"
    if store_given:
        raise FP8Error(
            f"{where}: store= does not apply to FSDP2 shards (each rank quantizes its own shard when the block "
            "is entered); call fp8_weights(model) without store="
        )
    missing = [field for field in _RECORD_FIELDS if not hasattr(record, field)]
    if missing:
        raise FP8Error(
            f"{where}: fp8ctx holds FSDP2 shards through FSDP's per-parameter record as torch 2.13 keeps it; this "
            f"torch {torch.__version__}'s lacks {missing}. Leave the sharded layers out with exclude="
        )
    if record.fsdp_placement.dim != 0:
        raise FP8Error(f"{where} is sharded along dim {record.fsdp_placement.dim}; fp8ctx holds Shard(0) shards only")
    if record.offload_to_cpu:
        raise FP8Error(
            f"{where} uses FSDP2's CPUOffloadPolicy, which copies the shard to the device before each all-gather; "
            "fp8ctx does not hold offloaded shards. Shard without offload_policy, or leave the layer out with exclude="
        )
    rows, world = record._orig_size[0], record.shard_mesh.size()
    if rows % world:
        raise FP8Error(
            f"{where} has {rows} rows over {world} ranks: FSDP2 pads uneven shards, and its all-gather extension "
            "then needs every input at the padded size, which FP8 scales are not. Leave the layer out with exclude="
        )
    if layout.granularity is Granularity.CHANNEL and layout.channel_axis != 0:
        raise FP8Error(
            f"{where}: per-channel scales on dim {layout.channel_axis} span the sharded dim 0; use "
            "granularity='tensor', or leave the layer out with exclude="
        )
    if layout.granularity is Granularity.BLOCK and (rows // world) % layout.block_size and world > 1:
        raise FP8Error(
            f"{where}: each rank holds {rows // world} rows, not a multiple of block_size {layout.block_size}, so "
            "tiles would straddle two ranks; pick a block_size that divides it, or granularity='channel'"
        )


def _name_in(root: nn.Module, module: nn.Module) -> str:
    return next((name for name, sub in root.named_modules() if sub is module), type(module).__name__) or "<root>"


@torch.no_grad()
def quantize_shard(record: Any, param: torch.Tensor, layout: FP8Layout, name: str) -> FP8Shard:
    """This rank's shard of ``param`` quantized with the scales of the unsharded weight.

    Collective: every rank of the shard group must call it for the same weight in the same order (entering
    ``fp8_weights`` on every rank does).

    Raises:
        FP8Error: the weight holds NaN or Inf on any rank (raised on every rank).
    """
    import torch.distributed as dist

    local = param.to_local()
    group = record.shard_mesh.get_group()
    if layout.granularity is Granularity.TENSOR:
        amax = local.abs().amax().float() if local.numel() else torch.zeros((), device=local.device)
        scale = None
    else:
        scale = _numerics.compute_scale(local, layout)
        amax = torch.zeros((), device=local.device)
    finite = bool(torch.isfinite(amax)) and (scale is None or bool(torch.isfinite(scale).all()))
    # one all-reduce: the largest magnitude over the ranks, and whether any rank saw NaN/Inf
    summary = torch.stack([torch.nan_to_num(amax, nan=0.0, posinf=0.0), torch.tensor(float(not finite), device=local.device)])
    dist.all_reduce(summary, op=dist.ReduceOp.MAX, group=group)
    if summary[1] > 0:
        raise FP8Error(
            f"weight {name!r} contains NaN or Inf on some rank; FP8 cannot represent it. Fix the weight, or leave "
            "its layer out with exclude="
        )
    if scale is None:
        scale = _numerics.scale_from_amax(summary[0], layout.fp8_max)
    data = _numerics.quantize(local, scale, layout)
    shard = FP8Shard(data, scale, FP8Meta(layout, local.dtype, name))
    return torch.nn.Parameter(shard, requires_grad=False)  # type: ignore[return-value]


def hold_shard(journal: Journal, root: nn.Module, record: Any, shard: FP8Shard, compute: str, offload: bool) -> None:
    """Put ``shard`` in FSDP's record of its parameter and in every module slot that holds the parameter.

    FSDP's all-gather buffers and unsharded parameter (dense-sized) are put aside; with ``offload``, the
    original shard's bytes go to host memory (same storage, freed on the device).
    """
    from torch.distributed.fsdp._fully_shard._fsdp_param import ExtensionsData
    from torch.distributed.tensor import DTensor

    original = record.sharded_param
    if compute != shard.compute:
        shard = FP8Shard(shard.qdata, shard.scale, dataclasses.replace(shard._meta, compute=compute))
    stand_in = nn.Parameter(DTensor(shard, original._spec, requires_grad=False), requires_grad=False)
    journal.set_attributes(
        record,
        {
            "sharded_param": stand_in,
            "all_gather_outputs": [],
            "_unsharded_inner_tensors": [],
            "_unsharded_param": ABSENT,
            "_extensions_data": ExtensionsData(),
        },
    )
    for owner, attribute in find_slots(root, [original])[id(original)]:
        journal.swap(owner, attribute, stand_in)
    if offload:
        journal.offload_storage(record._sharded_param_data)


def reshard_on_exit(journal: Journal, roots: Iterable[nn.Module]) -> None:
    """On undo, first reshard every FSDP2 module under ``roots`` that a block left all-gathered (an error in
    the middle of a forward skips FSDP's post-forward), so the sharded parameters are in the slots again."""
    from torch.distributed.fsdp import FSDPModule

    owners = [sub for root in roots for sub in root.modules() if isinstance(sub, FSDPModule)]

    def reshard() -> None:
        for owner in owners:
            if any(not group.is_sharded for group in _groups(owner)):
                owner.reshard()

    journal.on_undo(reshard)
