"""Tiny, seeded model factories for the fp8ctx test suite.

Everything is built from small configs in code with random (seeded) weights;
nothing is ever downloaded. Each model runs a forward in well under a second
on one CPU core. All factories accept ``dtype`` (bfloat16 by default; float32
and float16 also work).
"""

from __future__ import annotations

import json
import logging

import torch

# Qwen-Image pipeline geometry (with the tiny VAE below: 4x spatial compression).
QWEN_IMAGE_Z_DIM = 4
QWEN_IMAGE_VAE_SCALE = 4  # 2 ** len(temperal_downsample)
QWEN_IMAGE_HW = 32  # pipeline height/width: must be a multiple of 2 * QWEN_IMAGE_VAE_SCALE

# Tiny Qwen2.5-VL geometry.
QWEN25VL_VOCAB_SIZE = 512
QWEN25VL_HIDDEN = 64
QWEN25VL_PATCH = 14
QWEN25VL_TEMPORAL_PATCH = 2
QWEN25VL_MERGE = 2

# Special tokens of the local tokenizer; they get ids 0..N-1 in this order.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TOKEN_IDS = {tok: i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}

# Prompt template used by diffusers' QwenImagePipeline (its first 34 tokens are dropped).
QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_PROMPT = "a red cat sitting on a blue chair"


def _seed(seed: int) -> None:
    """Seed torch's global CPU RNG (weights are initialised from it)."""
    torch.manual_seed(seed)


def _cast(model, dtype: torch.dtype):
    """``model.to(dtype).eval()`` without diffusers' spurious "should be kept in float32: []" warning."""
    lg = logging.getLogger("diffusers.models.modeling_utils")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        model = model.to(dtype)
    finally:
        lg.setLevel(old)
    return model.eval()


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def module_type_counts(model: torch.nn.Module) -> dict[str, int]:
    """Count of each concrete module class name in ``model``."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


def layer_kind_counts(model: torch.nn.Module) -> dict[str, int]:
    """Count of weight-bearing layer kinds (isinstance-based, so subclasses are included)."""
    nn = torch.nn
    kinds = {
        "Linear": nn.Linear,
        "Conv1d": nn.Conv1d,
        "Conv2d": nn.Conv2d,
        "Conv3d": nn.Conv3d,
        "ConvTranspose": (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        "Embedding": nn.Embedding,
    }
    out = {k: sum(isinstance(m, cls) for m in model.modules()) for k, cls in kinds.items()}
    return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------------------------
# Qwen-Image VAE
# --------------------------------------------------------------------------------------------


def qwen_image_vae(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Tiny diffusers ``AutoencoderKLQwenImage`` (z_dim=4, 4x spatial compression), eval mode."""
    from diffusers import AutoencoderKLQwenImage

    _seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=QWEN_IMAGE_Z_DIM,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True],  # one downsample2d + one downsample3d (with time_conv)
        dropout=0.0,
        latents_mean=[0.1, -0.2, 0.3, -0.1],
        latents_std=[1.5, 2.0, 1.2, 1.8],
    )
    return _cast(vae, dtype)


def qwen_image_vae_inputs(vae, dtype: torch.dtype = torch.bfloat16, batch: int = 1, size: int = 48, seed: int = 0):
    """Return ``(image, latent)``: image (B,3,1,size,size) in [-1,1] for encode, latent (B,z,1,size/4,size/4) for decode."""
    g = torch.Generator().manual_seed(seed)
    scale = 2 ** len(vae.temperal_downsample)
    image = (torch.rand(batch, 3, 1, size, size, generator=g) * 2 - 1).to(dtype)
    latent = torch.randn(batch, vae.config.z_dim, 1, size // scale, size // scale, generator=g).to(dtype)
    return image, latent


def enable_small_tiling(vae, tile: int = 32, stride: int = 24):
    """Enable tiling with tiny tiles (32 px, stride 24) so a 48x48 input is split into 2x2 tiles (encode and decode).

    Works for AutoencoderKLQwenImage / AutoencoderKLWan / AutoencoderDC (tile_sample_* attributes) and
    AutoencoderKL (tile_sample_min_size / tile_latent_min_size). Returns ``vae``.
    """
    if hasattr(vae, "tile_sample_min_height"):
        vae.enable_tiling(
            tile_sample_min_height=tile,
            tile_sample_min_width=tile,
            tile_sample_stride_height=stride,
            tile_sample_stride_width=stride,
        )
    else:  # AutoencoderKL: tiles of tile_sample_min_size, overlap factor 0.25
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // (2 ** (len(vae.config.block_out_channels) - 1))
        vae.tile_overlap_factor = 1 - stride / tile
    return vae


# --------------------------------------------------------------------------------------------
# Other diffusers VAE families
# --------------------------------------------------------------------------------------------


def autoencoder_kl(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Tiny diffusers ``AutoencoderKL`` (2 down blocks, channels 16/32, 2x compression, mid attention), eval mode."""
    from diffusers import AutoencoderKL

    _seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        force_upcast=False,
    )
    return _cast(vae, dtype)


def autoencoder_kl_inputs(vae, dtype: torch.dtype = torch.bfloat16, batch: int = 1, size: int = 32, seed: int = 0):
    """Return ``(image, latent)`` for AutoencoderKL: image (B,3,size,size), latent (B,4,size/2,size/2)."""
    g = torch.Generator().manual_seed(seed)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    image = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dtype)
    latent = torch.randn(batch, vae.config.latent_channels, size // scale, size // scale, generator=g).to(dtype)
    return image, latent


def autoencoder_dc(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Tiny diffusers ``AutoencoderDC`` (DC-AE: ResBlock + EfficientViT linear-attention, pixel (un)shuffle), eval mode."""
    from diffusers import AutoencoderDC

    _seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.5,
    )
    return _cast(vae, dtype)


def autoencoder_dc_inputs(vae, dtype: torch.dtype = torch.bfloat16, batch: int = 1, size: int = 32, seed: int = 0):
    """Return ``(image, latent)`` for AutoencoderDC: image (B,3,size,size) for ``encode(x).latent``, latent (B,4,size/2,size/2)."""
    g = torch.Generator().manual_seed(seed)
    scale = vae.spatial_compression_ratio
    image = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dtype)
    latent = torch.randn(batch, vae.config.latent_channels, size // scale, size // scale, generator=g).to(dtype)
    return image, latent


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_WORDS = (
    "a an the of and or in on at to with by for from is are was be this that it its red green blue yellow "
    "black white orange purple pink brown gray grey cat dog bird fish horse cow tree flower house car boat "
    "chair table cup bowl book lamp window door road river mountain sky cloud sun moon star city street "
    "sitting standing running flying small large big tiny tall short round square bright dark old new "
    "photo picture painting drawing image color shape size texture quantity text spatial relationships "
    "objects background describe detailing system user assistant hello world one two three four five "
    "left right top bottom front behind near far under over next water fire wood stone metal glass"
).split()


def _tokenizer_corpus() -> list[str]:
    """Deterministic in-memory training corpus for the local BPE tokenizer."""
    system = QWEN_IMAGE_PROMPT_TEMPLATE.split("{}")[0]
    lines = [system, QWEN_IMAGE_PROMPT_TEMPLATE.format(QWEN_IMAGE_PROMPT)] * 20
    n = len(_WORDS)
    for i in range(300):
        lines.append(" ".join(_WORDS[(i * k + k * k) % n] for k in range(1, 9)) + ", " + _WORDS[i % n] + ".")
    lines += ["0 1 2 3 4 5 6 7 8 9", "Hello, world! How are you?", "A: B; C - D (E) [F] 'G' \"H\""]
    return lines


def local_qwen_tokenizer(vocab_size: int = QWEN25VL_VOCAB_SIZE):
    """Local byte-level BPE ``Qwen2Tokenizer`` (Qwen pre-tokenizer regex, Qwen special tokens), no downloads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    model_json = json.loads(tok.to_str())["model"]
    vocab = model_json["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    assert len(vocab) <= vocab_size, len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
        extra_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    for t, i in QWEN_TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(t) == i, (t, tokenizer.convert_tokens_to_ids(t), i)
    return tokenizer


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL
# --------------------------------------------------------------------------------------------


def qwen25vl_config(tie_word_embeddings: bool = False, attn_implementation: str = "sdpa"):
    """Tiny ``Qwen2_5_VLConfig``: text hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 512; vision hidden 32, depth 2."""
    from transformers import Qwen2_5_VLConfig

    text_config = dict(
        vocab_size=QWEN25VL_VOCAB_SIZE,
        hidden_size=QWEN25VL_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=QWEN_TOKEN_IDS["<|endoftext|>"],
        eos_token_id=QWEN_TOKEN_IDS["<|im_end|>"],
        pad_token_id=QWEN_TOKEN_IDS["<|endoftext|>"],
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=QWEN25VL_PATCH,
        temporal_patch_size=QWEN25VL_TEMPORAL_PATCH,
        spatial_merge_size=QWEN25VL_MERGE,
        window_size=56,  # 2x2 merged tokens per window -> window attention is exercised
        fullatt_block_indexes=[1],
        out_hidden_size=QWEN25VL_HIDDEN,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=QWEN_TOKEN_IDS["<|image_pad|>"],
        video_token_id=QWEN_TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=QWEN_TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN_TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    return config


def qwen25vl(
    dtype: torch.dtype = torch.bfloat16,
    tie_word_embeddings: bool = False,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """Tiny transformers ``Qwen2_5_VLForConditionalGeneration`` (text + vision tower with Conv3d patch embed), eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen25vl_config(tie_word_embeddings=tie_word_embeddings, attn_implementation=attn_implementation)
    _seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Like from_pretrained(dtype=...): RoPE inv_freq buffers stay float32 (a plain .to(dtype) would cast them).
    fp32_buffers = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(dtype).eval()
    for name, buf in fp32_buffers.items():
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, buf)
    return model


def qwen25vl_text_inputs(model=None, batch: int = 2, seq_len: int = 12, seed: int = 0) -> dict:
    """Random text-only inputs ``dict(input_ids, attention_mask)``; the last row is left-padded by 3 tokens if batch > 1."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size if model is not None else QWEN25VL_VOCAB_SIZE
    low = len(QWEN_SPECIAL_TOKENS)  # avoid special / image tokens
    input_ids = torch.randint(low, vocab, (batch, seq_len), generator=g)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1:
        attention_mask[-1, :3] = 0
        input_ids[-1, :3] = QWEN_TOKEN_IDS["<|endoftext|>"]
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def qwen25vl_image_inputs(model=None, grid_hw: tuple[int, int] = (8, 8), seed: int = 0) -> dict:
    """Single-image inputs ``dict(input_ids, attention_mask, pixel_values, image_grid_thw)`` that run the vision tower.

    ``pixel_values`` is (t*h*w, 3*2*14*14) float32 like the real image processor output (the model casts it to the
    vision tower dtype); input_ids contain exactly (h*w)/merge**2 ``<|image_pad|>`` tokens.
    """
    cfg = model.config if model is not None else qwen25vl_config()
    vcfg = cfg.vision_config
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid_hw
    grid_thw = torch.tensor([[1, gh, gw]], dtype=torch.long)
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size * vcfg.patch_size
    pixel_values = torch.randn(gh * gw, patch_dim, generator=g)
    n_image_tokens = (gh * gw) // (vcfg.spatial_merge_size**2)
    vocab = cfg.text_config.vocab_size
    low = len(QWEN_SPECIAL_TOKENS)
    prefix = [QWEN_TOKEN_IDS["<|im_start|>"]] + torch.randint(low, vocab, (4,), generator=g).tolist()
    suffix = torch.randint(low, vocab, (5,), generator=g).tolist() + [QWEN_TOKEN_IDS["<|im_end|>"]]
    ids = (
        prefix
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n_image_tokens
        + [cfg.vision_end_token_id]
        + suffix
    )
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
    }


# --------------------------------------------------------------------------------------------
# Qwen-Image transformer and pipeline
# --------------------------------------------------------------------------------------------


def qwen_image_transformer(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Tiny diffusers ``QwenImageTransformer2DModel`` (2 blocks, 2 heads x 32, joint_attention_dim=64, in_channels=16)."""
    from diffusers import QwenImageTransformer2DModel

    _seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_IMAGE_Z_DIM,  # 2x2-packed VAE latents
        out_channels=QWEN_IMAGE_Z_DIM,  # proj_out -> patch_size**2 * out_channels = in_channels
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=QWEN25VL_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
    )
    return _cast(model, dtype)


def qwen_image_transformer_inputs(model, dtype: torch.dtype = torch.bfloat16, batch: int = 1, txt_len: int = 7, seed: int = 0):
    """Direct-forward kwargs for the tiny transformer (16x16 latent -> 8x8 packed tokens, text length ``txt_len``)."""
    g = torch.Generator().manual_seed(seed)
    h = w = QWEN_IMAGE_HW // QWEN_IMAGE_VAE_SCALE // 2
    return {
        "hidden_states": torch.randn(batch, h * w, model.config.in_channels, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, txt_len, model.config.joint_attention_dim, generator=g).to(dtype),
        "encoder_hidden_states_mask": torch.ones(batch, txt_len, dtype=torch.long),
        "timestep": torch.full((batch,), 0.5, dtype=dtype),
        "img_shapes": [[(1, h, w)]] * batch,
        "return_dict": False,
    }


def flow_match_scheduler():
    """``FlowMatchEulerDiscreteScheduler`` configured like Qwen-Image's (dynamic shifting, exponential)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def qwen_image_pipeline(dtype: torch.dtype = torch.bfloat16, tie_word_embeddings: bool = False, seed: int = 0):
    """Full diffusers ``QwenImagePipeline`` from the tiny VAE, Qwen2.5-VL, local tokenizer and transformer (CPU)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=flow_match_scheduler(),
        vae=qwen_image_vae(dtype, seed=seed),
        text_encoder=qwen25vl(dtype, tie_word_embeddings=tie_word_embeddings, seed=seed),
        tokenizer=local_qwen_tokenizer(),
        transformer=qwen_image_transformer(dtype, seed=seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_qwen_image_pipeline(pipe, seed: int = 0, prompt: str = QWEN_IMAGE_PROMPT, size: int = QWEN_IMAGE_HW, **kwargs):
    """Run ``pipe`` for 2 steps at ``size``x``size`` with a seeded generator; return the (1,3,H,W) float image in [0,1]."""
    call = dict(
        prompt=prompt,
        height=size,
        width=size,
        num_inference_steps=2,
        true_cfg_scale=1.0,  # no negative prompt -> no CFG (one transformer call per step)
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=64,
    )
    call.update(kwargs)
    return pipe(**call).images


def qwen25vl_text_tower(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The text tower of :func:`qwen25vl` alone (``Qwen2_5_VLTextModel``: embedding, 2 decoder layers, norm), eval mode.

    What multi-device tests split over devices and ranks; inputs are ``input_ids`` of its 512-token vocabulary.
    """
    from transformers import Qwen2_5_VLTextModel

    config = qwen25vl_config().text_config
    config._attn_implementation = "sdpa"
    _seed(seed)
    model = Qwen2_5_VLTextModel(config)
    fp32_buffers = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(dtype).eval()
    for name, buf in fp32_buffers.items():
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, buf)
    return model


def text_tower_device_map(model, devices: list) -> dict:
    """An accelerate ``device_map`` for :func:`qwen25vl_text_tower`: embedding and first half of the layers on
    ``devices[0]``, the rest (and the norm) spread over the others in order; one hook per block."""
    layers = len(model.layers)
    mapping = {"embed_tokens": devices[0], "rotary_emb": devices[0]}
    for index in range(layers):
        mapping[f"layers.{index}"] = devices[min(index * len(devices) // layers, len(devices) - 1)]
    mapping["norm"] = devices[-1]
    return mapping
