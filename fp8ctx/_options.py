"""The public functions' options: a config plus keywords (``None``: not given), all checked when called.

Nothing here looks at a model's weights; it turns what the caller passed into one :class:`FP8Config`, the
holding options, and the stores to reuse, or raises :class:`FP8Error` before anything has run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ._config import FP8Config, check_compute
from ._errors import FP8Error
from ._tensor import FP8Tensor

__all__ = [
    "ORIGINALS",
    "Options",
    "check_components",
    "check_originals",
    "check_progress_bar",
    "is_store_dict",
    "resolve",
    "stores_for",
]

ORIGINALS = ("cpu", "keep")

# the fields an FP8 entry records; an option naming one of them can contradict a store
_SCHEME_FIELDS = ("storage_dtype", "granularity", "block_size")
# the fields that choose which weights are quantized; a store already made that choice
_SELECTION_FIELDS = ("layers", "exclude")


@dataclasses.dataclass(frozen=True)
class Options:
    """A resolved config, the fields given as keywords, and whether a whole config was passed."""

    config: FP8Config
    keywords: frozenset[str]
    config_passed: bool

    def stated(self, field: str) -> bool:
        """Whether the caller stated ``field``: a passed config states every field, keywords their own."""
        return self.config_passed or field in self.keywords


def resolve(config: FP8Config | None, **keywords: Any) -> Options:
    """``config`` (default ``FP8Config()``) with every keyword that is not ``None`` replacing its field.

    A passed config states all its fields; without one, only the keywords given are stated.

    Raises:
        FP8Error: ``config`` is not an :class:`FP8Config`, or a field has a bad value (names it).
    """
    if config is not None and not isinstance(config, FP8Config):
        raise FP8Error(f"config must be an fp8ctx.FP8Config, got {type(config).__name__}")
    changes = {name: value for name, value in keywords.items() if value is not None}
    # a plan (fp8ctx.plan) given as the exclusion brings the layer types it chose among, unless layers= is given
    planned = getattr(changes.get("exclude"), "config", None)
    if isinstance(planned, FP8Config) and "layers" not in changes:
        changes["layers"] = planned.layers
    base = config if config is not None else FP8Config()
    resolved = base.replace(**changes) if changes else base
    return Options(resolved, frozenset(changes), config is not None)


def check_originals(originals: object) -> str:
    """``originals`` itself, or ``"cpu"`` for ``None``.

    Raises:
        FP8Error: anything but ``"cpu"`` / ``"keep"``.
    """
    if originals is None:
        return "cpu"
    if originals not in ORIGINALS:
        raise FP8Error(f"originals must be one of {ORIGINALS}, got {originals!r}")
    return str(originals)


def check_progress_bar(progress_bar: object) -> bool | None:
    """``progress_bar`` itself: True, False, or ``None`` (a bar only for many layers).

    Raises:
        FP8Error: anything else.
    """
    if progress_bar is not None and not isinstance(progress_bar, bool):
        raise FP8Error(f"progress_bar must be True, False or None, got {progress_bar!r}")
    return progress_bar


def check_components(components: object) -> list[str] | None:
    """``components`` as a list of names (``None``: not given); one string is one name (``"vae"``), not its
    letters.

    Raises:
        FP8Error: anything but a string or a list/tuple of strings.
    """
    if components is None:
        return None
    if isinstance(components, str):
        return [components]
    if not isinstance(components, (list, tuple)) or not all(isinstance(name, str) for name in components):
        raise FP8Error(
            f"components must be a component name or a list of them, e.g. ['vae', 'text_encoder'], got {components!r}"
        )
    return list(components)


def stores_for(store: Any, names: Sequence[str] | None, count: int, options: Options) -> list[Any]:
    """The store given for each of ``count`` modules (``None`` each when none was given), checked against
    the options.

    ``store`` is one store (one module), a list or tuple (one per module, in order), or a dict by component
    name (a pipeline: what ``fp8_weights(pipe)`` returns; ``names`` are the pipeline's components).

    Raises:
        FP8Error: a wrong count or type; a dict whose names are not the components; ``layers`` / ``exclude``
            given as keywords (the store already chose its weights); a stated storage dtype, granularity or
            block size that an entry does not hold (even if it is the default); a compute mode the entries
            cannot run.
    """
    if store is None:
        return [None] * count
    if is_store_dict(store):
        if names is None:
            raise FP8Error("a dict of stores goes with a pipeline argument, e.g. fp8_weights(pipe, store=stores)")
        if sorted(store) != sorted(names):
            raise FP8Error(f"store= has stores for {sorted(store)} but the components held are {sorted(names)}")
        stores = [store[name] for name in names]
    elif isinstance(store, (list, tuple)):
        stores = list(store)
    else:
        stores = [store]
    if len(stores) != count or not all(isinstance(s, Mapping) for s in stores):
        raise FP8Error(f"store= takes one FP8Store per module ({count} here), got {store!r}")
    # only keywords count here: a passed config states layers and exclude too, but a store cannot record them
    selection = [field for field in _SELECTION_FIELDS if field in options.keywords]
    if selection:
        raise FP8Error(
            f"{' and '.join(s + '=' for s in selection)} choose weights to quantize; with store= the store already "
            "decides. Leave them out, or build a new store with FP8Store.from_module(module, ...)"
        )
    for given in stores:
        _check_agrees(given, options)
    return stores


def is_store_dict(store: Any) -> bool:
    """Whether ``store`` is a dict of stores by component name (rather than one store: a mapping of entries)."""
    return isinstance(store, Mapping) and bool(store) and all(isinstance(v, Mapping) for v in store.values())


def _check_agrees(store: Mapping[str, Any], options: Options) -> None:
    config = options.config
    for name, entry in store.items():
        if not isinstance(entry, FP8Tensor):
            raise FP8Error(f"store entry {name!r} must be an FP8Tensor, got {type(entry).__name__}")
        layout = entry.fp8_layout
        held = {"storage_dtype": entry.storage_dtype, "granularity": layout.granularity, "block_size": layout.block_size}
        for option in _SCHEME_FIELDS:
            asked = getattr(config, option)
            if options.stated(option) and asked != held[option]:
                raise FP8Error(
                    f"{option}={_spell(asked)} contradicts the given store, whose entry {name!r} holds "
                    f"{option}={_spell(held[option])}; leave {option}= out or build a new store"
                )
        check_compute(config.compute, layout)


def _spell(value: Any) -> str:
    return repr(str(value)) if not isinstance(value, int) else repr(value)
