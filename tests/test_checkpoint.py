"""FP8Store.from_checkpoint and meta skeletons: quantize from disk tensor by tensor, run a model whose dense
weights never exist, bit for bit what the dense model held the same way gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

import _models
import fp8ctx
from fp8ctx import FP8Error, FP8Store


def qwen_text(dtype=torch.bfloat16, meta=False):
    """The tiny Qwen2.5-VL text model, as from_pretrained(dtype=...) builds it (rotary buffers float32)."""
    from transformers import Qwen2_5_VLTextModel

    config = _models.qwen25vl_config().text_config
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return Qwen2_5_VLTextModel._from_config(config, dtype=dtype).eval()
    return Qwen2_5_VLTextModel._from_config(config, dtype=dtype).eval()


def llama(cls_name="LlamaForCausalLM", meta=False, tie=True):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )
    cls = getattr(transformers, cls_name)
    torch.manual_seed(1)
    if meta:
        with torch.device("meta"):
            return cls._from_config(config, dtype=torch.bfloat16).eval()
    return cls._from_config(config, dtype=torch.bfloat16).eval()


def ids(vocab=96):
    return torch.randint(7, vocab, (2, 9), generator=torch.Generator().manual_seed(3))


def assert_same_store(a: FP8Store, b: FP8Store) -> None:
    assert list(a) == list(b) and list(a.unquantized) == list(b.unquantized)
    for name in a:
        assert torch.equal(a[name].qdata.view(torch.uint8), b[name].qdata.view(torch.uint8)), name
        assert torch.equal(a[name].scale, b[name].scale) and a[name].fp8_layout == b[name].fp8_layout
    for name in a.unquantized:
        assert a.unquantized[name].dtype == b.unquantized[name].dtype and torch.equal(a.unquantized[name], b.unquantized[name]), name


def first(output):
    return output[0]


# -- from a checkpoint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["one-file", "sharded"])
def test_qwen_text_model_from_checkpoint_equals_the_store_of_the_loaded_model(tmp_path, shard):
    model = qwen_text()
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard == "sharded" else "1GB")
    if shard == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    skeleton = qwen_text(meta=True)
    before = snapshot(skeleton)
    store = FP8Store.from_checkpoint(skeleton, tmp_path, granularity="channel")
    assert_restored(skeleton, before)  # only read
    assert store.complete
    assert_same_store(store, FP8Store.from_module(model, granularity="channel", complete=True))
    # the rotary buffers are not in the checkpoint: derived as transformers derives them, in float32
    assert store.unquantized["rotary_emb.inv_freq"].dtype == torch.float32


def test_a_meta_skeleton_runs_from_the_checkpoint_store_bit_for_bit_and_stays_on_meta(tmp_path):
    model = qwen_text()
    model.save_pretrained(tmp_path)
    skeleton = qwen_text(meta=True)
    store = FP8Store.from_checkpoint(skeleton, tmp_path, granularity="block", block_size=16)
    loaded = FP8Store.load(_saved(store, tmp_path))
    before = snapshot(skeleton)
    inputs = _models.qwen25vl_text_inputs(batch=2, seq_len=10)
    with torch.no_grad():
        with fp8ctx.fp8_weights(model, granularity="block", block_size=16):
            expected = model(**inputs).last_hidden_state
        actual = fp8ctx.functional_call(skeleton, loaded, kwargs=inputs).last_hidden_state
        assert_restored(skeleton, before)
        with fp8ctx.fp8_weights(skeleton, store=loaded):
            inside = skeleton(**inputs).last_hidden_state
    assert torch.equal(actual, expected) and torch.equal(inside, expected)
    assert_restored(skeleton, before)
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])


def _saved(store: FP8Store, tmp_path) -> str:
    path = str(tmp_path / "store.fp8.safetensors")
    store.save(path)
    return path


@pytest.mark.parametrize("saved_as,skeleton_as", [("LlamaForCausalLM", "LlamaModel"), ("LlamaModel", "LlamaForCausalLM")])
def test_base_model_prefix_is_stripped_or_added_and_tied_weights_are_read_once(tmp_path, saved_as, skeleton_as):
    source = llama(saved_as)
    source.save_pretrained(tmp_path)
    skeleton = llama(skeleton_as, meta=True)
    store = FP8Store.from_checkpoint(skeleton, tmp_path, strict=False)
    dense = llama(skeleton_as)
    dense.load_state_dict({k.removeprefix("model."): v for k, v in source.state_dict().items()} if skeleton_as == "LlamaModel"
                          else {f"model.{k}": v for k, v in source.state_dict().items()}, strict=False)
    if skeleton_as == "LlamaForCausalLM":
        dense.tie_weights()
    assert_same_store(store, FP8Store.from_module(dense, complete=True))
    with torch.no_grad():
        assert torch.equal(first(fp8ctx.functional_call(skeleton, store, ids())), first(fp8ctx.functional_call(dense, store, ids())))


def test_transformers_legacy_key_renames_apply(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in legacy)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.device("meta"):
        skeleton = BertModel(config).eval()
    store = FP8Store.from_checkpoint(skeleton, tmp_path)
    assert_same_store(store, FP8Store.from_module(model, complete=True))


def test_a_diffusers_vae_runs_from_its_checkpoint_on_a_meta_skeleton(tmp_path):
    from diffusers import AutoencoderKL

    vae = _models.autoencoder_kl(torch.bfloat16)
    vae.save_pretrained(tmp_path)
    with torch.device("meta"):
        skeleton = AutoencoderKL.from_config(vae.config).to(torch.bfloat16).eval()
    before = snapshot(skeleton)
    store = FP8Store.from_checkpoint(skeleton, tmp_path, granularity="channel")
    _, latent = _models.autoencoder_kl_inputs(vae)
    with torch.no_grad():
        with fp8ctx.fp8_weights(vae, granularity="channel"):
            expected = vae.decode(latent).sample
        with fp8ctx.fp8_weights(skeleton, store=store):
            actual = skeleton.decode(latent).sample
    assert torch.equal(actual, expected)
    assert_restored(skeleton, before)


def test_what_does_not_match_is_listed_in_one_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = llama("LlamaModel")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["norm.weight"]
    tensors["layers.0.mlp.up_proj.weight"] = tensors["layers.0.mlp.up_proj.weight"][:3]
    tensors["vision.patch.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    skeleton = llama("LlamaModel", meta=True)
    with pytest.raises(FP8Error) as caught:
        FP8Store.from_checkpoint(skeleton, tmp_path)
    message = str(caught.value)
    assert "'norm.weight'" in message and "layers.0.mlp.up_proj.weight" in message and "vision.patch.weight" in message
    assert "strict=False" in message


def test_checkpoint_paths_and_indexes_are_checked(tmp_path):
    skeleton = llama("LlamaModel", meta=True)
    with pytest.raises(FP8Error, match="neither a file nor a directory"):
        FP8Store.from_checkpoint(skeleton, tmp_path / "nope")
    with pytest.raises(FP8Error, match="0 .safetensors files"):
        FP8Store.from_checkpoint(skeleton, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"norm.weight": "../evil.safetensors"}}))
    with pytest.raises(FP8Error, match="not a .safetensors file beside it"):
        FP8Store.from_checkpoint(skeleton, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(FP8Error, match="not readable JSON"):
        FP8Store.from_checkpoint(skeleton, tmp_path)


def test_from_checkpoint_checks_its_options_and_skeleton(tmp_path):
    llama("LlamaModel").save_pretrained(tmp_path)
    with pytest.raises(FP8Error, match="granularity"):
        FP8Store.from_checkpoint(llama("LlamaModel", meta=True), tmp_path, granularity="rows")
    with pytest.raises(TypeError, match="skeleton"):
        FP8Store.from_checkpoint("model", tmp_path)  # type: ignore[arg-type]


# -- meta skeletons -----------------------------------------------------------------------------------


def test_a_meta_skeleton_runs_from_a_complete_store_of_the_loaded_model():
    model = llama("LlamaForCausalLM")
    store = FP8Store.from_module(model, granularity="channel", complete=True)
    skeleton = llama("LlamaForCausalLM", meta=True)
    before = snapshot(skeleton)
    with torch.no_grad():
        with fp8ctx.fp8_weights(model, granularity="channel"):
            expected = model(ids()).logits
        assert torch.equal(fp8ctx.functional_call(skeleton, store, ids()).logits, expected)
        with fp8ctx.fp8_weights(skeleton, store=store) as given:
            assert given is store and skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # still tied
            assert torch.equal(skeleton(ids()).logits, expected)
    assert_restored(skeleton, before)


def test_a_store_that_is_not_complete_for_the_skeleton_names_every_missing_tensor():
    model = llama("LlamaModel")
    skeleton = llama("LlamaModel", meta=True)
    before = snapshot(skeleton)
    for store in (FP8Store.from_module(model), FP8Store.from_module(model, complete=True, exclude=["layers.1"])):
        if store.complete:  # a complete store of another selection: the excluded weights are unquantized
            fp8ctx.functional_call(skeleton, store, ids())
            continue
        with pytest.raises(FP8Error) as caught:
            fp8ctx.functional_call(skeleton, store, ids())
        message = str(caught.value)
        assert "embed_tokens.weight" in message and "norm.weight" in message and "complete=True" in message
        with pytest.raises(FP8Error, match="meta device"):
            with fp8ctx.fp8_weights(skeleton, store=store):
                pass
    wrong_dtype = FP8Store.from_module(llama("LlamaModel").float(), complete=True)
    with pytest.raises(FP8Error, match="float32"):
        fp8ctx.functional_call(skeleton, wrong_dtype, ids())
    assert_restored(skeleton, before)


def test_buffers_reassigned_inside_the_block_are_put_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    store = FP8Store.from_module(model, complete=True)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    before = snapshot(skeleton)
    with fp8ctx.fp8_weights(skeleton, store=store):
        assert torch.equal(skeleton[1].running_var, model[1].running_var)
        skeleton[1].running_mean = torch.ones(4)
    assert_restored(skeleton, before)


# -- memory: one tensor at a time -----------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    sys.path.insert(0, {root!r})
    import fp8ctx

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    layers, width = 20, 2048
    def build(width=width):
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)], nn.LayerNorm(width))
    if sys.argv[1] == "write":
        torch.manual_seed(0)
        from safetensors.torch import save_file
        save_file(build().state_dict(), sys.argv[2])
        save_file(build(64).state_dict(), sys.argv[2] + ".small")
        sys.exit()
    # a first, small run loads the code pages of the kernels used (they count in VmHWM too)
    with torch.device("meta"):
        small, skeleton = build(64), build()
    fp8ctx.FP8Store.from_checkpoint(small, sys.argv[2] + ".small", granularity="channel")
    start = peak()
    store = fp8ctx.FP8Store.from_checkpoint(skeleton, sys.argv[2], granularity="channel")
    print(json.dumps({{"extra": peak() - start, "store": store.total_nbytes, "largest": width * width * 4}}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_peak_host_memory_is_the_store_plus_about_one_tensor_not_the_checkpoint(tmp_path):
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT.format(root=os.path.dirname(os.path.dirname(os.path.abspath(fp8ctx.__file__)))))
    checkpoint = tmp_path / "model.safetensors"
    subprocess.run([sys.executable, str(script), "write", str(checkpoint)], check=True)
    size = checkpoint.stat().st_size
    assert size > 300 * 2**20
    done = subprocess.run([sys.executable, str(script), "read", str(checkpoint)], check=True, capture_output=True, text=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # the FP8 store is the output (a quarter of float32); beyond it, working memory well under the checkpoint.
    # VmHWM also counts the checkpoint's file pages safetensors maps, and how many stay resident varies with the
    # machine (measured beyond the store: 36 MB alone, 86-119 MB inside the full suite), so the bound is half
    # the checkpoint: reading it whole, or a dense copy of the model, would need all of it
    assert figures["extra"] - figures["store"] < 0.5 * size, figures


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("row", [0, 1000])  # in the first rows read, or in a later chunk of them
def test_a_nan_or_inf_anywhere_in_a_checkpoint_weight_is_refused(tmp_path, granularity, bad, row):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = {"weight": torch.randn(1024, 1024), "bias": torch.randn(1024)}
    weights["weight"][row, 7] = bad
    save_file(weights, tmp_path / "model.safetensors")
    with torch.device("meta"):
        skeleton = nn.Linear(1024, 1024)
    with pytest.raises(FP8Error, match=r"weight 'weight' contains NaN or Inf in the checkpoint"):
        FP8Store.from_checkpoint(skeleton, tmp_path, granularity=granularity, block_size=128)


def qwen3_moe(meta=False):
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, head_dim=16,
    )
    torch.manual_seed(0)
    if meta:  # as from_pretrained(dtype=bfloat16) builds it: rotary buffers stay float32
        with torch.device("meta"):
            return transformers.Qwen3MoeModel._from_config(config, dtype=torch.bfloat16).eval()
    return transformers.Qwen3MoeModel._from_config(config, dtype=torch.bfloat16).eval()


def test_per_expert_checkpoints_are_refused_with_the_way_out_and_the_way_out_runs_from_disk(tmp_path):
    model = qwen3_moe()
    model.save_pretrained(tmp_path / "hub")  # transformers writes the fused experts back one tensor per expert
    with pytest.raises(FP8Error) as caught:
        FP8Store.from_checkpoint(qwen3_moe(meta=True), tmp_path / "hub")
    message = str(caught.value)
    assert "experts.0.gate_proj.weight" in message and "experts.gate_up_proj" in message
    assert "FP8Store.from_module(model, complete=True)" in message
    # the way out: the loaded model's complete store, saved once, runs a meta skeleton bit for bit
    import transformers

    loaded = transformers.Qwen3MoeModel.from_pretrained(tmp_path / "hub", dtype=torch.bfloat16).eval()
    FP8Store.from_module(loaded, complete=True).save(tmp_path / "moe.fp8.safetensors")
    skeleton = qwen3_moe(meta=True)
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with fp8ctx.fp8_weights(loaded):
            expected = loaded(input_ids).last_hidden_state
        with fp8ctx.fp8_weights(skeleton, store=FP8Store.load(tmp_path / "moe.fp8.safetensors")):
            actual = skeleton(input_ids).last_hidden_state
    assert torch.equal(actual, expected)
    assert all(t.is_meta for t in skeleton.parameters())
