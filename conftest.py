"""Doctest namespace: the docstring examples use `torch` and `fp8ctx` without importing them."""

import pytest
import torch

import fp8ctx


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, fp8ctx=fp8ctx)
