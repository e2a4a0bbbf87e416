"""Output quality of a run with FP8 weights against the plain run: one error per sample, for four metrics.

Each metric is an *error* (0 for identical outputs, larger is worse) so that sensitivity, the budget and
the report compare layers one way; :func:`metric_value` turns an error back into the metric's own scale.

========  =========================================  ==========================================
metric    error per sample                            shown as
========  =========================================  ==========================================
rel_l2    ``‖a − e‖ / ‖e‖``                           the same
cosine    ``1 − cos(a, e)``                           cosine similarity
psnr      ``MSE / range²`` (``10^(−PSNR/10)``)        PSNR in dB (torchmetrics)
ssim      ``1 − SSIM``                                SSIM (torchmetrics, Gaussian 11x11 window)
========  =========================================  ==========================================

A sample is one item of the output's first (batch) axis; an output of one dimension is one sample. PSNR and
SSIM need images ``(B, C, H, W)`` or videos ``(B, C, T, H, W)`` (frames are then samples), and torchmetrics
(``pip install "fp8ctx[metrics]"``); their data range is the range of the plain run's output.
"""

from __future__ import annotations

import math

import torch

from ._errors import FP8Error

__all__ = ["METRICS", "check_metric", "combine", "describe", "metric_value", "sample_errors"]

METRICS = ("rel_l2", "cosine", "psnr", "ssim")


def check_metric(metric: object) -> str:
    """``metric`` itself if it is one of :data:`METRICS`.

    Raises:
        FP8Error: anything else (lists the metrics).
    """
    if metric not in METRICS:
        raise FP8Error(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return str(metric)


@torch.no_grad()
def sample_errors(actual: torch.Tensor, expected: torch.Tensor, metric: str) -> torch.Tensor:
    """The error of each sample of ``actual`` against ``expected`` (float64, one per sample).

    Raises:
        FP8Error: shapes differ, or an image metric for an output that is not an image (or without torchmetrics).

    Example:
        >>> expected = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
        >>> sample_errors(expected * 2, expected, "cosine").tolist(), sample_errors(expected * 2, expected, "rel_l2").tolist()
        ([0.0, 0.0], [1.0, 1.0])
    """
    if actual.shape != expected.shape:
        raise FP8Error(f"the output changed shape with FP8 weights: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if metric in ("psnr", "ssim"):
        return _image_errors(actual, expected, metric)
    a, e = _rows(actual), _rows(expected)
    if metric == "rel_l2":
        norm = e.norm(dim=1)
        diff = (a - e).norm(dim=1)
        return torch.where(norm > 0, diff / norm.clamp_min(1e-300), diff)
    cosine = torch.nn.functional.cosine_similarity(a, e, dim=1, eps=1e-300)
    both_zero = ~a.any(dim=1) & ~e.any(dim=1)  # two all-zero samples are the same sample
    return torch.where(both_zero, torch.zeros_like(cosine), 1 - cosine)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().double()
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def _image_errors(actual: torch.Tensor, expected: torch.Tensor, metric: str) -> torch.Tensor:
    if expected.dim() not in (4, 5):
        raise FP8Error(
            f"metric={metric!r} needs image outputs (B, C, H, W) or videos (B, C, T, H, W), got shape "
            f"{tuple(expected.shape)}; use metric='rel_l2' or 'cosine'"
        )
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError:
        raise FP8Error(f"metric={metric!r} needs torchmetrics: pip install 'fp8ctx[metrics]'") from None
    a, e = _frames(actual), _frames(expected)
    low, high = float(e.min()), float(e.max())
    data_range = (high - low) or 1.0
    if metric == "psnr":
        mse = (a - e).square().flatten(1).mean(dim=1)
        # torchmetrics' PSNR, per frame; an identical frame has no noise (error 0, PSNR +inf)
        psnr = peak_signal_noise_ratio(a, e, data_range=data_range, reduction="none", dim=(1, 2, 3))
        return torch.where(mse > 0, torch.pow(10.0, -psnr / 10), torch.zeros_like(mse))
    if min(e.shape[-2:]) < 11:
        raise FP8Error(f"metric='ssim' needs images of at least 11 x 11 pixels, got {tuple(expected.shape)}")
    ssim = structural_similarity_index_measure(a, e, data_range=data_range, reduction="none")
    return (1 - ssim).clamp_min(0)


def _frames(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().double()
    if tensor.dim() == 5:  # (B, C, T, H, W): each frame an image
        tensor = tensor.transpose(1, 2).flatten(0, 1)
    return tensor


def combine(errors: torch.Tensor, metric: str) -> torch.Tensor:
    """The predicted error of several layers in FP8 at once, from each one's error alone (rows of ``errors``).

    Independent rounding noise adds in power: relative L2 errors add in quadrature; ``1 − cosine``, PSNR's
    normalised MSE and (to first order) ``1 − SSIM`` add.
    """
    if errors.numel() == 0:
        return torch.zeros(errors.shape[1:], dtype=torch.float64)
    if metric == "rel_l2":
        return errors.square().sum(dim=0).sqrt()
    return errors.sum(dim=0)


def metric_value(error: float, metric: str) -> float:
    """An error in the metric's own scale (cosine similarity, PSNR dB, SSIM; relative L2 as is).

    Example:
        >>> metric_value(1e-4, "psnr"), metric_value(0.002, "cosine")
        (40.0, 0.998)
    """
    if metric in ("cosine", "ssim"):
        return 1 - error
    if metric == "psnr":
        return math.inf if error <= 0 else round(-10 * math.log10(error), 12)
    return error


def describe(error: float, metric: str) -> str:
    """One error as a reader wants it: ``"cosine 0.99912"``, ``"PSNR 41.3 dB"``, ``"relative L2 2.1e-02"``."""
    value = metric_value(error, metric)
    if metric == "psnr":
        return "PSNR inf dB" if math.isinf(value) else f"PSNR {value:.1f} dB"
    if metric == "rel_l2":
        return f"relative L2 {value:.2e}"
    return f"{metric if metric == 'cosine' else 'SSIM'} {value:.5f}"
