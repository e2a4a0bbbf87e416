"""Real diffusers / transformers models (small configs built in code) inside the context.

Each output is compared with an independent reference: the same model with every targeted weight replaced
by its hand-computed FP8 quantize-dequantize (conftest.fake_quantized_copy), run plainly. It must match
that to bf16 rounding and must differ from the plain bf16 model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, fake_quantized_copy, relative_error, snapshot

import _models
from fp8ctx import FP8Tensor, fp8_weights

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

GRANULARITIES = ["tensor", "channel", "block"]


def check_against_reference(model, run, granularity, **options):
    reference = fake_quantized_copy(model, granularity, block_size=options.get("block_size", 128))
    with torch.no_grad():
        plain, expected = run(model), run(reference)
        before = snapshot(model)  # after a plain run: diffusers VAEs create their feature caches on first use
        with fp8_weights(model, granularity=granularity, **options):
            assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
            out = run(model)
    assert_restored(model, before)
    assert out.dtype == plain.dtype
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert relative_error(out, expected) < 1e-2
    assert relative_error(out, plain) > 1e-3, "nothing was quantized"
    return out


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_qwen_image_vae_encode_and_decode(granularity):
    vae = _models.qwen_image_vae()
    image, latent = _models.qwen_image_vae_inputs(vae)
    check_against_reference(vae, lambda m: m.encode(image).latent_dist.mode(), granularity, block_size=16)
    check_against_reference(vae, lambda m: m.decode(latent).sample, granularity, block_size=16)


def test_qwen_image_vae_with_tiling():
    vae = _models.enable_small_tiling(_models.qwen_image_vae())
    image, latent = _models.qwen_image_vae_inputs(vae, size=48)
    check_against_reference(vae, lambda m: m.decode(m.encode(image).latent_dist.mode()).sample, "channel")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_qwen25vl_text_forward(granularity, tied):
    model = _models.qwen25vl(tie_word_embeddings=tied)
    inputs = _models.qwen25vl_text_inputs(model)
    check_against_reference(model, lambda m: m(**inputs).logits, granularity, block_size=32)
    if tied:
        with fp8_weights(model):
            assert model.lm_head.weight is model.get_input_embeddings().weight
            assert isinstance(model.lm_head.weight, FP8Tensor)


def test_qwen25vl_with_an_image_runs_the_conv3d_patch_embed():
    model = _models.qwen25vl()
    inputs = _models.qwen25vl_image_inputs(model)
    calls = []
    model.model.visual.patch_embed.proj.register_forward_hook(
        lambda layer, args, out: calls.append(isinstance(layer._parameters["weight"], FP8Tensor))
    )
    check_against_reference(model, lambda m: m(**inputs).logits, "channel")
    assert True in calls


@pytest.mark.parametrize("factory", ["autoencoder_kl", "autoencoder_dc"])
def test_other_diffusers_vae_families(factory):
    vae = getattr(_models, factory)()
    inputs = getattr(_models, factory + "_inputs")(vae)
    image = inputs[0] if isinstance(inputs, tuple) else inputs

    def roundtrip(model):
        encoded = model.encode(image)
        latent = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent
        return model.decode(latent).sample

    check_against_reference(vae, roundtrip, "channel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_compute_dtypes_report_and_compute_in_their_own_dtype(dtype):
    vae = _models.qwen_image_vae(dtype)
    _, latent = _models.qwen_image_vae_inputs(vae, dtype)
    reference = fake_quantized_copy(vae, "channel")
    with torch.no_grad(), fp8_weights(vae, granularity="channel"):
        assert vae.dtype == dtype
        out = vae.decode(latent).sample
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.decode(latent).sample)


def test_guidance_style_gradient_through_the_vae_decoder():
    vae = _models.qwen_image_vae(torch.float32)
    _, latent = _models.qwen_image_vae_inputs(vae, torch.float32)
    reference = fake_quantized_copy(vae, "channel")
    expected_latent = latent.clone().requires_grad_()
    reference.decode(expected_latent).sample.square().mean().backward()
    latent = latent.clone().requires_grad_()
    with torch.no_grad():
        vae.decode(latent)
    before = snapshot(vae)
    with fp8_weights(vae, granularity="channel") as store:
        vae.decode(latent).sample.square().mean().backward()
    assert_restored(vae, before)
    torch.testing.assert_close(latent.grad, expected_latent.grad, rtol=1e-4, atol=1e-6)
    params = dict(vae.named_parameters())
    assert all(params[name].grad is None for name in store)
