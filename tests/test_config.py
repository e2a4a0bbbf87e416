"""`FP8Config`: fields checked and normalised once, the layout it gives, and its one serialization."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fp8ctx import DEFAULT_LAYERS, FP8Config, FP8Error
from fp8ctx._layout import FP8Layout as SchemeLayout
from fp8ctx._layout import Granularity


def test_fields_are_normalised_once():
    config = FP8Config(storage_dtype="e5m2", granularity="channel", layers=nn.Linear, exclude="head")
    assert config.storage_dtype == torch.float8_e5m2 and config.granularity is Granularity.CHANNEL
    assert config.layers == (nn.Linear,) and config.exclude == ("head",)
    assert config == FP8Config(torch.float8_e5m2, Granularity.CHANNEL, layers=[nn.Linear], exclude=["head"])
    assert FP8Config().layers == DEFAULT_LAYERS and FP8Config().exclude == () and FP8Config().compute == "weight_only"


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"granularity": "row"}, "granularity"),
        ({"storage_dtype": torch.int8}, "storage_dtype"),
        ({"block_size": True}, "block_size"),
        ({"layers": ()}, "layers"),
        ({"exclude": [1.5]}, "exclude"),
        ({"compute": "int8"}, "compute"),
        ({"compute": "fp8", "granularity": "block"}, "compute='fp8'.*granularity"),
        ({"compute": "fp8", "storage_dtype": torch.float8_e5m2}, "compute='fp8'.*float8_e5m2"),
    ],
    ids=["granularity", "storage_dtype", "block_size-bool", "layers-empty", "exclude-float", "compute", "fp8-block", "fp8-e5m2"],
)
def test_bad_fields_raise_naming_the_field(fields, match):
    with pytest.raises(FP8Error, match=match):
        FP8Config(**fields)
    with pytest.raises(FP8Error, match=match):
        FP8Config().replace(**fields)


def test_layout_is_the_scheme_of_one_weight():
    layout = FP8Config(storage_dtype="e5m2", granularity="block", block_size=32).layout(channel_axis=1)
    assert isinstance(layout, SchemeLayout)
    assert (layout.granularity, layout.block_size, layout.channel_axis, layout.storage_dtype) == (
        Granularity.BLOCK, 32, 1, torch.float8_e5m2
    )
    # the config's default is per-channel scales (measured most accurate for their cost, docs/accuracy.md)
    assert FP8Config().layout() == SchemeLayout(granularity="channel")


class LocalLayer(nn.Linear):
    pass


def test_to_dict_from_dict_round_trip_through_json():
    config = FP8Config(
        storage_dtype=torch.float8_e5m2,
        granularity="block",
        block_size=64,
        layers=DEFAULT_LAYERS + (nn.Embedding, LocalLayer),
        exclude=("decoder.conv_out", "*.lm_head"),
        compute="weight_only",
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["storage_dtype"] == "float8_e5m2" and data["granularity"] == "block"
    assert "torch.nn.modules.sparse:Embedding" in data["layers"] and f"{__name__}:LocalLayer" in data["layers"]
    assert FP8Config.from_dict(data) == config
    assert FP8Config.from_dict({"granularity": "channel"}) == FP8Config(granularity="channel")  # the rest: defaults
    assert FP8Config.from_dict(FP8Config(compute="fp8").to_dict()).compute == "fp8"


def test_from_dict_refuses_what_it_cannot_restore_or_check():
    with_predicate = FP8Config(exclude=["head", lambda name, layer: False]).to_dict()
    assert with_predicate["exclude"][0] == "head" and "predicate" in with_predicate["exclude"][1]
    with pytest.raises(FP8Error, match="predicate.*pass exclude= again"):
        FP8Config.from_dict(with_predicate)
    with pytest.raises(FP8Error, match="no field.*'scale'"):
        FP8Config.from_dict({"scale": 2})
    with pytest.raises(FP8Error, match="not an nn.Module type among the loaded modules"):
        FP8Config.from_dict({"layers": ["no_such_module_anywhere:Linear"]})
    with pytest.raises(FP8Error, match="not an nn.Module type"):
        FP8Config.from_dict({"layers": ["torch:Tensor"]})
    with pytest.raises(FP8Error, match="layers must be a list"):
        FP8Config.from_dict({"layers": "torch.nn.modules.linear:Linear"})
    with pytest.raises(FP8Error, match="block_size"):
        FP8Config.from_dict({"block_size": -1})
    with pytest.raises(FP8Error, match="mapping"):
        FP8Config.from_dict([("granularity", "tensor")])
