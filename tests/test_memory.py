"""The report's memory section: the whole model before and inside the block, stated for where it lives."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fp8ctx
from fp8ctx._memory import MemoryReport


def model(device="cpu"):
    torch.manual_seed(0)
    built = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16))
    return built.to(device).eval()


def run(m):
    return m(torch.arange(6, device=m[1].weight.device))


def test_report_states_the_whole_model_before_and_inside_with_figures_computed_by_hand(device):
    net = model(device)
    result = fp8ctx.report(net, run=run, granularity="channel")
    memory = result.memory
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    held = {"1.weight", "3.weight"}
    fp8 = (32 * 64 + 64 * 16) + 4 * (64 + 16)  # e4m3 codes + float32 channel scales
    dense = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if n not in held)
    assert (memory.params_bytes, memory.buffers_bytes, memory.fp8_bytes, memory.dense_params_bytes) == (params, buffers, fp8, dense)
    assert memory.before_bytes == params + buffers and memory.held_bytes == fp8 + dense + buffers
    text = "\n".join(result.summary_lines())
    assert "memory, whole model on" in text and "parameters kept dense" in text
    json.dumps(result.to_dict(), allow_nan=False)
    if device == "cpu":
        # nothing leaves the CPU: the report must not claim a saving, and must name the way to one
        assert not memory.reduced and memory.inside_bytes == params + buffers + fp8
        assert "memory is NOT reduced" in text and "meta device" in text and "from_checkpoint" in text
        assert memory.peak_plain is None and memory.peak_fp8 is None
    else:
        assert memory.reduced and memory.inside_bytes == memory.held_bytes
        assert memory.peak_plain >= params and memory.peak_fp8 > 0 and "measured peak device memory" in text


@pytest.mark.parametrize(
    "device,originals,reduced,inside",
    [("cuda:0", "cpu", True, 110), ("cuda:0", "keep", False, 1040), ("cpu", "cpu", False, 1040), ("cpu", "keep", False, 1040)],
)
def test_what_the_device_holds_inside_follows_where_the_originals_can_go(device, originals, reduced, inside):
    memory = MemoryReport(device, originals, params_bytes=1000, buffers_bytes=10, fp8_bytes=30, dense_params_bytes=70)
    assert memory.reduced is reduced and memory.inside_bytes == inside
    text = "\n".join(memory.lines())
    assert ("NOT reduced" in text) is (device == "cpu")
    assert ("originals='keep'" in text) is (device != "cpu" and originals == "keep")


def test_the_cli_report_prints_the_memory_section(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path)
    from fp8ctx._cli import main

    assert main(["report", str(tmp_path), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory, whole model on cpu" in out and "memory is NOT reduced" in out
