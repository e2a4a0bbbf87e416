"""Weights held beyond Linear/Conv: by default transformers' Conv1D (GPT-2, run through torch.addmm) and
nn.MultiheadAttention's input projections (F.multi_head_attention_forward, fast paths skipped); by opt-in
routers (``layers=``) and raw parameters used as matmul operands (``include=``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_restored, reference_qdq, snapshot
from torch import nn

from fp8ctx import DEFAULT_LAYERS, FP8Config, FP8Store, FP8Tensor, fp8_weights, kernels

GRANULARITIES = ["tensor", "channel", "block"]


@pytest.fixture
def linear_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The weight shapes that took the Linear kernel path (which runs fused on a GPU)."""
    calls: list[tuple[int, ...]] = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, data, *a, **k: calls.append(tuple(data.shape)) or real(x, data, *a, **k))
    return calls


# -- GPT-2's Conv1D ------------------------------------------------------------------------------------


def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gpt2_conv1d_weights_are_held_and_match_the_reference(granularity, linear_calls):
    from transformers.pytorch_utils import Conv1D

    model = gpt2()
    twin = copy.deepcopy(model)
    with torch.no_grad():  # Conv1D stores (in, out): its output channels are dim 1
        for module in twin.modules():
            if isinstance(module, Conv1D):
                module.weight.copy_(reference_qdq(module.weight, granularity, 8, channel_axis=1))
            elif isinstance(module, nn.Linear):  # lm_head, tied to the token embedding
                module.weight.copy_(reference_qdq(module.weight, granularity, 8))
    conv1d = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8
    assert set(FP8Store.from_module(model)) == {f"{name}.weight" for name in conv1d} | {"transformer.wte.weight"}
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    with torch.no_grad():
        expected = twin(ids).logits
        with fp8_weights(model, granularity=granularity, block_size=8):
            assert all(isinstance(model.get_submodule(name).weight, FP8Tensor) for name in conv1d)
            actual = model(ids).logits
    assert_restored(model, before)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # each Conv1D ran as a Linear of its (out, in) view: 4 per layer, plus the head
    assert len(linear_calls) == 9 and (96, 32) in linear_calls


def test_gpt2_with_fp8_compute_runs_on_each_device(device):
    # compute="fp8" multiplies FP8 codes in a GEMM that wants them column-major; Conv1D's are (in, out)
    model = gpt2().to(device, torch.bfloat16)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4)).to(device)
    before = snapshot(model)
    with torch.no_grad():
        with fp8_weights(model, granularity="channel"):
            weight_only = model(ids).logits.float()
        with fp8_weights(model, granularity="channel", compute="fp8"):
            fp8_compute = model(ids).logits.float()
    assert_restored(model, before)
    assert ((fp8_compute - weight_only).norm() / weight_only.norm()).item() < 0.1


def test_conv1d_follows_nn_linear_in_layers():
    model = gpt2()
    assert not any("c_attn" in name for name in FP8Store.from_module(model, layers=(nn.Conv2d,)))
    assert any("c_attn" in name for name in FP8Store.from_module(model, layers=(nn.Linear,)))


# -- nn.MultiheadAttention and nn.TransformerEncoder --------------------------------------------------


def encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def qdq_twin(model: nn.Module, granularity: str) -> nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, nn.MultiheadAttention):
                for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    weight = getattr(module, name)
                    if weight is not None:
                        weight.copy_(reference_qdq(weight, granularity, 8))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(reference_qdq(module.weight, granularity, 8))
    return twin


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_transformer_encoder_in_projections_are_held_and_the_fast_path_is_skipped(granularity, monkeypatch):
    model = encoder()
    x = torch.randn(3, 7, 32)
    held = set(FP8Store.from_module(model))
    assert {f"layers.{i}.self_attn.in_proj_weight" for i in range(2)} <= held
    fast = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: fast.append(1) or real(*a, **k))
    before = snapshot(model)
    with torch.no_grad():
        expected = qdq_twin(model, granularity)(x)
        assert fast, "the reference should take the fused fast path"
        fast.clear()
        with fp8_weights(model, granularity=granularity, block_size=8):
            assert isinstance(model.layers[0].self_attn.in_proj_weight, FP8Tensor)
            actual = model(x)
    assert not fast  # FP8 weights have __torch_function__: torch falls back to the composite path
    assert_restored(model, before)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_multihead_attention_with_separate_key_value_sizes_holds_each_projection():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, kdim=16, vdim=24, batch_first=True).eval()
    assert sorted(FP8Store.from_module(attention)) == ["k_proj_weight", "out_proj.weight", "q_proj_weight", "v_proj_weight"]
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 6, 16), torch.randn(2, 6, 24)
    before = snapshot(attention)
    with torch.no_grad():
        expected, expected_weights = qdq_twin(attention, "channel")(q, k, v)
        with fp8_weights(attention, granularity="channel"):
            actual, weights = attention(q, k, v)
    assert_restored(attention, before)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)


def test_multihead_attention_is_left_out_by_layers_or_exclude():
    model = encoder()
    without = FP8Store.from_module(model, layers=tuple(t for t in DEFAULT_LAYERS if t is not nn.MultiheadAttention))
    assert not any("in_proj" in name for name in without)
    assert not any("in_proj" in name for name in FP8Store.from_module(model, config=FP8Config(exclude="*.self_attn")))


# -- opt-ins: routers (layers=) and raw parameters (include=) ----------------------------------------------


class ProbePool(nn.Module):
    """Raw parameters used as matmul operands: a probe scoring tokens and a bare projection."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(4, 32))
        self.projection = nn.Parameter(torch.randn(16, 32))
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(x @ self.probe.T, dim=1)  # (batch, tokens, 4)
        pooled = weights.transpose(1, 2) @ x  # (batch, 4, 32)
        return torch.nn.functional.linear(pooled, self.projection) * self.scale


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_raw_parameters_are_held_when_included_by_name(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(ProbePool())
    assert len(FP8Store.from_module(model)) == 0  # raw parameters: dense by default
    config = FP8Config(include=["*.probe", "0.projection", "*.scale"], granularity=granularity, block_size=8)
    assert sorted(FP8Store.from_module(model, config=config)) == ["0.probe", "0.projection"]  # 1-D never
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("probe", "projection"):
            getattr(twin[0], name).copy_(reference_qdq(getattr(twin[0], name), granularity, 8))
    x = torch.randn(2, 9, 32)
    before = snapshot(model)
    with torch.no_grad():
        expected = twin(x)
        with fp8_weights(model, config=config):
            assert isinstance(model[0].probe, FP8Tensor)
            actual = model(x)
    assert_restored(model, before)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_router_is_held_when_its_type_is_added_to_layers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    routers = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, MixtralTopKRouter)]
    assert routers and not set(routers) & set(FP8Store.from_module(model))
    opted = FP8Config(layers=DEFAULT_LAYERS + (MixtralTopKRouter,), granularity="channel")
    assert set(routers) <= set(FP8Store.from_module(model, config=opted))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, (nn.Linear, MixtralTopKRouter)):
                module.weight.copy_(reference_qdq(module.weight, "channel"))
            elif hasattr(module, "num_experts") and hasattr(module, "gate_up_proj"):
                for param in (module.gate_up_proj, module.down_proj):
                    for e in range(param.shape[0]):
                        param[e] = reference_qdq(param[e], "channel")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    with torch.no_grad():
        expected = twin(ids).logits
        with fp8_weights(model, config=opted):
            actual = model(ids).logits
    assert_restored(model, before)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_include_is_checked_when_the_config_is_built():
    from fp8ctx import FP8Error

    with pytest.raises(FP8Error, match="include"):
        FP8Config(include=[3])
    assert FP8Config(include="*.probe").include == ("*.probe",)
    assert FP8Config.from_dict(FP8Config(include=["a.*"]).to_dict()).include == ("a.*",)
