"""`_ops`: which calls take a layer's dedicated FP8 path (the weight argument is the call's only FP8 weight),
and that every other call involving an FP8 weight still computes on its dequantized values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_qdq

from fp8ctx import FP8Layout, FP8Tensor, kernels

CHANNEL = FP8Layout("channel")


def fp8(weight: torch.Tensor, name: str = "w") -> FP8Tensor:
    return FP8Tensor.from_dense(weight, CHANNEL, name=name)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """The names of the kernels entry points called (they still run)."""
    calls: list[str] = []
    for name in ("linear", "embedding"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def test_linear_with_an_fp8_weight_takes_the_kernel_path_positional_or_keyword(kernel_calls):
    torch.manual_seed(0)
    weight, x, bias = torch.randn(6, 5), torch.randn(3, 5), torch.randn(6)
    dense = reference_qdq(weight, "channel")
    cases = [
        (F.linear(x, fp8(weight), bias), F.linear(x, dense, bias)),
        (F.linear(x, weight=fp8(weight), bias=bias), F.linear(x, dense, bias)),
        (F.linear(input=x, weight=fp8(weight)), F.linear(x, dense)),
    ]
    for out, expected in cases:
        assert type(out) is torch.Tensor and torch.equal(out, expected)
    assert kernel_calls == ["linear"] * 3


def test_an_fp8_tensor_outside_the_weight_argument_is_read_dequantized(kernel_calls):
    torch.manual_seed(0)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    dense_a, dense_b = reference_qdq(a, "channel"), reference_qdq(b, "channel")
    # as the input, as the bias, or as both input and weight: no dedicated path, the values are the same
    torch.testing.assert_close(F.linear(fp8(a), b), F.linear(dense_a, b), rtol=0, atol=0)
    torch.testing.assert_close(F.linear(a, b, fp8(b[0])), F.linear(a, b, reference_qdq(b[0], "channel")), rtol=0, atol=0)
    torch.testing.assert_close(F.linear(fp8(a), fp8(b)), F.linear(dense_a, dense_b), rtol=0, atol=0)
    assert kernel_calls == []


def test_conv_and_embedding_with_an_fp8_weight_compute_on_the_dequantized_weight(kernel_calls):
    torch.manual_seed(0)
    kernel, image = torch.randn(4, 3, 3, 3), torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(F.conv2d(image, fp8(kernel), padding=1), F.conv2d(image, reference_qdq(kernel, "channel"), padding=1), rtol=0, atol=0)
    table, ids = torch.randn(10, 4), torch.tensor([[1, 9], [0, 1]])
    assert torch.equal(F.embedding(ids, fp8(table)), reference_qdq(table, "channel")[ids])
    assert torch.equal(F.embedding(ids, weight=fp8(table)), reference_qdq(table, "channel")[ids])
    assert kernel_calls == ["embedding", "embedding"]


def test_numpy_and_tolist_give_the_dequantized_values():
    weight = torch.randn(3, 4)
    w = fp8(weight)
    assert torch.equal(torch.from_numpy(w.numpy()), reference_qdq(weight, "channel"))
    assert torch.equal(torch.tensor(torch.Tensor.tolist(w)), reference_qdq(weight, "channel"))


# -- outputs autograd can update in place ------------------------------------------------------------


class Embeds(torch.nn.Module):
    """A text model's embedding step: looked-up rows updated in place while autograd records."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(20, 8)
        self.positions = torch.nn.Embedding(6, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        if tie:
            self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor, image: torch.Tensor, update: str) -> torch.Tensor:
        rows = self.tokens(ids)
        if update == "+= positions":
            rows += self.positions(torch.arange(ids.shape[1])) * image
        elif update == "[mask] = image":
            rows[ids > 10] = image.expand_as(rows)[ids > 10]
        return self.head(rows)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "head tied to the table"])
@pytest.mark.parametrize("update", ["+= positions", "[mask] = image"])
def test_in_place_updates_of_looked_up_rows_are_recorded_by_autograd_as_without_fp8(update, tie):
    from conftest import fake_quantized_copy

    from fp8ctx import fp8_weights

    torch.manual_seed(0)
    net = Embeds(tie)
    layers = (torch.nn.Linear, torch.nn.Embedding)
    twin = fake_quantized_copy(net, "channel", layers=layers)
    ids = torch.randint(0, 20, (2, 6))
    image = torch.randn(1, 1, 8)
    grads = []
    for model, held in ((twin, False), (net, True)):
        source = image.clone().requires_grad_()
        if held:
            with fp8_weights(model, granularity="channel", layers=layers):
                out = model(ids, source, update)
        else:
            out = model(ids, source, update)
        out.square().sum().backward()
        grads.append((out.detach(), source.grad))
    (expected, expected_grad), (got, got_grad) = grads
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
