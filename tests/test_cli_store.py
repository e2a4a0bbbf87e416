"""`fp8ctx quantize` and `fp8ctx inspect`, and model ids resolved from the local Hugging Face cache."""

from __future__ import annotations

import shutil

import pytest
import torch

import _models
import fp8ctx
from conftest import assert_restored, snapshot
from fp8ctx import FP8Store
from fp8ctx._cli import main

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    _models.qwen_image_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    return path


def _no_dense_loading(monkeypatch):
    """quantize must never build the dense model: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("quantize loaded dense weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    import diffusers

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))


def test_quantize_a_model_directory_runs_its_meta_skeleton_like_the_dense_model(llama_dir, tmp_path, monkeypatch, capsys):
    dense = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    _no_dense_loading(monkeypatch)
    out = tmp_path / "llama.fp8.safetensors"
    assert main(["quantize", str(llama_dir), str(out), "--granularity", "block", "--block-size", "16"]) == 0
    assert "complete" in capsys.readouterr().out
    store = FP8Store.load(out)
    assert store.complete and store.config.granularity == "block" and store.config.block_size == 16
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM._from_config(dense.config, dtype=torch.bfloat16).eval()
    before = snapshot(skeleton)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with fp8ctx.fp8_weights(dense, granularity="block", block_size=16):
            expected = dense(ids).logits
        assert torch.equal(fp8ctx.functional_call(skeleton, store, ids).logits, expected)
    assert_restored(skeleton, before)


def test_quantize_pipeline_components_into_a_directory(pipeline_dir, tmp_path, monkeypatch, capsys):
    _no_dense_loading(monkeypatch)
    out = tmp_path / "stores"
    assert main(["quantize", str(pipeline_dir), str(out), "--component", "vae", "--component", "text_encoder",
                 "--storage-dtype", "e5m2", "--embedding"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder.fp8.safetensors", "vae.fp8.safetensors"]
    text = FP8Store.load(out / "text_encoder.fp8.safetensors")
    assert text.config.storage_dtype == torch.float8_e5m2
    assert any(name.endswith("embed_tokens.weight") for name in text)  # --embedding holds the table too


def test_inspect_prints_entries_layouts_bytes_and_versions(llama_dir, tmp_path, capsys):
    path = tmp_path / "s.safetensors"
    store = FP8Store.from_module(transformers.LlamaModel.from_pretrained(llama_dir, dtype=torch.bfloat16), complete=True)
    store.save(path)
    capsys.readouterr()
    assert main(["inspect", str(path), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert f"fp8ctx {fp8ctx.__version__}, store format 2; complete: yes" in out
    assert f"{len(store)} FP8 entries" in out and f"{len(store.unquantized)} unquantized tensors" in out
    assert "layers.0.self_attn.q_proj.weight  32x32" in out and f"(3 of {len(store)} entries shown" in out
    assert "norm.weight" in out


def test_inspect_and_quantize_errors_are_one_line(tmp_path, llama_dir, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a store")
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(next(llama_dir.glob("*.safetensors")), lone / "model.safetensors")
    assert main(["quantize", str(lone / "model.safetensors"), str(tmp_path / "o")]) == 2
    assert "without a config.json" in capsys.readouterr().err
    assert main(["quantize", str(llama_dir), str(tmp_path / "o"), "--component", "vae"]) == 2
    assert "--component applies to a pipeline" in capsys.readouterr().err


# -- Hugging Face ids, from the local cache only ---------------------------------------------------------


def _fake_cache(root, repo_id: str, source) -> None:
    """The layout huggingface_hub's cache has: refs/main names a snapshot folder holding the files."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(source, folder / "snapshots" / commit)


def test_report_and_quantize_take_a_model_id_from_the_local_cache(llama_dir, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    _fake_cache(cache, "tiny-org/tiny-llama", llama_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["report", "tiny-org/tiny-llama", "--rows", "2"]) == 0
    assert "restored bit-exact after the block: yes" in capsys.readouterr().out
    assert main(["quantize", "tiny-org/tiny-llama", str(tmp_path / "t.fp8.safetensors")]) == 0
    assert FP8Store.load(tmp_path / "t.fp8.safetensors").complete
    capsys.readouterr()
    assert main(["report", "tiny-org/absent"]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and str(cache) in err and "hf download tiny-org/absent" in err
    assert main(["report", "not an id"]) == 2
    assert "not a directory (no such path here), nor a Hugging Face model id" in capsys.readouterr().err
