"""The report's measurements: weight error by hand, output comparison, and the bit-level fingerprint."""

from __future__ import annotations

import math

import torch
from torch import nn

from fp8ctx._metrics import compare_outputs, fingerprint, weight_error


def test_weight_error_by_hand():
    original = torch.tensor([3.0, 4.0])  # signal power 25
    sqnr, relative = weight_error(original, torch.tensor([3.0, 3.0]))  # noise power 1
    assert sqnr == 10 * math.log10(25) and relative == 0.2
    assert weight_error(original, original.clone()) == (math.inf, 0.0)


def test_compare_outputs_by_hand_and_psnr_only_for_images():
    expected = torch.tensor([1.0, 0.0, -1.0, 0.0])
    out = compare_outputs(expected + torch.tensor([0.0, 0.5, 0.0, 0.0]), expected)
    assert out.relative_l2 == 0.5 / math.sqrt(2) and out.max_abs_error == 0.5 and out.psnr_db is None
    image = torch.zeros(1, 1, 2, 2)
    image[0, 0, 0, 0] = 2.0
    noisy = image.clone()
    noisy[0, 0, 1, 1] = 0.25  # mse 0.25² / 4, peak 2: PSNR 10 log10(4 / mse) = 10 log10(256)
    assert math.isclose(compare_outputs(noisy, image).psnr_db, 10 * math.log10(256))


def test_fingerprint_sees_a_flipped_bit_and_values_moved_around():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    before = fingerprint(model)
    assert fingerprint(model) == before
    with torch.no_grad():
        bits = model.weight.view(-1).view(torch.int32)
        bits[5] ^= 1  # the lowest mantissa bit of one value
    assert fingerprint(model) != before
    with torch.no_grad():
        bits[5] ^= 1
        model.weight[[0, 1]] = model.weight[[1, 0]].clone()  # same values, other places
    assert fingerprint(model) != before
