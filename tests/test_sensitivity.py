"""`fp8ctx.sensitivity`: each weight alone in FP8 against an independent twin, order, result views."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_restored, reference_qdq, snapshot
from torch import nn

import fp8ctx
from fp8ctx import FP8Error


class Tagger(nn.Module):
    """Token ids in, per-token scores out: an embedding table, a convolution and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.down(torch.nn.functional.gelu(self.up(x)))


def tagger():
    torch.manual_seed(0)
    model = Tagger()
    return model, torch.randint(0, 40, (5, 7))


def alone_in_fp8(model, ids, name, granularity):
    """The output with weight ``name`` replaced by the hand-written quantize-dequantize, nothing else."""
    weight = model.get_parameter(name)
    original = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(reference_qdq(weight, granularity))
        try:
            return model(ids)
        finally:
            weight.copy_(original)


@pytest.mark.parametrize("metric", ["rel_l2", "cosine"])
def test_each_row_is_the_output_error_of_that_weight_alone(metric):
    model, ids = tagger()
    before = snapshot(model)
    result = fp8ctx.sensitivity(model, ids, metric=metric)  # default: per-channel scales
    assert_restored(model, before)
    with torch.no_grad():
        expected = model(ids).double().flatten(1)
    assert sorted(row.name for row in result.rows) == ["conv.weight", "down.weight", "embed.weight", "up.weight"]
    for row in result.rows:
        actual = alone_in_fp8(model, ids, row.name, "channel").double().flatten(1)
        if metric == "rel_l2":
            per_sample = (actual - expected).norm(dim=1) / expected.norm(dim=1)
        else:
            per_sample = 1 - (actual * expected).sum(1) / (actual.norm(dim=1) * expected.norm(dim=1))
        assert row.error == pytest.approx(float(per_sample.max()), rel=1e-6, abs=1e-12)
        assert row.mean_error == pytest.approx(float(per_sample.mean()), rel=1e-6, abs=1e-12)
        weight = model.get_parameter(row.name).detach().double()
        noise = (reference_qdq(weight.float(), "channel").double() - weight).square().sum()
        assert row.sqnr_db == pytest.approx(10 * math.log10(weight.square().sum() / noise), abs=1e-6)
        assert row.dense_bytes == weight.numel() * 4 and row.saved_bytes == weight.numel() * 4 - row.fp8_bytes
    assert [row.error_per_mib for row in result.rows] == sorted(row.error_per_mib for row in result.rows)
    assert result.model_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert result.sample_errors.shape == (4, 5)


def test_layers_and_exclude_choose_the_rows_and_options_are_checked():
    model, ids = tagger()
    linear_only = fp8ctx.sensitivity(model, run=lambda m: m(ids), layers=nn.Linear, exclude="down")
    assert [row.name for row in linear_only.rows] == ["up.weight"]
    with pytest.raises(FP8Error, match="metric must be one of"):
        fp8ctx.sensitivity(model, ids, metric="lpips")
    with pytest.raises(FP8Error, match="pass inputs"):
        fp8ctx.sensitivity(model)
    with pytest.raises(FP8Error, match="not both"):
        fp8ctx.sensitivity(model, ids, run=lambda m: m(ids))
    with pytest.raises(FP8Error, match="'dwn' matches no layer"):
        fp8ctx.sensitivity(model, ids, exclude="dwn")


def test_the_result_prints_renders_and_converts():
    model, ids = tagger()
    result = fp8ctx.sensitivity(model, ids, metric="cosine", granularity="channel")
    text, page = str(result), result._repr_html_()
    assert all(row.name in text and row.name in page for row in result.rows)
    assert "worst cosine" in text and "<table>" in page
    frame = result.to_pandas()
    assert list(frame["name"]) == [row.name for row in result.rows]
    assert list(frame["saved_bytes"]) == [row.saved_bytes for row in result.rows]
