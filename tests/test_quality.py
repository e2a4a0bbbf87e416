"""Output quality metrics: per-sample errors against hand computation, image metrics, combining layers."""

from __future__ import annotations

import math

import pytest
import torch

from fp8ctx import FP8Error
from fp8ctx._quality import combine, describe, metric_value, sample_errors


def test_rel_l2_and_cosine_per_sample_by_hand():
    expected = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    actual = torch.tensor([[3.0, 4.0, 5.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert sample_errors(actual, expected, "rel_l2").tolist() == [1.0, math.sqrt(2), 0.0]
    cosine = sample_errors(actual, expected, "cosine")
    assert cosine.tolist() == pytest.approx([1 - 5 / math.sqrt(50) / 1, 1.0, 0.0])  # zeros vs zeros: same sample
    # a 1-D output is one sample; a 3-D one is flattened per item of the first axis
    assert sample_errors(actual[0], expected[0], "rel_l2").tolist() == [1.0]
    assert sample_errors(actual.reshape(3, 1, 3), expected.reshape(3, 1, 3), "rel_l2").tolist() == [1.0, math.sqrt(2), 0.0]


def test_psnr_per_image_by_hand_and_video_frames_are_samples():
    torch.manual_seed(0)
    expected = torch.rand(2, 3, 16, 16)
    noise = torch.stack([torch.full((3, 16, 16), 0.01), torch.full((3, 16, 16), 0.1)])
    errors = sample_errors(expected + noise, expected, "psnr")
    peak = float(expected.max() - expected.min())
    by_hand = [10 * math.log10(peak**2 / 0.01**2), 10 * math.log10(peak**2 / 0.1**2)]
    assert [metric_value(float(e), "psnr") for e in errors] == pytest.approx(by_hand, abs=1e-4)
    video = expected.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # (B, C, T, H, W)
    assert sample_errors(video + noise.unsqueeze(2), video, "psnr").tolist() == pytest.approx(
        errors.repeat_interleave(2).tolist()
    )
    assert sample_errors(expected, expected, "psnr").tolist() == [0.0, 0.0]


def test_ssim_is_one_for_the_same_image_and_falls_with_noise():
    torch.manual_seed(0)
    expected = torch.rand(1, 3, 32, 32)
    small, large = (sample_errors(expected + s * torch.randn_like(expected), expected, "ssim") for s in (0.01, 0.2))
    assert sample_errors(expected, expected, "ssim").tolist() == pytest.approx([0.0], abs=1e-6)
    assert 0 < float(small) < float(large) <= 1


def test_image_metrics_need_images_and_the_same_shape():
    with pytest.raises(FP8Error, match="needs image outputs.*use metric='rel_l2'"):
        sample_errors(torch.ones(4, 8), torch.ones(4, 8), "psnr")
    with pytest.raises(FP8Error, match="at least 11 x 11"):
        sample_errors(torch.ones(1, 3, 8, 8), torch.ones(1, 3, 8, 8), "ssim")
    with pytest.raises(FP8Error, match="changed shape"):
        sample_errors(torch.ones(4), torch.ones(5), "cosine")


def test_errors_combine_in_power_and_read_back_in_the_metrics_scale():
    errors = torch.tensor([[0.3, 0.1], [0.4, 0.1]], dtype=torch.float64)
    assert combine(errors, "rel_l2").tolist() == pytest.approx([0.5, math.sqrt(0.02)])
    assert combine(errors, "cosine").tolist() == pytest.approx([0.7, 0.2])
    assert metric_value(0.001, "cosine") == 0.999 and metric_value(1e-4, "psnr") == 40.0
    assert describe(1e-4, "psnr") == "PSNR 40.0 dB" and describe(0.0, "psnr") == "PSNR inf dB"
