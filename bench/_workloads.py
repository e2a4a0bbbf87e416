"""Workloads for bench/compare.py: real layer shapes, random weights, no downloads.

Every workload builds its model directly on the target device in bf16 from a fixed seed, so
each method gets a bit-identical fresh copy, and every method sees the same inputs.

Sizes come in three presets:
  full  - the issue's figures (VAE decode 1024x1024, 8 text layers, T = 64/256/1024)
  quick - shrunk (VAE 256x256, 2 text layers, fewer repeats)
  tiny  - toy shapes that run on a CPU in seconds (proves the script end to end)
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

BF16 = torch.bfloat16

# Qwen2.5-VL-7B text tower.
QWEN25VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    mrope_section=[16, 24, 24],
)
# Toy text tower with the same structure (head_dim 16, so mrope sections sum to 8).
TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=[2, 3, 3],
)
TINY_VAE = dict(base_dim=8)  # z_dim stays 16 so the latent has 16 channels

# Qwen-Image DiT (diffusers' QwenImageTransformer2DModel defaults: 24 heads x 128 = 3072 wide, text features
# 3584, 64 packed latent channels), 4 of its 60 blocks. Image tokens are (px / 16)^2 (VAE /8, patch 2).
QWEN_IMAGE_DIT = dict(num_layers=4)
TINY_DIT = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                axes_dims_rope=(8, 12, 12), in_channels=16, out_channels=4)

# (warm-up, timed) iterations per workload kind and preset.
ITERS = {
    "full": {"linear": (10, 30), "conv": (5, 20), "text": (3, 10), "vae": (2, 5), "dit": (3, 10)},
    "quick": {"linear": (3, 10), "conv": (3, 8), "text": (2, 5), "vae": (1, 3), "dit": (2, 5)},
    "tiny": {"linear": (1, 3), "conv": (1, 3), "text": (1, 3), "vae": (1, 2), "dit": (1, 2)},
}

PRESETS = {
    "full": dict(text_cfg=QWEN25VL_7B_TEXT, text_layers=8, tokens=[64, 256, 1024],
                 vae_cfg={}, vae_latent=128, dit_cfg=QWEN_IMAGE_DIT, dit_px=[1024, 512], dit_text=256,
                 dit_text_dim=3584),
    "quick": dict(text_cfg=QWEN25VL_7B_TEXT, text_layers=2, tokens=[64, 256, 1024],
                  vae_cfg={}, vae_latent=32, dit_cfg=QWEN_IMAGE_DIT, dit_px=[512], dit_text=256,
                  dit_text_dim=3584),
    "tiny": dict(text_cfg=TINY_TEXT, text_layers=2, tokens=[8, 32],
                 vae_cfg=TINY_VAE, vae_latent=4, dit_cfg=TINY_DIT, dit_px=[128], dit_text=10, dit_text_dim=64),
}

# Short groups accepted by --workloads besides the full names and glob patterns.
GROUPS = {
    "vae": ["vae-decode"],
    "text": ["text-tower"],
    "linear": ["linear-qkv", "linear-o", "linear-gate_up", "linear-down"],
    "linears": ["linear-qkv", "linear-o", "linear-gate_up", "linear-down"],
    "conv": ["vae-conv3d"],
    "dit": ["dit"],
}


@dataclass
class Case:
    """One input of a workload (e.g. one prefill length)."""

    name: str
    make_inputs: Callable[[torch.device], Any]
    forward: Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Workload:
    name: str
    kind: str  # "vae" | "text" | "linear" | "conv"
    description: str
    build: Callable[[torch.device], nn.Module]
    cases: list[Case]
    warmup: int
    iters: int
    has_linear: bool = True  # does the model contain nn.Linear layers (torchao applies)
    ctx_timing: bool = False  # time fp8ctx enter/exit for originals="cpu"/"keep"
    graph_calls: int = 0  # forwards per CUDA graph for the GPU-only timing (0: not timed that way)
    info: dict = field(default_factory=dict)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.no_grad()
def _normal_init_(model: nn.Module, std: float = 0.02) -> None:
    """HF-style fast init: N(0, std) for Linear/Embedding weights, zero biases, ones for norms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)


# ---------------------------------------------------------------------------------------------
# Qwen-Image VAE
# ---------------------------------------------------------------------------------------------

def _vae_class():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage


def _build_vae(device: torch.device, vae_cfg: dict, seed: int) -> nn.Module:
    cls = _vae_class()
    _seed(seed)
    with torch.device(device), _default_dtype(BF16):
        vae = cls(**vae_cfg)  # PyTorch default init (uniform), run on the device: fast
    return vae.eval()  # already bf16 (built under the bf16 default dtype)


def _largest_vae_conv3d(vae_cfg: dict) -> tuple[str, nn.Module]:
    """Largest Conv3d by weight numel in the VAE of this config (built on meta: free).

    Ties (many 384x384x3x3x3 convs) go to the first one in the decoder, since decode is what runs.
    """
    cls = _vae_class()
    with torch.device("meta"):
        vae = cls(**vae_cfg)
    convs = [(n, m) for n, m in vae.named_modules() if isinstance(m, nn.Conv3d)]
    best = max(m.weight.numel() for _, m in convs)
    top = [(n, m) for n, m in convs if m.weight.numel() == best]
    dec = [(n, m) for n, m in top if n.startswith("decoder.")]
    return (dec or top)[0]


def make_vae_decode(preset: str, seed: int) -> Workload:
    p = PRESETS[preset]
    vae_cfg, lat = p["vae_cfg"], p["vae_latent"]
    warm, iters = ITERS[preset]["vae"]
    px = lat * 8

    def make_inputs(device):
        return torch.randn(1, 16, 1, lat, lat, generator=_gen(device, seed + 1), device=device,
                           dtype=BF16)

    def forward(model, z):
        return model.decode(z, return_dict=False)[0]

    return Workload(
        name="vae-decode",
        kind="vae",
        description=f"Qwen-Image VAE decode {px}x{px} (AutoencoderKLQwenImage"
                    f"({vae_cfg or 'default config'}), latent 1x16x1x{lat}x{lat})",
        build=lambda device: _build_vae(device, vae_cfg, seed),
        cases=[Case(f"{px}px", make_inputs, forward)],
        warmup=warm,
        iters=iters,
        has_linear=False,
        graph_calls=1,
        info={"latent": [1, 16, 1, lat, lat], "vae_config": vae_cfg or "default"},
    )


def make_vae_conv3d(preset: str, seed: int) -> Workload:
    p = PRESETS[preset]
    vae_cfg, lat = p["vae_cfg"], p["vae_latent"]
    warm, iters = ITERS[preset]["conv"]
    name, meta_conv = _largest_vae_conv3d(vae_cfg)
    cin = meta_conv.in_channels
    shape = tuple(meta_conv.weight.shape)

    def build(device):
        _seed(seed)
        conv = copy.deepcopy(meta_conv).to_empty(device=device)
        with torch.no_grad():
            conv.reset_parameters()  # default Conv init, on the device
        return conv.to(dtype=BF16).eval()

    def make_inputs(device):
        return torch.randn(1, cin, 1, lat, lat, generator=_gen(device, seed + 2), device=device,
                           dtype=BF16)

    def forward(model, x):
        return model(x)

    return Workload(
        name="vae-conv3d",
        kind="conv",
        description=f"largest VAE Conv3d ({name}, weight {'x'.join(map(str, shape))}) on "
                    f"1x{cin}x1x{lat}x{lat}",
        build=build,
        cases=[Case(f"{lat}x{lat}", make_inputs, forward)],
        warmup=warm,
        iters=iters,
        has_linear=False,
        graph_calls=5,
        info={"module": name, "weight_shape": list(shape), "input": [1, cin, 1, lat, lat]},
    )


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL text tower
# ---------------------------------------------------------------------------------------------

def _text_config(cfg: dict, layers: int):
    from transformers import Qwen2_5_VLTextConfig

    kw = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
        use_cache=False,
    )
    if cfg["vocab_size"] < 151643:
        kw.update(bos_token_id=None, eos_token_id=None)
    rope = {"rope_type": "default", "rope_theta": 1000000.0,
            "mrope_section": list(cfg["mrope_section"])}
    try:
        conf = Qwen2_5_VLTextConfig(rope_parameters=rope, attn_implementation="sdpa", **kw)
    except TypeError:  # older transformers spelling
        conf = Qwen2_5_VLTextConfig(rope_scaling=dict(rope, type="mrope"), rope_theta=1e6, **kw)
    try:
        conf._attn_implementation = "sdpa"
    except Exception:
        pass
    return conf


def _build_text(device: torch.device, cfg: dict, layers: int, seed: int) -> nn.Module:
    from transformers import Qwen2_5_VLTextModel

    conf = _text_config(cfg, layers)
    _seed(seed)
    # Built straight on the device in bf16: initialising 7B-shaped layers on a CPU is slow.
    with torch.device(device), _default_dtype(BF16):
        model = Qwen2_5_VLTextModel(conf)
    # No model.to(bf16): parameters are bf16 already, and the rotary inv_freq buffers must stay
    # fp32 as transformers computes them.
    _seed(seed)
    _normal_init_(model, std=0.02)
    return model.eval()


def make_text_tower(preset: str, seed: int, layers: int | None = None) -> Workload:
    p = PRESETS[preset]
    cfg = p["text_cfg"]
    layers = layers or p["text_layers"]
    warm, iters = ITERS[preset]["text"]

    def case(T):
        def make_inputs(device):
            return torch.randint(0, cfg["vocab_size"], (1, T), generator=_gen(device, seed + 3),
                                 device=device)

        def forward(model, ids):
            return model(input_ids=ids, use_cache=False).last_hidden_state

        return Case(f"T={T}", make_inputs, forward)

    return Workload(
        name="text-tower",
        kind="text",
        description=f"Qwen2.5-VL text tower, {layers} decoder layers (hidden {cfg['hidden_size']}, "
                    f"inter {cfg['intermediate_size']}, {cfg['num_attention_heads']}/"
                    f"{cfg['num_key_value_heads']} heads, vocab {cfg['vocab_size']}), "
                    f"prefill batch 1",
        build=lambda device: _build_text(device, cfg, layers, seed),
        cases=[case(T) for T in p["tokens"]],
        warmup=warm,
        iters=iters,
        has_linear=True,
        ctx_timing=True,
        graph_calls=2,
        info={"layers": layers, "config": {k: v for k, v in cfg.items()}},
    )


# ---------------------------------------------------------------------------------------------
# Qwen-Image DiT, a few blocks
# ---------------------------------------------------------------------------------------------

def _build_dit(device: torch.device, cfg: dict, seed: int) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    _seed(seed)
    with torch.device(device), _default_dtype(BF16):
        model = QwenImageTransformer2DModel(**cfg)
    _seed(seed)
    with torch.no_grad():
        for m in model.modules():  # N(0, 0.02) weights and biases: every Linear here has a bias, exercise it
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.02)
    return model.eval()


def make_dit(preset: str, seed: int) -> Workload:
    p = PRESETS[preset]
    cfg, text, text_dim = p["dit_cfg"], p["dit_text"], p["dit_text_dim"]
    channels = cfg.get("in_channels", 64)
    warm, iters = ITERS[preset]["dit"]

    def case(px):
        side = px // 16  # VAE /8, then 2x2 patches

        def make_inputs(device):
            g = _gen(device, seed + 5)
            return dict(
                hidden_states=torch.randn(1, side * side, channels, generator=g, device=device, dtype=BF16),
                encoder_hidden_states=torch.randn(1, text, text_dim, generator=g, device=device, dtype=BF16),
                # every text token is real: no mask (diffusers builds a CPU scalar from a mask, which breaks
                # CUDA-graph capture; the unmasked attention is the same math)
                encoder_hidden_states_mask=None,
                timestep=torch.full((1,), 0.5, device=device, dtype=BF16),
                img_shapes=[(1, side, side)],
            )

        def forward(model, kw):
            return model(**kw, return_dict=False)[0]

        return Case(f"{px}px", make_inputs, forward)

    blocks = cfg.get("num_layers")
    return Workload(
        name="dit",
        kind="dit",
        description=f"Qwen-Image DiT (QwenImageTransformer2DModel({cfg}), {blocks} blocks, random N(0, 0.02) "
                    f"weights and biases), one denoising step: (px/16)^2 image + {text} text tokens",
        build=lambda device: _build_dit(device, cfg, seed),
        cases=[case(px) for px in p["dit_px"]],
        warmup=warm,
        iters=iters,
        has_linear=True,
        graph_calls=1,
        info={"config": dict(cfg), "text_tokens": text, "px": p["dit_px"]},
    )


# ---------------------------------------------------------------------------------------------
# Single Linear layers at the text tower's shapes
# ---------------------------------------------------------------------------------------------

def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the text tower's matrices; qkv fused."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    return {
        "qkv": (h + 2 * kv, h),  # 4608 x 3584
        "o": (h, h),  # 3584 x 3584
        "gate_up": (inter, h),  # 18944 x 3584 (gate and up have the same shape)
        "down": (h, inter),  # 3584 x 18944
    }


def make_linear(preset: str, seed: int, which: str) -> Workload:
    p = PRESETS[preset]
    out_f, in_f = linear_shapes(p["text_cfg"])[which]
    warm, iters = ITERS[preset]["linear"]

    def build(device):
        _seed(seed)
        with torch.device(device):
            lin = nn.Linear(in_f, out_f, bias=False, dtype=BF16)
        _normal_init_(lin, std=0.02)
        return lin.eval()

    def case(T):
        def make_inputs(device):
            return torch.randn(1, T, in_f, generator=_gen(device, seed + 4), device=device,
                               dtype=BF16)

        return Case(f"T={T}", make_inputs, lambda model, x: model(x))

    return Workload(
        name=f"linear-{which}",
        kind="linear",
        description=f"nn.Linear {out_f}x{in_f} (text tower '{which}'), input 1xTx{in_f}",
        build=build,
        cases=[case(T) for T in p["tokens"]],
        warmup=warm,
        iters=iters,
        has_linear=True,
        graph_calls=20,
        info={"out_features": out_f, "in_features": in_f},
    )


WORKLOAD_NAMES = ["dit", "vae-decode", "text-tower", "linear-qkv", "linear-o", "linear-gate_up",
                  "linear-down", "vae-conv3d"]


def make_workload(name: str, preset: str, seed: int, text_layers: int | None = None) -> Workload:
    if name == "dit":
        return make_dit(preset, seed)
    if name == "vae-decode":
        return make_vae_decode(preset, seed)
    if name == "vae-conv3d":
        return make_vae_conv3d(preset, seed)
    if name == "text-tower":
        return make_text_tower(preset, seed, text_layers)
    if name.startswith("linear-"):
        return make_linear(preset, seed, name[len("linear-"):])
    raise KeyError(name)


def select_workloads(spec: str | None) -> list[str]:
    """Comma-separated names, groups (vae, text, linear, conv) or glob patterns; None = all."""
    import fnmatch

    if not spec or spec == "all":
        return list(WORKLOAD_NAMES)
    chosen: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        names = GROUPS.get(tok) or [n for n in WORKLOAD_NAMES if fnmatch.fnmatch(n, tok)]
        if not names:
            raise SystemExit(f"unknown workload {tok!r}; choose from {WORKLOAD_NAMES} "
                             f"or groups {sorted(GROUPS)}")
        chosen += [n for n in names if n not in chosen]
    return [n for n in WORKLOAD_NAMES if n in chosen]
