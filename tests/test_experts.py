"""Mixture-of-experts tensors held as FP8: one scale set per expert, only routed experts dequantized, on the
experts implementations transformers ships (eager loop, batched_mm gather, grouped_mm), in four architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_restored, reference_qdq, snapshot
from torch import nn

from fp8ctx import FP8Config, FP8Store, FP8Tensor, fp8_weights
from fp8ctx import _numerics, kernels

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

# grouped_mm_fallback: grouped_mm where torch has no kernel for it (torch < 2.9 on a CPU, unaligned CPU tensors,
# torch.compile with non-bf16 weights), so transformers runs its own operator, transformers::grouped_mm_fallback
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm", "grouped_mm_fallback"]
GRANULARITIES = ["tensor", "channel", "block"]
EXPERTS = 8
VOCAB = 64
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64,
)


def mixtral_config() -> MixtralConfig:
    return MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2)


def qwen3_moe_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        **_COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=48, num_experts=EXPERTS,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )


def gpt_oss_config() -> GptOssConfig:
    return GptOssConfig(
        **_COMMON, head_dim=8, intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2,
        layer_types=["full_attention", "sliding_attention"],
    )


def deepseek_v3_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=48,
        n_routed_experts=EXPERTS, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8,
    )


ARCHITECTURES = {
    "mixtral": (mixtral_config, MixtralForCausalLM, MixtralExperts),
    "qwen3_moe": (qwen3_moe_config, Qwen3MoeForCausalLM, Qwen3MoeExperts),
    "gpt_oss": (gpt_oss_config, GptOssForCausalLM, GptOssExperts),
    "deepseek_v3": (deepseek_v3_config, DeepseekV3ForCausalLM, DeepseekV3Experts),
}


def supported(config) -> list[str]:
    """The experts implementations this transformers version offers for the architecture (all three here)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager"] + [name for name in ("batched_mm", "grouped_mm") if name in ALL_EXPERTS_FUNCTIONS]


def transformers_implementation(implementation: str, monkeypatch: pytest.MonkeyPatch | None) -> str:
    """The experts implementation to ask transformers for; for ``grouped_mm_fallback``, grouped_mm with torch's
    kernel ruled out (whatever torch this is), as transformers itself rules it out on older torch."""
    if implementation != "grouped_mm_fallback":
        return implementation
    from transformers.integrations import moe

    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args, **kwargs: False)
    return "grouped_mm"


def experts_module(arch: str, implementation: str, monkeypatch: pytest.MonkeyPatch | None = None) -> nn.Module:
    make_config, _, experts_class = ARCHITECTURES[arch]
    config = make_config()
    config._experts_implementation = transformers_implementation(implementation, monkeypatch)
    torch.manual_seed(0)
    experts = experts_class(config)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.2)
    return experts


def output_axis(experts: nn.Module) -> int:
    """Where each expert's output channels lie: written from the architectures' sources, not from fp8ctx."""
    return 1 if isinstance(experts, GptOssExperts) else 0  # gpt-oss stores each expert (in, out)


def reference_experts(experts: nn.Module, granularity: str, block_size: int = 8) -> nn.Module:
    """A copy whose 3-D expert tensors are quantize-dequantized expert by expert with the conftest formula."""
    twin = copy.deepcopy(experts)
    with torch.no_grad():
        for param in twin.parameters():
            if param.dim() == 3:
                for e in range(param.shape[0]):
                    param[e] = reference_qdq(param[e], granularity, block_size, channel_axis=output_axis(experts))
    return twin


def routing(tokens: int, used: list[int], top_k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    index = torch.tensor([[used[(t + k) % len(used)] for k in range(top_k)] for t in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
    return index, weights


class DequantizeLog:
    """Records every dense copy fp8ctx makes: its shape, and which held tensor's codes it came from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        real = _numerics.dequantize

        def logging(data, *args, **kwargs):
            out = real(data, *args, **kwargs)
            self.calls.append((data.data_ptr(), tuple(out.shape)))
            return out

        monkeypatch.setattr(_numerics, "dequantize", logging)

    def experts_used(self, held: FP8Tensor) -> list[int]:
        """Which experts of ``held`` were dequantized (each dense copy is one expert's codes)."""
        starts = {held.qdata[e].data_ptr(): e for e in range(held.shape[0])}
        return sorted(starts[ptr] for ptr, _ in self.calls if ptr in starts)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_experts_match_a_per_expert_reference_and_only_routed_experts_are_dequantized(
    arch, implementation, granularity, monkeypatch
):
    experts = experts_module(arch, implementation, monkeypatch)
    reference = reference_experts(experts, granularity)
    hidden = torch.randn(5, 32)
    index, weights = routing(5, used=[1, 6])
    with torch.no_grad():
        expected = reference(hidden, index, weights)
        before = snapshot(experts)
        log = DequantizeLog(monkeypatch)
        with fp8_weights(experts, granularity=granularity, block_size=8) as store:
            held = {name: experts._parameters[name] for name in ("gate_up_proj", "down_proj")}
            assert set(store) >= set(held) and all(isinstance(w, FP8Tensor) for w in held.values())
            actual = experts(hidden, index, weights)
    assert_restored(experts, before)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    matrices = set()
    for name, weight in held.items():
        # each routed expert once; the others never
        assert weight.scale.shape[0] == EXPERTS
        assert log.experts_used(weight) == [1, 6], name
        matrices |= {tuple(weight.shape[1:]), tuple(weight.shape[1:])[::-1]}
    # every dense copy is one expert's matrix: never a whole 3-D tensor, nor a gathered stack of experts
    assert len(log.calls) == 4 and {shape for _, shape in log.calls} <= matrices, log.calls


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bf16_experts_on_each_device_touch_only_the_routed_experts(arch, implementation, device, monkeypatch):
    # on a GPU the Linear path and dense copies are fused kernels: count the codes that reach any of them
    experts = experts_module(arch, implementation, monkeypatch).to(device, torch.bfloat16)
    reference = reference_experts(experts, "channel")
    hidden = torch.randn(6, 32, device=device, dtype=torch.bfloat16)
    index, weights = routing(6, used=[2, 7])
    index, weights = index.to(device), weights.to(device, torch.bfloat16)
    touched: list[int] = []
    # every door to an FP8 weight's codes: a dense copy (fused on a GPU, or the formula) and the Linear path
    for module, name in ((kernels, "dequantize"), (_numerics, "dequantize"), (kernels, "linear")):
        real = getattr(module, name)
        position = 0 if name == "dequantize" else 1

        def spy(*args, _real=real, _at=position, **kwargs):
            touched.append(args[_at].data_ptr())
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    before = snapshot(experts)
    with torch.no_grad():
        expected = reference(hidden, index, weights)
        with fp8_weights(experts, granularity="channel"):
            held = [experts._parameters[name] for name in ("gate_up_proj", "down_proj")]
            actual = experts(hidden, index, weights)
    assert_restored(experts, before)
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
    for weight in held:
        starts = {weight.qdata[e].data_ptr(): e for e in range(EXPERTS)}
        # the whole tensor starts where expert 0 does: not touching expert 0 means it was never read whole
        assert sorted({starts[ptr] for ptr in touched if ptr in starts}) == [2, 7]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_moe_models_match_the_reference_and_restore_exactly(arch, implementation, monkeypatch):
    make_config, model_class, _ = ARCHITECTURES[arch]
    implementation = transformers_implementation(implementation, monkeypatch)
    assert implementation in supported(make_config())
    torch.manual_seed(0)
    model = model_class(make_config()).eval()
    model.set_experts_implementation(implementation)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the reference: Linear weights and each expert quantize-dequantized by the formula
        for module in twin.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(reference_qdq(module.weight, "channel"))
            elif hasattr(module, "num_experts"):
                for param in module.parameters(recurse=False):
                    if param.dim() == 3:
                        for e in range(param.shape[0]):
                            param[e] = reference_qdq(param[e], "channel", channel_axis=output_axis(module))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    before = snapshot(model)
    with torch.no_grad():
        expected = twin(ids).logits
        with fp8_weights(model, granularity="channel"):
            actual = model(ids).logits
    assert_restored(model, before)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "grouped_mm_fallback"])
def test_gradients_reach_the_inputs_through_held_experts(implementation, monkeypatch):
    experts = experts_module("qwen3_moe", implementation, monkeypatch)
    reference = reference_experts(experts, "channel")
    index, weights = routing(4, used=[0, 3, 5])
    hidden = torch.randn(4, 32)
    x_ref, x_fp8 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    reference(x_ref, index, weights).square().sum().backward()
    with fp8_weights(experts, granularity="channel"):
        experts(x_fp8, index, weights).square().sum().backward()
    torch.testing.assert_close(x_fp8.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert experts.gate_up_proj.grad is None


def test_dense_share_of_moe_models_is_below_ten_percent_embeddings_aside():
    for arch, (make_config, model_class, _) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = model_class(make_config())
        params = {id(p): p for p in model.parameters()}
        embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        held = {id(model.get_parameter(name)) for name in FP8Store.from_module(model)}
        counted = [p for key, p in params.items() if key not in embeddings]
        dense = sum(p.numel() for p in counted if id(p) not in held)
        share = dense / sum(p.numel() for p in counted)
        assert share < 0.10, (arch, share)


def test_experts_false_leaves_expert_tensors_dense_and_says_so():
    experts = experts_module("mixtral", "eager")
    assert sorted(FP8Store.from_module(experts)) == ["down_proj", "gate_up_proj"]
    assert len(FP8Store.from_module(experts, config=FP8Config(experts=False))) == 0
    from fp8ctx import report

    kept = {e.name: e.reason for e in report(experts, config=FP8Config(experts=False)).kept_dense.entries}
    assert kept["gate_up_proj"] == "mixture-of-experts tensor (opt-in: experts=True)"


def test_an_expert_store_saves_and_loads_with_its_expert_axis(tmp_path):
    experts = experts_module("gpt_oss", "eager")
    store = FP8Store.from_module(experts, granularity="block", block_size=8)
    store.save(tmp_path / "experts.safetensors")
    loaded = FP8Store.load(tmp_path / "experts.safetensors")
    for name, entry in store.items():
        assert loaded[name].fp8_layout == entry.fp8_layout and entry.fp8_layout.batch_dims == 1
        assert torch.equal(loaded[name].dequantize(), entry.dequantize())


def test_experts_multiplied_whole_with_bmm_run_one_expert_at_a_time(monkeypatch):
    # Llama 4's experts take every token through every expert: torch.bmm(x.view(experts, -1, in), weight)
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    torch.manual_seed(0)
    experts = Llama4TextExperts(Llama4TextConfig(hidden_size=32, intermediate_size=48, num_local_experts=4))
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.2)
    twin = copy.deepcopy(experts)
    with torch.no_grad():  # no is_transposed: fp8ctx groups each expert's scales along its dim 0 (per matrix)
        for param in twin.parameters():
            for e in range(param.shape[0]):
                param[e] = reference_qdq(param[e], "channel", channel_axis=0)
    hidden = torch.randn(4 * 3, 32)
    log = DequantizeLog(monkeypatch)
    before = snapshot(experts)
    with torch.no_grad():
        expected = twin(hidden)
        with fp8_weights(experts, granularity="channel"):
            held = [experts._parameters[name] for name in ("gate_up_proj", "down_proj")]
            actual = experts(hidden)
    assert_restored(experts, before)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert all(log.experts_used(weight) == [0, 1, 2, 3] for weight in held)
    assert {shape for _, shape in log.calls} == {(96, 32), (32, 48)}  # one expert (out, in) at a time


def test_a_checkpoint_of_merged_expert_tensors_gives_the_store_of_the_loaded_model(tmp_path):
    # the store made while streaming from disk holds each expert tensor like from_module does: per expert
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(qwen3_moe_config())
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, tmp_path / "model.safetensors")
    with torch.device("meta"):
        skeleton = Qwen3MoeForCausalLM(qwen3_moe_config())
    streamed = FP8Store.from_checkpoint(skeleton, tmp_path, granularity="block", block_size=16)
    loaded = FP8Store.from_module(model, granularity="block", block_size=16)
    experts = [name for name in loaded if name.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 4
    for name in experts:
        assert streamed[name].fp8_layout == loaded[name].fp8_layout and streamed[name].fp8_layout.batch_dims == 1
        assert torch.equal(streamed[name].qdata.view(torch.uint8), loaded[name].qdata.view(torch.uint8))
        assert torch.equal(streamed[name].scale, loaded[name].scale)
