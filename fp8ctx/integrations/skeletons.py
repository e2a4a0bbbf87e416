"""Model sources for the command line: a local directory or a Hugging Face id already in the local cache, and
meta-device skeletons built from a directory's config (no weights loaded).

Nothing here reaches a hub: an id is resolved with huggingface_hub's offline cache look-up only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import FP8Error

__all__ = ["Skeleton", "resolve_source", "skeletons"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(spec: str) -> Path:
    """A local path as it is, or the cached snapshot of a Hugging Face model id (``"org/name"``).

    Raises:
        FP8Error: not a local path, and not an id in the local cache (names the cache directory and the way to
            download it), or not an id at all.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not _HUB_ID.match(spec):
        raise FP8Error(f"{spec!r} is not a directory (no such path here), nor a Hugging Face model id (org/name)")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise FP8Error(f"{spec!r} is not a local path; reading the Hugging Face cache needs huggingface_hub") from None
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(spec, cache_dir=cache, local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError and its kin: not cached (the network is never tried)
        raise FP8Error(
            f"{spec!r} is not in the local Hugging Face cache {cache!r} ({type(error).__name__}); download it first "
            f"(hf download {spec}), or pass a local directory"
        ) from None


@dataclasses.dataclass
class Skeleton:
    """A model built on the meta device from a config, and the checkpoint its values are read from."""

    name: str
    module: nn.Module
    checkpoint: Path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FP8Error(f"{str(path)!r} is not readable JSON: {error}") from None
    if not isinstance(content, dict):
        raise FP8Error(f"{str(path)!r} holds a JSON {type(content).__name__}, expected an object")
    return content


def _dtype(config: dict[str, Any], dtype: torch.dtype | None) -> torch.dtype:
    """The dtype asked for, else the one the config records, else bfloat16."""
    if dtype is not None:
        return dtype
    named = config.get("dtype") or config.get("torch_dtype")
    found = getattr(torch, named, None) if isinstance(named, str) else None
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.bfloat16


def _library_class(library: str, name: str) -> Any:
    module = __import__(library)
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FP8Error(f"{library} {module.__version__} has no model class {name!r}; upgrade {library}")
    return cls


def _model_skeleton(directory: Path, dtype: torch.dtype | None, class_name: str | None = None) -> nn.Module:
    config = _read_json(directory / "config.json")
    wanted = _dtype(config, dtype)
    if "_class_name" in config:  # diffusers
        cls = _library_class("diffusers", class_name or config["_class_name"])
        with torch.device("meta"):
            return cls.from_config(cls.load_config(directory)).to(wanted).eval()
    if "model_type" in config:  # transformers: the checkpoint's own architecture, so its every tensor has a place
        import transformers

        loaded = transformers.AutoConfig.from_pretrained(directory)
        names = [class_name] if class_name else list(getattr(loaded, "architectures", None) or [])
        cls = next((getattr(transformers, n) for n in names if isinstance(getattr(transformers, n, None), type)), None)
        with torch.device("meta"):
            if cls is None:
                return transformers.AutoModel.from_config(loaded, dtype=wanted).eval()
            return cls._from_config(loaded, dtype=wanted).eval()
    raise FP8Error(f"{str(directory / 'config.json')!r} names neither a diffusers class (_class_name) nor a transformers model_type")


def skeletons(source: Path, components: list[str] | None, dtype: torch.dtype | None) -> list[Skeleton]:
    """Meta skeletons for a model directory (one), a checkpoint file beside its config.json (one), or a
    pipeline directory's components (default: ``vae`` and ``text_encoder``).

    Raises:
        FP8Error: no config to build a skeleton from, an unknown component, a class the libraries lack.
    """
    if source.is_file():
        if not (source.parent / "config.json").exists():
            raise FP8Error(
                f"{str(source)!r} is a checkpoint without a config.json beside it: pass the model directory, which "
                "says what model the tensors belong to"
            )
        if components:
            raise FP8Error("--component applies to a pipeline directory (with model_index.json)")
        return [Skeleton(source.parent.name, _model_skeleton(source.parent, dtype), source)]
    if (source / "model_index.json").exists():
        listing = _read_json(source / "model_index.json")
        models = {
            name: entry for name, entry in listing.items()
            if isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers")
            and (source / name / "config.json").exists()
        }
        wanted = components or [name for name in ("vae", "text_encoder") if name in models]
        unknown = [name for name in wanted if name not in models]
        if unknown or not wanted:
            raise FP8Error(f"pipeline {str(source)!r} has no component {unknown or wanted}; choose from {sorted(models)}")
        return [Skeleton(name, _model_skeleton(source / name, dtype, models[name][1]), source / name) for name in wanted]
    if components:
        raise FP8Error(f"--component applies to a pipeline directory (with model_index.json); {str(source)!r} is a model")
    if not (source / "config.json").exists():
        raise FP8Error(f"{str(source)!r} has no config.json or model_index.json: not a diffusers/transformers directory")
    return [Skeleton(source.name, _model_skeleton(source, dtype), source)]
