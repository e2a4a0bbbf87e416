"""`fp8ctx.report`: per-layer figures against hand computation, output metrics, restore check, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_restored, fake_quantized_copy, reference_qdq, snapshot
from torch import nn

import fp8ctx


def model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 5)).to(torch.bfloat16)
    return model, torch.randn(6, 32, dtype=torch.bfloat16)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_layer_rows_match_hand_computation(granularity):
    model, x = model_and_input()
    result = fp8ctx.report(model, granularity=granularity, block_size=16)
    assert [row.name for row in result.layers] == ["0.weight", "2.weight"]
    for row in result.layers:
        weight = model.get_parameter(row.name)
        restored = reference_qdq(weight, granularity, 16).double()
        noise = (restored - weight.double()).square().sum()
        assert row.sqnr_db == pytest.approx(10 * math.log10(weight.double().square().sum() / noise), rel=1e-9)
        assert row.relative_error == pytest.approx(float((noise / weight.double().square().sum()).sqrt()), rel=1e-9)
        scales = {"tensor": 1, "channel": weight.shape[0], "block": math.ceil(weight.shape[0] / 16) * math.ceil(weight.shape[1] / 16)}
        assert row.dense_bytes == weight.numel() * 2
        assert row.fp8_bytes == weight.numel() + 4 * scales[granularity]
        assert row.layer_type == "Linear" and row.shape == tuple(weight.shape)
    assert result.dense_bytes == sum(r.dense_bytes for r in result.layers)
    assert result.saved_bytes == result.dense_bytes - result.fp8_bytes
    assert result.output is None and result.restored_exactly is None


def test_output_metrics_against_the_unquantized_run_and_restore_check():
    model, x = model_and_input()
    before = snapshot(model)
    result = fp8ctx.report(model, x, granularity="channel")
    assert_restored(model, before)
    with torch.no_grad():
        expected, actual = model(x).double(), fake_quantized_copy(model, "channel")(x).double()
    assert result.output.relative_l2 == pytest.approx(float((actual - expected).norm() / expected.norm()), rel=1e-3)
    cosine = float((actual * expected).sum() / (actual.norm() * expected.norm()))
    assert result.output.cosine == pytest.approx(cosine, abs=1e-6)
    assert result.output.max_abs_error == pytest.approx(float((actual - expected).abs().max()), rel=1e-3)
    assert result.output.psnr_db is None  # not an image
    assert result.restored_exactly is True


def test_psnr_for_image_outputs_and_run_callable():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    latent = torch.randn(1, 4, 8, 8)
    result = fp8ctx.report(decoder, run=lambda m: {"sample": m(latent)}, granularity="channel")
    with torch.no_grad():
        expected, actual = decoder(latent).double(), fake_quantized_copy(decoder, "channel")(latent).double()
    peak = float(expected.max() - expected.min())
    psnr = 10 * math.log10(peak**2 / float((actual - expected).square().mean()))
    assert result.output.psnr_db == pytest.approx(psnr, abs=1e-3)


def test_a_corrupted_restore_is_reported(monkeypatch):
    from fp8ctx import _swap

    model, x = model_and_input()
    real = _swap._follow_conversion

    def sabotage(original, current, *layout):
        real(original, current, *layout)
        with torch.no_grad():
            original.view(-1)[0] += 1  # what a buggy restore would do

    monkeypatch.setattr(_swap, "_follow_conversion", sabotage)
    assert fp8ctx.report(model, x).restored_exactly is False


def test_models_in_training_mode_are_compared_in_eval_mode_and_left_in_their_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    model[1].register_buffer("complex_state", torch.randn(3, dtype=torch.complex128))  # any buffer dtype
    x = torch.randn(8, 16)
    before = snapshot(model)
    result = fp8ctx.report(model, x, granularity="channel")
    assert result.restored_exactly is True  # the batch-norm statistics did not move
    assert_restored(model, before)
    assert all(module.training for module in model.modules())
    with torch.no_grad():
        expected = fake_quantized_copy(model, "channel").eval()(x)
    assert result.output.cosine > 0.99  # no dropout noise in the comparison
    assert result.output.relative_l2 == pytest.approx(
        float((expected - model.eval()(x)).norm() / model(x).norm()), rel=1e-3
    )


def test_a_store_that_does_not_fit_is_refused_before_anything_runs():
    model, x = model_and_input()
    other = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 5), nn.Linear(5, 5)).to(torch.bfloat16)
    with pytest.raises(fp8ctx.FP8Error, match="3.weight"):
        fp8ctx.report(model, x, store=fp8ctx.FP8Store.from_module(other))
    narrower = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4)).to(torch.bfloat16)
    with pytest.raises(fp8ctx.FP8Error, match="2.weight"):
        fp8ctx.report(model, x, store=fp8ctx.FP8Store.from_module(narrower))
    with pytest.raises(fp8ctx.FP8Error, match="granularity"):
        fp8ctx.report(model, x, store=fp8ctx.FP8Store.from_module(model), granularity="block")


def test_to_dict_is_strict_json_when_a_weight_is_held_exactly():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.zero_()  # FP8 holds zeros exactly: infinite SQNR
    data = fp8ctx.report(model, torch.randn(2, 8)).to_dict()
    assert data["layers"][0]["sqnr_db"] is None and data["layers"][1]["sqnr_db"] > 20
    json.dumps(data, allow_nan=False)


def test_identical_all_zero_outputs_are_reported_as_identical():
    model = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    result = fp8ctx.report(model, torch.randn(3, 8))
    assert result.output.cosine == 1.0 and result.output.relative_l2 == 0.0


def test_table_html_dict_and_pandas():
    model, x = model_and_input()
    result = fp8ctx.report(model, x, granularity="block", block_size=16)
    text = str(result)
    assert "0.weight" in text and "SQNR dB" in text and "restored bit-exact after the block: yes" in text
    assert "<table>" in result._repr_html_() and "2.weight" in result._repr_html_()
    data = json.loads(json.dumps(result.to_dict()))
    assert {k: data["config"][k] for k in ("storage_dtype", "granularity", "block_size")} == {
        "storage_dtype": "float8_e4m3fn", "granularity": "block", "block_size": 16
    }
    assert fp8ctx.FP8Config.from_dict(data["config"]) == result.config  # the config's own serialization
    assert data["totals"]["fp8_bytes"] == result.fp8_bytes and len(data["layers"]) == 2
    pandas = pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame["name"]) == ["0.weight", "2.weight"]
    assert sum(name in result.table(max_rows=1) for name in ("0.weight", "2.weight")) == 1


def test_a_store_alone_reports_sizes():
    model, _ = model_and_input()
    store = fp8ctx.FP8Store.from_module(model)
    result = fp8ctx.report(store)
    assert result.fp8_bytes == store.nbytes and result.dense_bytes == store.dense_nbytes
    assert all(row.sqnr_db is None for row in result.layers)


# -- the report as a decision tool -----------------------------------------------------------------------


def sensitive_stack():
    """Linear layers; layer 2's first row is 1e5 times the rest and layer 3 ignores that channel: with one
    scale for the tensor, what reaches the output rounds into e4m3's subnormals (its SQNR looks fine)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)])
    with torch.no_grad():
        model[2].weight[0] *= 1e5
        model[3].weight[:, 0] = 0.0
    return model, torch.randn(6, 32)


def test_over_budget_the_report_proposes_the_planners_exclusion_and_it_holds():
    model, x = sensitive_stack()
    before = snapshot(model)
    result = fp8ctx.report(model, x, granularity="tensor", metric="cosine", max_error=1e-3)
    assert_restored(model, before)
    with torch.no_grad():
        expected = model(x).double()
        with fp8ctx.fp8_weights(model, granularity="tensor"):
            actual = model(x).double()
    worst = float((1 - torch.nn.functional.cosine_similarity(actual, expected, dim=1)).max())
    assert result.output_error == pytest.approx(worst, rel=1e-9) and worst > 1e-3
    assert result.verdict.line.startswith("verdict: OVER BUDGET — worst-sample cosine")
    assert "budget cosine 0.99900" in result.verdict.line and "20 dB" in result.verdict.line
    # the rows are worst first by the output error of each weight alone: the sensitive one leads
    assert result.worst(1)[0].name == "2.weight" and all(row.output_error is not None for row in result.layers)
    # the next line of code names the layers the planner keeps dense; running it meets the budget
    code = result.verdict.next_code
    assert code.startswith("with fp8ctx.fp8_weights(model, granularity='tensor', exclude=['")
    dense = eval(code[code.index("exclude=") + len("exclude="): code.index("]):") + 1])  # the list as written
    assert "2" in dense
    with torch.no_grad(), fp8ctx.fp8_weights(model, granularity="tensor", exclude=dense):
        planned = model(x).double()
    assert float((1 - torch.nn.functional.cosine_similarity(planned, expected, dim=1)).max()) <= 1e-3
    text = str(result)
    assert "verdict: OVER BUDGET" in text and "next: with fp8ctx.fp8_weights" in text


def test_within_budget_the_verdict_says_ok_and_rows_default_to_the_worst_by_sqnr():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(15)])
    result = fp8ctx.report(model, torch.randn(4, 16), metric="rel_l2", max_error=0.5)
    assert result.verdict.passed and result.verdict.line.startswith("verdict: OK — worst-sample relative L2")
    assert result.verdict.next_code == "with fp8ctx.fp8_weights(model):"
    assert all(row.output_error is None for row in result.layers)  # not measured unless asked or over budget
    shown = result.worst()
    assert len(shown) == fp8ctx._report.DEFAULT_ROWS == 12
    assert [r.sqnr_db for r in shown] == sorted(r.sqnr_db for r in result.layers)[:12]
    assert len(result.worst(None)) == 15 and "(12 of 15 weights shown" in result.table()
    assert result.table(None).count(".weight") == 15
    assert result.model_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert f"whole model: {fp8ctx._metrics.format_bytes(result.model_bytes)}" in str(result)
    asked = fp8ctx.report(model, torch.randn(4, 16), layer_errors=True)  # on request: measured, sorted by it
    errors = [row.output_error for row in asked.worst(None)]
    assert None not in errors and errors == sorted(errors, reverse=True)


def test_image_outputs_get_ssim_and_image_metrics_need_images():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    result = fp8ctx.report(decoder, torch.randn(2, 4, 16, 16), metric="psnr")
    assert 0.9 < result.output.ssim <= 1 and result.metric == "psnr" and "SSIM" in str(result)
    # the worst of two images: at least the batch's normalised MSE, at most twice it (same peak for both)
    batch = 10 ** (-result.output.psnr_db / 10)
    assert batch * (1 - 1e-6) <= result.output_error <= 2 * batch
    with pytest.raises(fp8ctx.FP8Error, match="needs image outputs"):
        fp8ctx.report(nn.Linear(4, 4), torch.randn(2, 4), metric="ssim")
    with pytest.raises(fp8ctx.FP8Error, match="metric must be one of"):
        fp8ctx.report(nn.Linear(4, 4), torch.randn(2, 4), metric="lpips")
