"""Property tests: random module trees, random options, random exception points.

Every property is checked against something fp8ctx does not compute itself: the snapshot of the module
taken before (conftest.assert_restored: same objects, same bits), an expected target set derived here from
the layer types and the exclude rules, and outputs of a twin model whose weights were replaced by
conftest.reference_qdq values and run plainly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import assert_restored, fake_quantized_copy, reference_qdq, snapshot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fp8ctx
import fp8ctx._plan
import fp8ctx._swap
from fp8ctx import DEFAULT_LAYERS, FP8Store, FP8Tensor, fp8_weights, functional_call

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STORAGE = (torch.float8_e4m3fn, torch.float8_e5m2)
GRANULARITIES = ("tensor", "channel", "block")
LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding, nn.LayerNorm)
LAYER_CHOICES = {
    "default": DEFAULT_LAYERS,
    "default+embedding": DEFAULT_LAYERS + (nn.Embedding,),
    "default+embedding+layernorm": DEFAULT_LAYERS + (nn.Embedding, nn.LayerNorm),
    "linear": (nn.Linear,),
    "linear+embedding": (nn.Linear, nn.Embedding),
    "all-convs": (nn.modules.conv._ConvNd,),  # a base class: every Conv and ConvTranspose
}
EXCEPTIONS = (ValueError, RuntimeError, KeyboardInterrupt)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- random module trees ------------------------------------------------------------------------------


def leaf_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """A small input that ``layer`` accepts, in its weight's dtype (read through the module, as a user would)."""
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Embedding):
        return torch.randint(0, layer.num_embeddings, (2, 3), generator=generator)
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (2, layer.in_features)
    elif isinstance(layer, nn.LayerNorm):
        shape = (2, *layer.normalized_shape)
    else:
        spatial = {nn.Conv1d: (5,), nn.Conv2d: (4, 4), nn.ConvTranspose1d: (3,), nn.ConvTranspose2d: (3, 3)}[type(layer)]
        shape = (1, layer.in_channels, *spatial)
    return torch.randn(shape, generator=generator).to(dtype)


class Tree(nn.Module):
    """A random tree under ``body`` plus optional root-level extras (tied twins, an LM head, a table), in a
    random order; forward runs every leaf once, on inputs fixed by ``seed``."""

    def __init__(self, body: nn.Module, extras: list[tuple[str, nn.Module]], body_position: int) -> None:
        super().__init__()
        extras = list(extras)
        extras.insert(min(body_position, len(extras)), ("body", body))
        for name, module in extras:
            self.add_module(name, module)

    def forward(self, seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return [layer(leaf_input(layer, generator)) for layer in self.modules() if isinstance(layer, LEAVES)]


@st.composite
def leaves(draw: st.DrawFn) -> nn.Module:
    kind = draw(st.sampled_from(LEAVES))
    dtype = draw(st.sampled_from(DTYPES))
    width = st.integers(1, 6)
    if kind is nn.Linear:
        layer: nn.Module = nn.Linear(draw(width), draw(width), bias=draw(st.booleans()))
    elif kind is nn.Embedding:
        layer = nn.Embedding(draw(st.integers(2, 9)), draw(width))
    elif kind is nn.LayerNorm:
        layer = nn.LayerNorm(draw(width))
    else:
        groups = draw(st.sampled_from([1, 1, 2]))
        channels = st.integers(1, 3).map(lambda c: c * groups)
        layer = kind(draw(channels), draw(channels), draw(st.integers(1, 3)), groups=groups, bias=draw(st.booleans()))
    if draw(st.integers(0, 9)) == 0:  # an all-zero weight: its scale is 1 and it must come back as exact zeros
        with torch.no_grad():
            layer.weight.zero_()
    return layer.to(dtype)


def trees(depth: int) -> st.SearchStrategy[nn.Module]:
    if depth == 0:
        return leaves()
    child = trees(depth - 1)
    return st.one_of(
        st.lists(child, min_size=1, max_size=3).map(lambda c: nn.Sequential(*c)),
        st.lists(child, min_size=1, max_size=3).map(nn.ModuleList),
        st.dictionaries(st.sampled_from(["enc", "dec", "mid", "up_1"]), child, min_size=1, max_size=3).map(nn.ModuleDict),
        leaves(),
    )


@st.composite
def models(draw: st.DrawFn) -> Tree:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    body = draw(trees(draw(st.integers(0, 3))))
    if draw(st.booleans()):  # tie Linear layers of equal shape and dtype: the same Parameter in several slots
        groups: dict[tuple[Any, ...], list[nn.Linear]] = {}
        for layer in body.modules():
            if isinstance(layer, nn.Linear):
                groups.setdefault((layer.in_features, layer.out_features, layer.weight.dtype), []).append(layer)
        for group in groups.values():
            for layer in group[1:]:
                layer.weight = group[0].weight
    extras: list[tuple[str, nn.Module]] = []
    linears = [layer for layer in body.modules() if isinstance(layer, nn.Linear)]
    if linears and draw(st.booleans()):  # a root-level twin sharing a Linear's weight (its own bias)
        source = draw(st.sampled_from(linears))
        twin = nn.Linear(source.in_features, source.out_features, bias=draw(st.booleans())).to(source.weight.dtype)
        twin.weight = source.weight
        extras.append(("twin", twin))
    if draw(st.booleans()):  # an LM head tied to an embedding table (of the body, or a new root-level one)
        embeddings = [layer for layer in body.modules() if isinstance(layer, nn.Embedding)]
        if embeddings and draw(st.booleans()):
            table = draw(st.sampled_from(embeddings))
        else:
            table = nn.Embedding(draw(st.integers(2, 9)), draw(st.integers(1, 6))).to(draw(st.sampled_from(DTYPES)))
            extras.append(("embed", table))
        head = nn.Linear(table.embedding_dim, table.num_embeddings, bias=False).to(table.weight.dtype)
        head.weight = table.weight
        extras.append(("head", head))
    extras = draw(st.permutations(extras))
    return Tree(body, extras, draw(st.integers(0, len(extras)))).eval()


# -- options and the expected target set, computed here ------------------------------------------------


@dataclasses.dataclass
class Options:
    storage_dtype: torch.dtype
    granularity: str
    block_size: int
    layers: str
    exclude: list[tuple[str, Any]]  # ("name", layer name) | ("children", layer name) | ("type", class) | ("all", "*")
    exclude_form: str  # "single" or "list"
    originals: str

    def exclude_argument(self) -> Any:
        rules: list[Any] = []
        for kind, value in self.exclude:
            if kind == "name":
                rules.append(value)
            elif kind == "children":
                rules.append(value + ".*")
            elif kind == "type":
                rules.append(lambda name, layer, cls=value: type(layer) is cls)
            else:
                rules.append("*")
        if not rules:
            return None
        return rules[0] if self.exclude_form == "single" and len(rules) == 1 else rules

    def kwargs(self) -> dict[str, Any]:
        return dict(
            storage_dtype=self.storage_dtype,
            granularity=self.granularity,
            block_size=self.block_size,
            layers=LAYER_CHOICES[self.layers],
            exclude=self.exclude_argument(),
        )

    def excludes(self, name: str, layer: nn.Module) -> bool:
        for kind, value in self.exclude:
            if kind == "all":
                return True
            if kind == "name" and (name == value or name.startswith(value + ".")):
                return True
            if kind == "children" and name.startswith(value + "."):
                return True
            if kind == "type" and type(layer) is value:
                return True
        return False


@st.composite
def options(draw: st.DrawFn, model: nn.Module) -> Options:
    names = [name for name, _ in model.named_modules() if name]
    # "x.*" names x's children: a leaf has none, and an exclusion that names nothing raises
    parents = [name for name, module in model.named_modules() if name and next(module.children(), None) is not None]
    rule = st.one_of(
        st.tuples(st.just("name"), st.sampled_from(names)),
        *([st.tuples(st.just("children"), st.sampled_from(parents))] if parents else []),
        st.tuples(st.just("type"), st.sampled_from(LEAVES)),
        st.tuples(st.just("all"), st.just("*")),
    )
    exclude = draw(st.lists(rule, max_size=3)) if draw(st.booleans()) else []
    if any(kind == "all" for kind, _ in exclude) and draw(st.integers(0, 3)):
        exclude = [r for r in exclude if r[0] != "all"]  # excluding everything is rarely interesting
    return Options(
        storage_dtype=draw(st.sampled_from(STORAGE)),
        granularity=draw(st.sampled_from(GRANULARITIES)),
        block_size=draw(st.sampled_from([1, 2, 3, 4, 128])),
        layers=draw(st.sampled_from(sorted(LAYER_CHOICES))),
        exclude=exclude,
        exclude_form=draw(st.sampled_from(["single", "list"])),
        originals=draw(st.sampled_from(["cpu", "keep"])),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[Tree, Options]:
    model = draw(models())
    return model, draw(options(model))


def slots(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    return [(m, a, p) for m in model.modules() for a, p in m._parameters.items() if p is not None]


def expected_targets(model: nn.Module, opts: Options) -> dict[int, int]:
    """id(weight) -> its channel axis, for every weight the options select (a tied weight once, and not at
    all when any layer sharing it is excluded)."""
    layers = LAYER_CHOICES[opts.layers]
    excluded = {id(p) for name, layer in model.named_modules() if opts.excludes(name, layer) for p in layer._parameters.values()}
    chosen: dict[int, int] = {}
    for name, layer in model.named_modules():
        weight = layer._parameters.get("weight")
        if weight is None or not isinstance(layer, layers) or id(weight) in excluded or id(weight) in chosen:
            continue
        chosen[id(weight)] = 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0
    return chosen


def reference_twin(model: nn.Module, targets: dict[int, int], opts: Options) -> nn.Module:
    """A deep copy whose selected weights hold reference_qdq values (the copy keeps ties: same memo)."""
    originals = {id(p): p for p in model.parameters()}
    memo: dict[int, Any] = {}
    twin = copy.deepcopy(model, memo)
    with torch.no_grad():
        for key, axis in targets.items():
            weight = memo[key]
            weight.copy_(reference_qdq(originals[key], opts.granularity, opts.block_size, opts.storage_dtype, axis))
    return twin


def canonical_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def describe(model: nn.Module, targets: dict[int, int]) -> None:
    """Hypothesis statistics (pytest --hypothesis-show-statistics): how often ties and exclusions occur."""
    counts: dict[int, int] = {}
    for _, _, param in slots(model):
        counts[id(param)] = counts.get(id(param), 0) + 1
    event(f"tied weights: {sum(n > 1 for n in counts.values()) > 0}")
    event(f"targets: {min(len(targets), 3)}{'+' if len(targets) > 3 else ''}")


def check_inside(model: nn.Module, before_slots, targets: dict[int, int], opts: Options, metadata) -> None:
    inside: dict[int, Any] = {}
    for module, attribute, original in before_slots:
        value = module._parameters[attribute]
        if id(original) in targets:
            assert isinstance(value, FP8Tensor), f"{type(module).__name__}.{attribute} is not held as FP8"
            assert value.qdata.dtype == opts.storage_dtype and value.fp8_layout.granularity == opts.granularity
            assert (value.dtype, value.shape, value.device) == (original.dtype, original.shape, original.device)
        else:
            assert value is original, f"{type(module).__name__}.{attribute} was swapped but is not a target"
        # a tied weight is one object inside too
        assert inside.setdefault(id(original), value) is value, "a tied weight came apart inside the block"
    reported = [(n, p.dtype, p.shape, p.device) for n, p in model.named_parameters(remove_duplicate=False)]
    assert reported == metadata


def planted(ending: str) -> BaseException | None:
    """A fresh exception object for the block body to raise (None: the block ends normally)."""
    makers = {"value_error": lambda: ValueError("body"), "runtime_error": lambda: RuntimeError("body")}
    makers["interrupt"] = KeyboardInterrupt
    return makers[ending]() if ending in makers else None


# -- properties ----------------------------------------------------------------------------------------


@settings(max_examples=250, **SETTINGS)
@given(case=cases(), ending=st.sampled_from(["normal", "value_error", "runtime_error", "interrupt"]))
def test_random_trees_fp8_inside_restored_exactly_after(case, ending):
    model, opts = case
    targets = expected_targets(model, opts)
    describe(model, targets)
    expected = reference_twin(model, targets, opts)(seed=1)
    before, before_slots = snapshot(model), slots(model)
    metadata = [(n, p.dtype, p.shape, p.device) for n, p in model.named_parameters(remove_duplicate=False)]
    names = canonical_names(model)
    raised, caught, outputs = planted(ending), None, []
    try:
        with fp8_weights(model, originals=opts.originals, **opts.kwargs()) as store:
            check_inside(model, before_slots, targets, opts, metadata)
            assert sorted(store) == sorted(names[key] for key in targets)
            with torch.no_grad():
                outputs = model(seed=1)
            if raised is not None:
                raise raised
    except BaseException as error:  # noqa: BLE001 - the property inspects what came out
        caught = error
    assert caught is raised
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same weights, so the same bits
    assert_restored(model, before)
    for (_, _, a), (module, attribute, original) in zip(before_slots, slots(model)):
        assert a is original and module._parameters[attribute] is original


@settings(max_examples=250, **SETTINGS)
@given(
    case=cases(),
    point=st.sampled_from(["quantize", "offload", "forward", "body"]),
    kind=st.sampled_from(EXCEPTIONS),
    k=st.integers(1, 5),
    data=st.data(),
)
def test_random_exception_points_propagate_and_restore(case, point, kind, k, data):
    model, opts = case
    targets = expected_targets(model, opts)
    calls = {"n": 0}
    raised = kind(f"planted at {point} #{k}")
    expect: BaseException | None = raised

    def on_kth_call(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise raised
            return real(*args, **kwargs)

        return wrapper

    patch: Any = contextlib.nullcontext()
    if point == "quantize":  # the k-th weight fails to quantize: k-1 weights are swapped in already
        patch = mock.patch.object(fp8ctx._plan, "quantize_target", on_kth_call(fp8ctx._plan.quantize_target))
        expect = raised if k <= len(targets) else None
    elif point == "offload":  # fails right after the k-th weight's slots were swapped
        patch = mock.patch.object(fp8ctx._swap.Journal, "offload", on_kth_call(fp8ctx._swap.Journal.offload))
        expect = raised if opts.originals == "cpu" and k <= len(targets) else None
    elif point == "forward":
        leaves_in_order = [layer for layer in model.modules() if isinstance(layer, LEAVES)]
        victim = data.draw(st.sampled_from(leaves_in_order), label="victim")

        def fail(module, args):
            raise raised

        victim.register_forward_pre_hook(fail)
    before = snapshot(model)
    caught = None
    try:
        with patch:
            with fp8_weights(model, originals=opts.originals, **opts.kwargs()):
                with torch.no_grad():
                    model(seed=2)
                if point == "body":
                    raise raised
    except BaseException as error:  # noqa: BLE001
        caught = error
    event(f"exception expected: {expect is not None}")
    assert caught is expect, f"expected {expect!r}, got {caught!r}"
    assert_restored(model, before)


@settings(max_examples=120, **SETTINGS)
@given(case=cases(), fails=st.booleans())
def test_functional_call_on_random_trees_leaves_the_module_untouched(case, fails):
    model, opts = case
    store = FP8Store.from_module(model, **opts.kwargs())
    targets = expected_targets(model, opts)
    assert sorted(store) == sorted(canonical_names(model)[key] for key in targets)
    expected = reference_twin(model, targets, opts)(seed=3)
    if fails:
        last = [layer for layer in model.modules() if isinstance(layer, LEAVES)][-1]
        last.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("in forward")))
    before = snapshot(model)
    params = [(p, p.data_ptr()) for p in model.parameters()]
    if fails:
        with pytest.raises(RuntimeError, match="in forward"):
            functional_call(model, store, (3,))
    else:
        with torch.no_grad():
            outputs = functional_call(model, store, (), {"seed": 3})
        for out, ref in zip(outputs, expected, strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert_restored(model, before)
    assert [(p, p.data_ptr()) for p in model.parameters()] == params
    assert all(p is q and ptr == q.data_ptr() for (p, ptr), q in zip(params, model.parameters()))


ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity)


@settings(max_examples=150, **SETTINGS)
@given(
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=6),
    activations=st.lists(st.sampled_from(ACTIVATIONS), min_size=5, max_size=5),
    dtype=st.sampled_from(DTYPES),
    storage_dtype=st.sampled_from(STORAGE),
    granularity=st.sampled_from(GRANULARITIES),
    block_size=st.sampled_from([1, 3, 8, 128]),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sequential_mlp_matches_fake_quantized_reference(
    widths, activations, dtype, storage_dtype, granularity, block_size, grad, seed
):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(fan_in, fan_out, bias=bool(i % 2)), activations[i]()]
    model = nn.Sequential(*layers).to(dtype)
    reference = fake_quantized_copy(model, granularity, block_size, storage_dtype)
    x = torch.randn(3, widths[0]).to(dtype)
    x_ref, x_fp8 = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        expected = reference(x_ref)
        before = snapshot(model)
        with fp8_weights(model, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size):
            out = model(x_fp8)
            if grad:
                out.float().square().sum().backward()
        if grad:
            expected.float().square().sum().backward()
    torch.testing.assert_close(out, expected)
    if grad:
        torch.testing.assert_close(x_fp8.grad, x_ref.grad)
    assert_restored(model, before)
