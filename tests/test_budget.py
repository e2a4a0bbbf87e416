"""`fp8ctx.plan`: the error budget, its verification by held runs, the plan as an exclusion; MiniLM's real weights."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, snapshot
from torch import nn

import _minilm
import fp8ctx
from fp8ctx import FP8Error, FP8Tensor, fp8_weights


def stack():
    """Six Linear layers after an embedding; layer 3's first row is 1e5 times larger than the rest, and layer 4
    ignores that channel: with one FP8 scale for the tensor the rest of layer 3, which is what reaches the
    output, falls into e4m3's subnormals (while its SQNR, dominated by the outlier row, looks fine)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), *[nn.Sequential(nn.Linear(32, 32)) for _ in range(6)])
    with torch.no_grad():
        model[3][0].weight[0] *= 1e5
        model[4][0].weight[:, 0] = 0.0
    return model, torch.randint(0, 64, (8, 5))


def measured(model, ids, **options):
    """Worst-sample 1 - cosine of the model's output with ``options`` held, against the plain run."""
    with torch.no_grad():
        expected = model(ids).flatten(1).double()
        with fp8_weights(model, **options) as store:
            actual = model(ids).flatten(1).double()
    return float((1 - torch.nn.functional.cosine_similarity(actual, expected, dim=1)).max()), store


def test_the_plan_keeps_the_sensitive_layer_dense_and_its_error_is_measured():
    model, ids = stack()
    before = snapshot(model)
    chosen = fp8ctx.plan(model, ids, max_error=1e-3, granularity="tensor")
    assert_restored(model, before)
    assert "3.0.weight" in chosen.dense and "0.weight" in chosen.held  # embedding tables are candidates
    error, store = measured(model, ids, exclude=chosen, granularity="tensor")  # exclude=plan: the plan's weights
    assert sorted(store) == sorted(chosen.held) and "0.weight" in store
    assert error == pytest.approx(chosen.measured_error, rel=1e-9, abs=1e-15) and error <= 1e-3
    assert chosen.saved_bytes == sum(e.numel() * 4 - e.nbytes for e in store.values())
    assert chosen.model_bytes == sum(p.numel() * 4 for p in model.parameters())
    # the largest such set along the curve: holding one weight more breaks the budget (measured)
    k = len(chosen.held)
    assert k < len(chosen.curve) - 1 and chosen.curve[k + 1].measured_error > 1e-3
    with fp8_weights(model, config=chosen.config) as same:  # the plan as one config (granularity included)
        assert sorted(same) == sorted(store)


def test_the_curve_covers_every_count_and_grows_in_bytes():
    model, ids = stack()
    chosen = fp8ctx.plan(model, ids, max_error=1e-3, metric="cosine", granularity="channel")
    assert [point.held for point in chosen.curve] == list(range(8))
    saved = [point.saved_bytes for point in chosen.curve]
    assert saved == sorted(saved) and saved[-1] == sum(row.saved_bytes for row in chosen.sensitivity.rows)
    assert chosen.curve[0].measured_error == 0.0
    assert [p.predicted_error for p in chosen.curve] == sorted(p.predicted_error for p in chosen.curve)
    assert len(chosen.to_pandas()) == 8 and "kept dense" in str(chosen) and "<table>" in chosen._repr_html_()


def test_budget_extremes_and_a_users_own_exclusion():
    model, ids = stack()
    nothing = fp8ctx.plan(model, ids, max_error=0.0)
    assert nothing.held == () and nothing.saved_bytes == 0
    with fp8_weights(model, exclude=nothing) as store:
        assert len(store) == 0
    everything = fp8ctx.plan(model, ids, max_error=1.0, metric="rel_l2", exclude="6")
    assert len(everything.held) == 6 and "6.0.weight" not in everything.held and everything.exclude == ("6",)
    error, store = measured(model, ids, exclude=everything)
    assert sorted(store) == sorted(everything.held)
    with fp8_weights(model, exclude=everything, layers=nn.Linear) as store:  # layers= given: it wins
        assert "0.weight" not in store and not isinstance(model[0].weight, FP8Tensor)


@pytest.mark.parametrize(
    "options,message",
    [({"max_error": -1}, "max_error must be a number"), ({"max_error": "1%"}, "max_error must be a number"),
     ({"max_error": 0.1, "metric": "psnr"}, "needs image outputs"), ({"max_error": 0.1, "metric": "l1"}, "metric must be")],
)
def test_bad_budgets_and_metrics_raise(options, message):
    model, ids = stack()
    before = snapshot(model)
    with pytest.raises(FP8Error, match=message):
        fp8ctx.plan(model, ids, **options)
    assert_restored(model, before)


def test_image_metrics_plan_a_decoder():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                            nn.Conv2d(16, 3, 3, padding=1))
    latent = torch.randn(2, 4, 16, 16)
    for metric, budget in (("psnr", 10 ** (-45 / 10)), ("ssim", 1e-4)):
        chosen = fp8ctx.plan(decoder, latent, metric=metric, max_error=budget)
        assert chosen.measured_error <= budget and chosen.metric == metric


# -- real weights: the trained all-MiniLM-L6-v2 -----------------------------------------------------------


def cosines(model, batch, **options):
    with torch.no_grad():
        expected = _minilm.embed(model, batch)
        with fp8_weights(model, **options) as store:
            actual = _minilm.embed(model, batch)
    return torch.nn.functional.cosine_similarity(actual, expected, dim=-1), store


def test_minilm_plan_reaches_the_accuracy_target_and_saves_over_a_third_of_the_model():
    model, batch = _minilm.load()
    default, _ = cosines(model, batch)  # every Linear in FP8: short of the target on these sentences
    assert not (default.mean() >= 0.9990 and default.min() >= 0.9950)
    chosen = fp8ctx.plan(model, run=lambda m: _minilm.embed(m, batch), metric="cosine", max_error=0.001)
    planned, store = cosines(model, batch, exclude=chosen)  # every sentence within the budget: min >= 0.999
    assert planned.mean() >= 0.9990 and planned.min() >= 0.9950 and planned.min() >= 1 - 0.001 - 1e-6
    whole = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    saved = sum(entry.numel() * 4 - entry.nbytes for entry in store.values())
    assert "embeddings.word_embeddings.weight" in store
    assert saved / whole >= 0.35 and saved == chosen.saved_bytes and chosen.model_bytes == whole
