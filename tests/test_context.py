"""`fp8_weights` and `functional_call`: what holds inside the block, on exit, and when entering fails."""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import pytest
import torch
from conftest import assert_restored, fake_quantized_copy, reference_qdq, relative_error, snapshot
from torch import nn

import fp8ctx
from fp8ctx import FP8Error, FP8Store, FP8Tensor, fp8_weights, functional_call

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]
GRANULARITIES = ["tensor", "channel", "block"]


class Toy(nn.Module):
    """Embedding, Conv1d, LayerNorm, ConvTranspose1d, Linear, and a head tied to the embedding."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.up = nn.ConvTranspose1d(16, 8, 2, stride=2)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.linspace(-1, 1, 16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.embed(ids)))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h) + self.offset
        h = self.up(h.transpose(1, 2)).transpose(1, 2)
        return self.proj(torch.relu(h))


class Pictures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv3d(8, 8, 1), nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body[1](self.body[0](x))
        h = self.body[2](h.unsqueeze(2)).squeeze(2)
        return self.body[3](h)


def toy(dtype=torch.bfloat16, device="cpu", tie=True) -> Toy:
    torch.manual_seed(0)
    return Toy(tie).to(device=device, dtype=dtype).eval()


def ids(device="cpu") -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)


def held(module: nn.Module, attribute: str = "weight") -> torch.Tensor:
    return module._parameters[attribute]


# -- inside the block ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_output_matches_fake_quantized_reference_and_differs_from_plain(granularity, dtype, device):
    model = toy(dtype, device)
    reference = fake_quantized_copy(model, granularity, block_size=8, layers=fp8ctx.DEFAULT_LAYERS + (nn.Embedding,))
    with torch.no_grad():
        plain, expected = model(ids(device)), reference(ids(device))
        with fp8_weights(model, granularity=granularity, block_size=8, layers=fp8ctx.DEFAULT_LAYERS + (nn.Embedding,)):
            out = model(ids(device))
    assert out.dtype == dtype
    if device == "cpu":  # same dense weights, same kernels: equal up to summation order
        torch.testing.assert_close(out, expected)
    else:  # the fused GPU kernel scales the fp32 accumulator instead of each weight: bf16 rounding apart
        assert relative_error(out, expected) < 1e-2
    assert relative_error(out, plain) > 1e-3, "nothing was quantized"


def test_conv2d_conv3d_and_grouped_convtranspose2d(device):
    torch.manual_seed(0)
    model = Pictures().to(device, torch.bfloat16)
    x = torch.randn(1, 3, 8, 8, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = fake_quantized_copy(model, "channel")(x)
        with fp8_weights(model, granularity="channel"):
            out = model(x)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_fp8_inside_and_report_original_metadata(dtype, device):
    model = toy(dtype, device)
    metadata = {n: (p.dtype, p.shape, p.device) for n, p in model.named_parameters()}
    with fp8_weights(model, granularity="channel") as store:
        for layer in (model.conv, model.up, model.proj, model.head):
            weight = held(layer)
            assert isinstance(weight, FP8Tensor) and weight.qdata.dtype == torch.float8_e4m3fn
            assert weight.scale.dtype == torch.float32
        assert not isinstance(held(model.norm), FP8Tensor) and not isinstance(held(model.proj, "bias"), FP8Tensor)
        assert {n: (p.dtype, p.shape, p.device) for n, p in model.named_parameters()} == metadata
        assert set(store) == {"embed.weight", "conv.weight", "up.weight", "proj.weight"}  # tied head -> embed.weight
        assert store.nbytes < sum(p.numel() * p.element_size() for p in model.parameters()) / 1.5


def test_tied_weight_stays_tied_inside_and_reads_give_dequantized_values():
    model = toy()
    expected = reference_qdq(model.embed.weight, "channel")  # bf16, rounded once like the layer's copy
    with fp8_weights(model, granularity="channel"):
        assert model.head.weight is model.embed.weight
        assert torch.equal(model.head.weight, expected)  # a read outside any layer's forward
        read = model.head.weight * 1
        assert type(read) is torch.Tensor and torch.equal(read, expected)
        assert torch.equal(torch.from_numpy(model.head.weight.float().numpy()), expected.float())
        assert torch.equal(model.head.weight @ torch.eye(16, dtype=torch.bfloat16), expected)  # any op
        assert torch.equal(model.embed(torch.tensor([3, 7])), expected[[3, 7]])  # gathered rows only
        assert torch.equal(model.head(torch.eye(16, dtype=torch.bfloat16)), expected.T)


def test_writes_into_held_weights_raise_instead_of_being_lost():
    model = toy()
    with fp8_weights(model):
        with pytest.raises(FP8Error, match="proj.weight"):
            with torch.no_grad():
                model.proj.weight.add_(1.0)
        with pytest.raises(FP8Error, match="proj.weight"):
            with torch.no_grad():
                model.proj.weight.copy_(torch.zeros(16, 8, dtype=torch.bfloat16))
        with pytest.raises(FP8Error, match="max_norm"):
            nn.functional.embedding(torch.tensor([1]), model.embed.weight, max_norm=1.0)


def _track_dense_copies(monkeypatch) -> dict[str, int]:
    """Count dense weight copies alive at the moment each new one is made."""
    from fp8ctx import _numerics

    alive: list[weakref.ref] = []
    stats = {"made": 0, "most_alive_before_new": 0}
    real = _numerics.dequantize

    def counting(*args, **kwargs):
        living = sum(ref() is not None for ref in alive)
        stats["most_alive_before_new"] = max(stats["most_alive_before_new"], living)
        out = real(*args, **kwargs)
        alive.append(weakref.ref(out))
        stats["made"] += 1
        return out

    monkeypatch.setattr(_numerics, "dequantize", counting)
    return stats


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_at_most_one_dense_copy_alive_at_a_time(grad, monkeypatch):
    model = toy(torch.float32, tie=False)
    stats = _track_dense_copies(monkeypatch)
    x = model.embed(ids()).detach().requires_grad_(grad)
    with fp8_weights(model):
        with torch.set_grad_enabled(grad):
            out = model.features(x)
            if grad:
                out.sum().backward()
    assert stats["made"] >= 3  # conv, up, proj (twice each with backward)
    assert stats["most_alive_before_new"] == 0, stats


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradients_flow_to_inputs_not_to_weights(granularity):
    model = toy(torch.float32, tie=False)
    reference = fake_quantized_copy(model, granularity, block_size=8)
    x = model.embed(ids()).detach()
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference.features(x_ref).square().sum().backward()
    with fp8_weights(model, granularity=granularity, block_size=8):
        model.features(x_fp8).square().sum().backward()
        assert held(model.proj).grad is None
    torch.testing.assert_close(x_fp8.grad, x_ref.grad)
    assert model.proj.weight.grad is None and model.conv.weight.grad is None
    assert model.proj.bias.grad is not None  # biases stay ordinary parameters


# -- exit, always exact --------------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("originals", ["cpu", "keep"])
@pytest.mark.parametrize(
    "ending", ["normal", "exception", "keyboard_interrupt", "error_inside_layer"]
)
def test_exit_restores_exactly_whatever_ends_the_block(ending, originals, device):
    model = toy(device=device)
    user_calls = []
    model.proj.register_forward_hook(lambda m, a, o: user_calls.append("hook"))
    real_forward = model.norm.forward
    model.norm.forward = lambda x: (user_calls.append("override"), real_forward(x))[1]  # accelerate-style
    if ending == "error_inside_layer":
        model.up.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(Boom("mid-forward")))
    before = snapshot(model)
    raised = {"exception": Boom("user"), "keyboard_interrupt": KeyboardInterrupt()}.get(ending)
    caught = None
    try:
        with fp8_weights(model, originals=originals):
            model(ids(device))
            if raised is not None:
                raise raised
    except BaseException as error:  # noqa: BLE001 - the test inspects what came out
        caught = error
    if ending == "normal":
        assert caught is None
    elif ending == "error_inside_layer":
        assert isinstance(caught, Boom) and str(caught) == "mid-forward"
    else:
        assert caught is raised  # propagates unchanged
    assert_restored(model, before)
    assert model.head.weight is model.embed.weight
    assert "override" in user_calls and ("hook" in user_calls or ending == "error_inside_layer")
    user_calls.clear()
    model(ids(device)) if ending != "error_inside_layer" else None
    assert user_calls == ([] if ending == "error_inside_layer" else ["override", "hook"])


def test_originals_keep_reattaches_the_same_storage():
    model = toy()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with fp8_weights(model, originals="keep"):
        pass
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory is only freed on an accelerator")
def test_originals_cpu_frees_device_memory_and_restores_bits():
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)]).cuda().bfloat16()
    before = snapshot(model)
    torch.cuda.synchronize()
    dense = torch.cuda.memory_allocated() - base
    with fp8_weights(model) as store:
        torch.cuda.synchronize()
        inside = torch.cuda.memory_allocated() - base
        model(torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16))
    del store
    assert dense >= 8 * 1024 * 1024 * 2
    assert inside <= dense * 0.55  # FP8 is half of bf16; the originals live in pinned host memory
    assert_restored(model, before)


# -- entering fails cleanly ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        ({"granularity": "row"}, "granularity"),
        ({"storage_dtype": torch.int8}, "storage_dtype"),
        ({"block_size": 0}, "block_size"),
        ({"originals": "gpu"}, "originals"),
        ({"layers": [int]}, "layers"),
        ({"exclude": [3]}, "exclude"),
    ],
    ids=["granularity", "storage_dtype", "block_size", "originals", "layers", "exclude"],
)
def test_bad_options_raise_value_error_naming_the_option(options, match):
    model = toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        with fp8_weights(model, **options):
            pass
    assert_restored(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("originals", ["cpu", "keep"])
def test_non_finite_weight_names_the_parameter_and_rolls_back(bad, originals, device):
    model = toy(device=device)
    with torch.no_grad():
        model.proj.weight[3, 2] = bad  # the last target: every earlier one was already swapped
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"proj\.weight"):
        with fp8_weights(model, originals=originals):
            pytest.fail("the block must not run")
    assert_restored(model, before)


def test_meta_weights_and_non_modules_are_refused():
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        with fp8_weights(meta):
            pass
    with pytest.raises(TypeError, match="str"):
        with fp8_weights("vae"):
            pass
    with pytest.raises(TypeError):
        FP8Store.from_module(torch.zeros(3))


def test_entering_twice_or_nested_is_a_clear_error():
    model = toy()
    before = snapshot(model)
    with fp8_weights(model):
        inside = snapshot(model)
        for again in (lambda: fp8_weights(model), lambda: fp8_weights(model.proj)):
            with pytest.raises(FP8Error, match="already"):
                with again():
                    pass
        assert_restored(model, inside)
    context = fp8_weights(model)
    with context:
        with pytest.raises(FP8Error, match="already active"):
            context.__enter__()
    assert_restored(model, before)


# -- several modules, exclusion, reuse --------------------------------------------------------------------


def test_several_modules_at_once_and_overlap_refused():
    vae, encoder = toy(), toy(tie=False)
    before_vae, before_encoder = snapshot(vae), snapshot(encoder)
    with fp8_weights(vae, encoder) as stores:
        assert isinstance(stores, tuple) and len(stores) == 2
        assert isinstance(held(vae.proj), FP8Tensor) and isinstance(held(encoder.head), FP8Tensor)
    assert_restored(vae, before_vae)
    assert_restored(encoder, before_encoder)
    with pytest.raises(FP8Error, match="argument 0 and argument 1"):
        with fp8_weights(vae, vae.proj):
            pass
    assert_restored(vae, before_vae)


def test_exclude_by_pattern_and_predicate():
    model = toy(tie=False)
    with fp8_weights(model, exclude=["pro*", lambda name, layer: isinstance(layer, nn.ConvTranspose1d)]) as store:
        assert set(store) == {"conv.weight", "head.weight"}
        assert not isinstance(held(model.proj), FP8Tensor)


def test_excluding_one_side_of_a_tied_weight_keeps_it_dense():
    model = toy(tie=True)  # head.weight is embed.weight
    layers = (*fp8ctx.DEFAULT_LAYERS, nn.Embedding)
    assert "embed.weight" in fp8ctx.FP8Store.from_module(model, layers=layers)
    before = snapshot(model)
    with fp8_weights(model, layers=layers, exclude=["head"]) as store:
        assert "embed.weight" not in store and "proj.weight" in store
        assert held(model.head) is held(model.embed) and not isinstance(held(model.head), FP8Tensor)
    assert_restored(model, before)


def test_conversions_inside_leave_a_given_store_as_it_was():
    model, twin = toy(torch.float32), toy(torch.float32)
    store = FP8Store.from_module(model, granularity="channel")
    x = ids()
    with torch.no_grad():
        expected = functional_call(twin, store, (x,))
        with fp8_weights(model, store=store):
            model.half()
            held(model.proj).requires_grad_(True)
        assert all(entry.dtype == torch.float32 and not entry.requires_grad for entry in store.values())
        assert model.proj.weight.dtype == torch.float16  # the model itself took the conversion
        torch.testing.assert_close(functional_call(twin, store, (x,)), expected, rtol=0, atol=0)


def test_store_is_reused_without_requantizing(monkeypatch):
    from fp8ctx import _numerics

    model = toy()
    store = FP8Store.from_module(model, granularity="block", block_size=8)
    calls = []
    monkeypatch.setattr(_numerics, "quantize", lambda *a, **k: calls.append(1))
    before = snapshot(model)
    with fp8_weights(model, store=store) as same:
        assert same is store and held(model.proj).qdata is store["proj.weight"].qdata  # the store's own codes
    assert calls == []
    assert_restored(model, before)
    with pytest.raises(FP8Error, match="granularity"):
        fp8_weights(model, store=store, granularity="channel")
    with pytest.raises(FP8Error, match="another module"):
        with fp8_weights(nn.Linear(3, 3), store=store):
            pass


# -- functional_call ---------------------------------------------------------------------------------------


def test_functional_call_leaves_the_module_untouched(device):
    model = toy(device=device)
    store = FP8Store.from_module(model, granularity="channel")
    before = snapshot(model)
    pointers = [p.data_ptr() for p in model.parameters()]
    out = functional_call(model, store, (ids(device),))
    assert_restored(model, before)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    with fp8_weights(model, store=store):
        expected = model(ids(device))
    assert torch.equal(out, expected)
    assert torch.equal(functional_call(model, store, ids(device)), expected)  # a bare tensor is one argument
    handle = model.up.register_forward_hook(lambda *args: (_ for _ in ()).throw(Boom()))
    before = snapshot(model)
    with pytest.raises(Boom):
        functional_call(model, store, (ids(device),))
    assert_restored(model, before)
    handle.remove()


def test_functional_call_passes_kwargs():
    model = toy()
    store = FP8Store.from_module(model)
    out = functional_call(model, store, (), {"ids": ids()})
    assert torch.equal(out, functional_call(model, store, (ids(),)))


def test_store_save_load_round_trip(tmp_path):
    model = toy()
    store = FP8Store.from_module(model, granularity="block", block_size=8, layers=fp8ctx.DEFAULT_LAYERS + (nn.Embedding,))
    store.save(tmp_path / "vae.fp8.safetensors")
    loaded = FP8Store.load(tmp_path / "vae.fp8.safetensors")
    assert list(loaded) == list(store) and loaded.config == store.config
    for name in store:
        assert torch.equal(loaded[name].qdata.view(torch.uint8), store[name].qdata.view(torch.uint8))
        assert torch.equal(loaded[name].dequantize(), store[name].dequantize())
        assert loaded[name].fp8_layout == store[name].fp8_layout and loaded[name].dtype == store[name].dtype
    assert torch.equal(functional_call(model, loaded, ids()), functional_call(model, store, ids()))


# -- interrupts at the edges -----------------------------------------------------------------------------


class InterruptAt:
    """A tracer that raises ``KeyboardInterrupt`` at the ``at``-th line fp8ctx executes (1-based; 0: never),
    as a Ctrl-C arriving there would; it counts the lines either way."""

    def __init__(self, at: int = 0) -> None:
        self.at, self.lines = at, 0

    def __enter__(self) -> InterruptAt:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def _call(self, frame, event, arg):  # type: ignore[no-untyped-def]
        # the steps of entry and exit; not the stand-in's own interception, which runs inside torch's
        # __torch_function__ machinery (an exception raised there by a tracer leaves torch's
        # torch-function state disabled, which a real signal, arriving between bytecodes, does not); the methods
        # hand their calls to _tensor_dispatch's two functions, which are that interception too
        if frame.f_code.co_name in ("__torch_function__", "__torch_dispatch__", "torch_function", "torch_dispatch"):
            return None
        # nor the claims' bookkeeping: it runs under a C-level lock, whose `with` exit a real signal cannot split,
        # but a tracer can (the line event for the `with` line comes before __exit__), leaving the lock held
        if frame.f_globals.get("__name__") == "fp8ctx._claims":
            return None
        return self._line if frame.f_globals.get("__name__", "").startswith("fp8ctx") else None

    def _line(self, frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "line":
            self.lines += 1
            if self.lines == self.at:
                raise KeyboardInterrupt(f"injected at fp8ctx line {self.at}")
        return self._line


def interrupted_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4, bias=False))
    net[3].weight = net[2].weight  # tied: two slots
    return net


def run_phase(ctx, phase: str, interrupt: InterruptAt, ending: BaseException | None) -> None:
    """Enter and exit ``ctx``, the interrupt armed during ``phase``; the exit sees ``ending`` as the
    exception that ended the block (a first Ctrl-C: the interrupt is then a second one)."""
    if phase == "enter":
        with interrupt:
            ctx.__enter__()
        ctx.__exit__(None, None, None)
    else:
        ctx.__enter__()
        with interrupt:
            ctx.__exit__(type(ending) if ending else None, ending, None)


@pytest.mark.parametrize("originals", ["cpu", "keep"])
@pytest.mark.parametrize(
    "phase, ending",
    [("enter", None), ("exit", None), ("exit", KeyboardInterrupt("first Ctrl-C"))],
    ids=["enter", "exit", "exit after a first Ctrl-C"],
)
def test_an_interrupt_at_any_line_of_entry_or_exit_leaves_the_model_restored_or_restorable(
    phase, originals, ending, device
):
    counting = InterruptAt()
    run_phase(fp8_weights(interrupted_model().to(device), originals=originals), phase, counting, ending)
    assert counting.lines > 20
    for at in range(1, counting.lines + 1):
        net = interrupted_model().to(device)
        before = snapshot(net)
        ctx = fp8_weights(net, originals=originals)
        try:
            run_phase(ctx, phase, InterruptAt(at), ending)
        except KeyboardInterrupt:
            pass
        if ctx.restored:
            assert_restored(net, before)  # exactly as before: nothing left to finish
        else:
            ctx.restore()  # recoverably held: finishing is one call, and idempotent
            ctx.restore()
            assert ctx.restored
            assert_restored(net, before)
        with fp8_weights(net, originals=originals):  # nothing of the interrupted hold is left: it can be held again
            pass
        assert_restored(net, before)
        assert torch._C._is_torch_function_enabled()
        assert claims_unlocked()


def test_restore_after_an_interrupted_exit_finishes_and_says_so(monkeypatch):
    net = interrupted_model()
    before = snapshot(net)
    ctx = fp8_weights(net)
    ctx.__enter__()
    assert not ctx.restored
    calls = []
    real = fp8ctx._hold.Hold.close

    def interrupted_once(hold, propagating):  # a Ctrl-C before the restore could start
        calls.append(propagating)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(hold, propagating)

    monkeypatch.setattr(fp8ctx._hold.Hold, "close", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        ctx.__exit__(None, None, None)
    assert not ctx.restored and isinstance(net[0]._parameters["weight"], FP8Tensor)
    with pytest.raises(FP8Error, match="call .restore()"):
        ctx.__enter__()
    ctx.restore()
    assert ctx.restored
    assert_restored(net, before)


def claims_unlocked() -> bool:
    """Whether another thread can take the claims' lock (nothing left it held)."""
    took: list[bool] = []

    def take() -> None:
        took.append(fp8ctx._claims._lock.acquire(timeout=5))
        if took[0]:
            fp8ctx._claims._lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return took == [True]


class EndsWithCtrlC(nn.Module):
    """Runs ``net``, then raises a first Ctrl-C (the injected interrupt in the undo is then a second one)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net(x)
        raise KeyboardInterrupt("first Ctrl-C")


class InterruptWhere(InterruptAt):
    """:class:`InterruptAt` that also records the function the interrupt was raised in."""

    where = ""

    def _line(self, frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "line" and self.lines + 1 == self.at:
            self.where = frame.f_code.co_name
        return super()._line(frame, event, arg)


@pytest.mark.parametrize("ending", ["returns", "first Ctrl-C"])
def test_an_interrupt_at_any_line_of_functional_call_leaves_the_module_restored_or_finished_by_the_next_call(ending):
    net = interrupted_model()
    module = net if ending == "returns" else EndsWithCtrlC(net)
    store = FP8Store.from_module(module)
    x = torch.randn(2, 4)
    before = snapshot(module)
    counting = InterruptAt()
    with counting, pytest.raises(KeyboardInterrupt) if ending != "returns" else contextlib.nullcontext():
        functional_call(module, store, x)
    assert counting.lines > 20
    later = set()
    for at in range(1, counting.lines + 1):
        interrupt = InterruptWhere(at)
        try:
            with interrupt:
                functional_call(module, store, x)
        except KeyboardInterrupt:
            pass
        assert torch._C._is_torch_function_enabled()
        assert claims_unlocked()
        try:
            assert_restored(module, before)  # at once: the undo finishes through an interrupt in its own steps
        except AssertionError:
            later.add(interrupt.where)
            with pytest.raises(KeyboardInterrupt) if ending != "returns" else contextlib.nullcontext():
                functional_call(module, store, x)  # the next call finishes the restore first
            assert_restored(module, before)
    # only where Python itself skips a `finally`: at lines of functional_call, or end_call's first, outside its try
    assert later <= {"functional_call", "end_call"}, later


@pytest.mark.parametrize("next_holder", ["functional_call", "fp8_weights", "functional_call in another thread"])
@pytest.mark.parametrize("failure", ["interrupts keep coming", "a restore step fails"])
def test_a_functional_call_whose_restore_cannot_finish_says_so_and_the_next_holder_finishes_it(
    failure, next_holder, monkeypatch
):
    net = interrupted_model()
    store = FP8Store.from_module(net)
    x = torch.randn(2, 4)
    expected = functional_call(net, store, x)
    before = snapshot(net)
    failing = {"left": 2}  # functional_call's end tries twice: both fail
    patched, name = (fp8ctx._hold.Hold, "close") if failure == "interrupts keep coming" else (fp8ctx._swap.Journal, "undo")
    real = getattr(patched, name)

    def fail_twice(self, *args):  # type: ignore[no-untyped-def]
        if failing["left"]:
            failing["left"] -= 1
            raise KeyboardInterrupt("Ctrl-C") if failure == "interrupts keep coming" else RuntimeError("disk gone")
        return real(self, *args)

    monkeypatch.setattr(patched, name, fail_twice)
    with pytest.raises((KeyboardInterrupt, RuntimeError)) as caught:
        functional_call(net, store, x)
    notes = getattr(caught.value, "__notes__", [])
    assert any("could not finish restoring" in note and "finishes the restore first" in note for note in notes), notes
    assert isinstance(net[0]._parameters["weight"], FP8Tensor)  # left held, and said so
    if next_holder == "fp8_weights":
        with fp8_weights(net):
            assert isinstance(net[0]._parameters["weight"], FP8Tensor)
    elif next_holder == "functional_call":
        assert torch.equal(functional_call(net, store, x), expected)
    else:
        outputs: list[object] = []

        def call() -> None:
            try:
                outputs.append(functional_call(net, store, x))
            except BaseException as error:  # shown by the assertion below
                outputs.append(error)

        thread = threading.Thread(target=call)
        thread.start()
        thread.join(timeout=30)
        assert len(outputs) == 1 and isinstance(outputs[0], torch.Tensor), outputs
        assert torch.equal(outputs[0], expected)
    assert_restored(net, before)
    with fp8_weights(net):  # nothing is claimed any more
        pass
    assert_restored(net, before)
