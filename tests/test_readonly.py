"""`_readonly`: the write-refusal policy on its own — a read-only view reads like the tensor it marks, and every
kind of write into it (or into a view of it) raises naming the weight, while plain tensors are left alone."""

from __future__ import annotations

import pytest
import torch

from fp8ctx import FP8Error
from fp8ctx._readonly import ReadOnlyView, read_only

WRITES = {
    "add_": lambda t: t.add_(1.0),
    "setitem": lambda t: t.__setitem__(0, 5.0),
    "iadd": lambda t: t.__iadd__(1.0),
    "out=": lambda t: torch.add(torch.ones(t.shape), 1.0, out=t),
    "data=": lambda t: setattr(t, "data", torch.zeros(t.shape)),
    "copy_": lambda t: t.copy_(torch.zeros(t.shape)),
}


def test_reads_give_the_values_and_share_the_storage():
    values = torch.arange(6.0).reshape(2, 3)
    view = read_only(values, "fc.weight")
    assert type(view) is ReadOnlyView and view.param_name == "fc.weight"
    assert view.data_ptr() == values.data_ptr() and torch.equal(view, values)
    assert torch.equal(view.sum(), values.sum()) and type(view + 1) is torch.Tensor  # new values are plain


@pytest.mark.parametrize("derive", [lambda t: t, lambda t: t.T, lambda t: t[1], lambda t: t.view(-1).view(3, 2)], ids=["itself", "T", "row", "view-of-view"])
@pytest.mark.parametrize("write", list(WRITES))
def test_writes_into_a_view_or_a_view_of_it_raise_naming_the_weight(write, derive):
    values = torch.arange(6.0).reshape(2, 3)
    target = derive(read_only(values, "fc.weight"))
    with pytest.raises(FP8Error, match="'fc.weight'.*held as FP8"):
        WRITES[write](target)
    assert torch.equal(values, torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("write", list(WRITES))
def test_plain_tensors_stay_writable(write):
    values = torch.arange(6.0).reshape(2, 3)
    WRITES[write](values)  # no error: the policy only concerns held weights
    read_only(values.clone(), "other").sum()  # and a read-only view elsewhere changes nothing here
