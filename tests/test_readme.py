"""The README's memory recipe runs as written (a tiny model stands in for the text encoder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fp8ctx

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe() -> str:
    text = README.read_text()
    found = re.search(r"<!-- test:memory-recipe -->\n```python\n(.*?)```", text, flags=re.S)
    assert found, "the README lost its memory recipe"
    return found.group(1)


def test_the_readme_memory_recipe_runs_and_matches_the_loaded_model(tmp_path, monkeypatch):
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    dense = transformers.Qwen2Model._from_config(config, dtype=torch.bfloat16).eval()
    dense.save_pretrained(tmp_path / "model", max_shard_size="50KB")
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    code = recipe()
    if torch.cuda.is_available():  # the recipe runs on the GPU: its input and the reference model go there too
        input_ids, dense = input_ids.to("cuda"), dense.to("cuda")
    else:
        code = code.replace('device="cuda"', 'device="cpu"')
    monkeypatch.chdir(tmp_path)
    namespace = {"model_dir": str(tmp_path / "model"), "input_ids": input_ids}
    with torch.no_grad():
        exec(compile(code, str(README), "exec"), namespace)
        with fp8ctx.fp8_weights(dense, granularity="channel"):
            expected = dense(input_ids).last_hidden_state
    skeleton = namespace["skeleton"]
    assert torch.equal(namespace["out"].last_hidden_state.cpu(), expected.cpu())
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert (tmp_path / "text_encoder.fp8.safetensors").exists()
