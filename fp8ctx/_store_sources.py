"""Where a store's entries come from: a module's weights quantized, or a checkpoint read tensor by tensor.

:class:`~fp8ctx.FP8Store` takes these two constructors from :class:`StoreSources`; what a store is and holds is
``_store``'s.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._config import Exclude, FP8Config
from ._devices import check_device
from ._errors import FP8Error
from ._exclude import check_exclude
from ._options import check_progress_bar, resolve
from ._plan import Plan, unquantized_tensors

if TYPE_CHECKING:
    from ._store import FP8Store

__all__ = ["StoreSources"]

logger = logging.getLogger("fp8ctx")


class StoreSources:
    """The constructors of :class:`~fp8ctx.FP8Store` that quantize: from a loaded module, from a checkpoint."""

    @classmethod
    def from_module(
        cls: type[FP8Store],
        module: nn.Module,
        config: FP8Config | None = None,
        *,
        storage_dtype: torch.dtype | str | None = None,
        granularity: str | None = None,
        block_size: int | None = None,
        layers: Any = None,
        exclude: Exclude = None,
        progress_bar: bool | None = None,
        complete: bool = False,
    ) -> FP8Store:
        """Quantize ``module``'s targeted weights into a new store; ``module`` is only read.

        Args:
            module: the model (or a single layer).
            config: an :class:`FP8Config`; the keywords below that are given (not ``None``) replace its
                fields. Its ``compute`` is not recorded: it is chosen where the store is used.
            storage_dtype, granularity, block_size, layers, exclude: as in :class:`FP8Config`.
            progress_bar: show a tqdm bar; default: only for many layers, when tqdm is installed.
            complete: also copy every other parameter and every buffer (persistent or not) as a dense
                tensor, so the store alone runs a meta-device skeleton of the module.

        Returns:
            A new :class:`FP8Store` on the weights' devices.

        Raises:
            FP8Error: a bad option, or a weight that is NaN/Inf, on the meta device or already FP8.
            TypeError: ``module`` is not an ``nn.Module``.
        """
        if not isinstance(complete, bool):
            raise FP8Error(f"complete must be True or False, got {complete!r}")
        options = resolve(
            config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size, layers=layers,
            exclude=exclude,
        )
        check_exclude([module], options.config.exclude)
        plan = Plan.make(module, options.config)
        entries = {target.name: entry for target, entry in plan.entries(check_progress_bar(progress_bar))}
        unquantized = None
        if complete:
            unquantized = {name: tensor.detach().clone() for name, tensor in unquantized_tensors(module, plan.targets)}
            meta = [name for name, tensor in unquantized.items() if tensor.is_meta]
            if meta:
                raise FP8Error(f"{meta[:5]} of {type(module).__name__} are on the meta device: no values to copy")
        logger.info("fp8ctx: quantized %d weights of %s", len(entries), type(module).__name__)
        return cls(entries, unquantized, complete=complete)

    @classmethod
    def from_checkpoint(
        cls: type[FP8Store],
        skeleton: nn.Module,
        path: str | os.PathLike[str],
        config: FP8Config | None = None,
        *,
        storage_dtype: torch.dtype | str | None = None,
        granularity: str | None = None,
        block_size: int | None = None,
        layers: Any = None,
        exclude: Exclude = None,
        progress_bar: bool | None = None,
        strict: bool = True,
        device: torch.device | str = "cpu",
    ) -> FP8Store:
        """A complete store read from a safetensors checkpoint tensor by tensor; no dense model is built.

        The skeleton (typically built on the meta device) names the tensors and their dtypes; its targets are
        chosen by the same rules as :meth:`from_module`. Checkpoint names are mapped to the skeleton's as
        transformers maps them (its key renames, the ``base_model_prefix`` added or stripped) and tied weights
        are read once. Each tensor is read, cast to the skeleton's dtype and quantized (or kept) before the
        next is read: the extra host memory is about the largest tensor, plus the store being built.

        Args:
            skeleton: the model to build the store for; only its names, shapes and dtypes are read.
            path: a ``.safetensors`` file, or a directory with one, or with a sharded checkpoint and its
                ``*.safetensors.index.json`` (as transformers and diffusers write them).
            config, storage_dtype, granularity, block_size, layers, exclude, progress_bar: as in
                :meth:`from_module`.
            strict: refuse checkpoint tensors the skeleton has no place for (``False``: skip them, e.g. the
                vision tower when building the text model's store from a full checkpoint).
            device: where to quantize and keep the store (``"cuda"``: the rows read go to the device and are
                quantized there; the same codes as on the CPU).

        Returns:
            A complete :class:`FP8Store` on ``device``.

        Raises:
            FP8Error: a bad option; a checkpoint that cannot be read; one error listing the skeleton's
                tensors the checkpoint lacks, the tensors of the wrong shape and (``strict``) the tensors
                left over.
        """
        from ._checkpoint import read_checkpoint

        options = resolve(
            config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size, layers=layers,
            exclude=exclude,
        )
        check_exclude([skeleton], options.config.exclude)
        place = check_device(device)
        if not isinstance(strict, bool):
            raise FP8Error(f"strict must be True or False, got {strict!r}")
        entries, unquantized = read_checkpoint(
            skeleton, path, options.config, progress_bar=check_progress_bar(progress_bar), strict=strict, device=place
        )
        return cls(entries, unquantized, complete=True)
