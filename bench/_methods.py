"""Methods compared by bench/compare.py: a registry of name -> setup function.

A setup function takes (model, workload, info) and returns (model, teardown):
  - it converts `model` (a fresh bf16 copy on the device) to the method's storage,
  - `teardown()` undoes what can be undone (a no-op for methods that cannot be reverted),
  - `info` is a dict the setup may fill with extra figures or notes (they land in the JSON).
A setup raises NotApplicable("reason") when the method does not apply; the run records
"n/a: reason". Any other exception is recorded the same way, with its type.

To add a method (e.g. a new fp8ctx fast path), call `register(...)` or use it as a decorator:

    @register("fp8ctx-channel-fast", family="fp8ctx", about="...")
    def _setup(model, wl, info):
        ...
        return model, teardown
"""

from __future__ import annotations

import fnmatch
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class NotApplicable(Exception):
    """The method does not apply to this workload (or is not installed)."""


@dataclass
class Method:
    name: str
    setup: Callable[[nn.Module, Any, dict], tuple[nn.Module, Callable[[], None]]]
    family: str = ""
    about: str = ""
    # Returns None when the method can run at all, else why not ("n/a: ..."). Called lazily.
    unavailable: Callable[[], str | None] = lambda: None
    # Returns None when the method applies to the workload, else why not.
    applies: Callable[[Any], str | None] = lambda wl: None
    # Whether the method is in the default list (e.g. fast paths only once fp8ctx has them).
    default: Callable[[], bool] = lambda: True
    # Optional extra timing pass (fp8ctx enter/exit), called with the restored model.
    ctx_timings: Callable[..., dict] | None = None
    # Why a forward cannot be captured in a CUDA graph, or None. Hooks that assign `.data` during a
    # forward would leave the parameters in the graph's private memory, freed with the graph.
    graph_unsafe: str | None = None
    # The method its ratios are taken against (compiled methods: compiled bf16).
    reference: str = "bf16"
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, Method] = {}
_HOOKS_ASSIGN_DATA = "its hooks assign weight.data inside the forward"


def register(name: str, setup: Callable | None = None, **kw):
    """Register a method; usable as a plain call or as a decorator."""

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = Method(name=name, setup=fn, **kw)
        return fn

    return deco(setup) if setup is not None else deco


def select_methods(spec: str | None) -> list[str]:
    """Comma-separated names or glob patterns (e.g. 'fp8ctx*,bf16'); None = the default list."""
    if not spec or spec == "default":
        return [n for n, m in REGISTRY.items() if m.default()]
    if spec == "all":
        return list(REGISTRY)
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        names = [n for n in REGISTRY if fnmatch.fnmatch(n, tok)]
        if not names:
            raise SystemExit(f"unknown method {tok!r}; choose from {list(REGISTRY)}")
        out += [n for n in names if n not in out]
    return [n for n in REGISTRY if n in out]


def _noop() -> None:
    return None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# bf16 baseline
# ---------------------------------------------------------------------------------------------

@register("bf16", family="baseline", about="the model as built: bf16 weights, nothing done")
def _setup_bf16(model, wl, info):
    return model, _noop


# ---------------------------------------------------------------------------------------------
# fp8ctx
# ---------------------------------------------------------------------------------------------

_FP8CTX: Any = None
_FP8CTX_ERR: str | None = None


def fp8ctx_module():
    """The fp8ctx package, or raise NotApplicable with the import error."""
    global _FP8CTX, _FP8CTX_ERR
    if _FP8CTX is None and _FP8CTX_ERR is None:
        try:
            import fp8ctx  # noqa: PLC0415

            if not hasattr(fp8ctx, "fp8_weights"):
                raise ImportError("fp8ctx has no fp8_weights")
            _FP8CTX = fp8ctx
        except Exception as e:  # ImportError or a broken package being written
            _FP8CTX_ERR = f"fp8ctx not importable ({type(e).__name__}: {e})"
    if _FP8CTX is None:
        raise NotApplicable(_FP8CTX_ERR)
    return _FP8CTX


def _fp8ctx_unavailable() -> str | None:
    try:
        fp8ctx_module()
    except NotApplicable as e:
        return str(e)
    return None


def _accepted_kwargs(fn: Callable, kw: dict) -> tuple[dict, list[str]]:
    """Split kw into (accepted by fn, dropped names); keeps all when fn takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(kw), []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kw), []
    ok = {k: v for k, v in kw.items() if k in params}
    return ok, [k for k in kw if k not in params]


def _fp8ctx_enter(model, kw: dict, info: dict | None = None):
    """Enter fp8ctx.fp8_weights(model, **kw); returns (context manager, store)."""
    fp8ctx = fp8ctx_module()
    ok, dropped = _accepted_kwargs(fp8ctx.fp8_weights, kw)
    if dropped and info is not None:
        info.setdefault("notes", []).append(f"fp8_weights does not take {dropped}; left out")
    cm = fp8ctx.fp8_weights(model, **ok)
    store = cm.__enter__()
    return cm, store


def _store_bytes(store) -> int | None:
    n = getattr(store, "nbytes", None)
    try:
        return int(n() if callable(n) else n) if n is not None else None
    except Exception:
        return None


def _fp8ctx_kernels():
    """fp8ctx.kernels (backend switch) or None."""
    try:
        import importlib  # noqa: PLC0415

        fp8ctx_module()
        return importlib.import_module("fp8ctx.kernels")
    except Exception:
        return None


def _fast_path_state() -> dict:
    """What the fp8ctx kernels report (backend, whether the Triton module imports)."""
    kern = _fp8ctx_kernels()
    if kern is None:
        return {}
    out: dict = {}
    try:
        out["backend"] = kern.get_backend()
    except Exception:
        pass
    try:
        out["triton_module"] = kern._triton_module() is not None  # noqa: SLF001
    except Exception:
        pass
    return out


def make_fp8ctx_setup(fp8_kwargs: dict, backend: str | None = None):
    """Setup entering fp8ctx.fp8_weights(model, **fp8_kwargs) (originals="cpu" unless given);
    `backend` ("torch", "auto", ...) is selected with fp8ctx.kernels.use_backend for the run."""

    def setup(model, wl, info):
        fp8ctx_module()
        kw = dict(fp8_kwargs)
        kw.setdefault("originals", "cpu")
        kw.setdefault("progress_bar", False)
        info["fp8ctx_kwargs"] = {k: str(v) for k, v in kw.items()}
        bctx = None
        if backend is not None:
            kern = _fp8ctx_kernels()
            if kern is None or not hasattr(kern, "use_backend"):
                raise NotApplicable("fp8ctx has no kernels.use_backend to pick a backend")
            bctx = kern.use_backend(backend)
            bctx.__enter__()
        try:
            cm, store = _fp8ctx_enter(model, kw, info)
        except BaseException:
            if bctx is not None:
                bctx.__exit__(None, None, None)
            raise
        info["store_bytes"] = _store_bytes(store)
        info.update(_fast_path_state())

        def teardown():
            try:
                cm.__exit__(None, None, None)
            finally:
                if bctx is not None:
                    bctx.__exit__(None, None, None)

        return model, teardown

    return setup


def make_fp8ctx_ctx_timings(fp8_kwargs: dict):
    """Enter/exit timings with originals="keep" and with a prebuilt FP8Store (text tower)."""

    def timings(model, mem_now: Callable[[], int | None]) -> dict:
        out: dict = {}
        kw = {k: v for k, v in fp8_kwargs.items() if k != "originals"}
        kw.setdefault("progress_bar", False)
        # originals="keep"
        try:
            _sync()
            t0 = time.perf_counter()
            cm, _store = _fp8ctx_enter(model, dict(kw, originals="keep"))
            _sync()
            t1 = time.perf_counter()
            resident = mem_now()
            del _store
            cm.__exit__(None, None, None)
            _sync()
            t2 = time.perf_counter()
            out["keep"] = {"enter_s": t1 - t0, "exit_s": t2 - t1, "allocated_inside": resident}
        except Exception as e:
            out["keep"] = {"error": f"{type(e).__name__}: {e}"}
        # a store built once with FP8Store.from_module, then reused
        fp8ctx = fp8ctx_module()
        if hasattr(fp8ctx, "FP8Store") and hasattr(fp8ctx.FP8Store, "from_module"):
            try:
                ok, _ = _accepted_kwargs(fp8ctx.FP8Store.from_module, kw)
                _sync()
                t0 = time.perf_counter()
                store = fp8ctx.FP8Store.from_module(model, **ok)
                _sync()
                t1 = time.perf_counter()
                ok2, _ = _accepted_kwargs(fp8ctx.fp8_weights, {"progress_bar": False})
                cm = fp8ctx.fp8_weights(model, store=store, **ok2)
                cm.__enter__()
                _sync()
                t2 = time.perf_counter()
                cm.__exit__(None, None, None)
                _sync()
                t3 = time.perf_counter()
                out["store"] = {"from_module_s": t1 - t0, "enter_s": t2 - t1, "exit_s": t3 - t2,
                                "store_bytes": _store_bytes(store)}
                del store
            except Exception as e:
                out["store"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            out["store"] = {"error": "fp8ctx has no FP8Store.from_module"}
        return out

    return timings


def register_fp8ctx(name: str, fp8_kwargs: dict, about: str, backend: str | None = None,
                    ctx_timings: bool = True, default: bool = True):
    """Register an fp8ctx variant.

    backend: an fp8ctx.kernels backend to force for the run (None = fp8ctx's default, "auto",
        which takes the fused Triton path on a GPU where it applies).
    ctx_timings: also time enter/exit with originals="keep" and a reused store (text tower).
    default: in the default method list (else only with --methods naming it, or 'all').
    """
    register(
        name,
        make_fp8ctx_setup(fp8_kwargs, backend),
        family="fp8ctx",
        about=about,
        unavailable=_fp8ctx_unavailable,
        default=lambda: default,
        ctx_timings=make_fp8ctx_ctx_timings(fp8_kwargs) if ctx_timings else None,
        extra={"fp8_kwargs": fp8_kwargs, "backend": backend},
    )


_GRANULARITIES = {
    "tensor": ({"granularity": "tensor"}, "one fp32 scale per tensor"),
    "channel": ({"granularity": "channel"}, "one fp32 scale per output channel"),
    "block": ({"granularity": "block", "block_size": 128}, "one fp32 scale per 128x128 block"),
}
for _g, (_kw, _about) in _GRANULARITIES.items():
    # fp8ctx as a user gets it: backend "auto" = fused Triton kernels on a GPU where they apply
    register_fp8ctx(f"fp8ctx-{_g}", _kw, f"fp8ctx.fp8_weights, {_about}, originals on CPU, "
                                        f"default backend (Triton fast path on GPU)")
for _g, (_kw, _about) in _GRANULARITIES.items():
    # the same with the fast path switched off: dequantize per layer in pure torch; channel stands
    # for the three by default (the fallback differs between granularities only in the formula)
    register_fp8ctx(f"fp8ctx-{_g}-torch", _kw, f"fp8ctx.fp8_weights, {_about}, originals on "
                    "CPU, backend 'torch' (no fused kernel)", backend="torch", ctx_timings=False,
                    default=_g == "channel")
register_fp8ctx("fp8ctx-channel-fp8mm", {"granularity": "channel", "compute": "fp8"},
                "fp8ctx with compute='fp8': activations rounded to e4m3 per token, FP8 matmul "
                "(torch._scaled_mm on sm_89+)", ctx_timings=False)


# ---------------------------------------------------------------------------------------------
# torch.compile: the same setups with the forward compiled, compared with compiled bf16
# ---------------------------------------------------------------------------------------------

def make_compiled(base: Method) -> Callable:
    """`base`'s setup, then ``model.forward = torch.compile(model.forward, dynamic=False)`` (one graph
    per input shape, as a fixed-resolution pipeline has); teardown removes the compiled forward before
    `base`'s teardown, so fp8ctx's exit sees the model as it was entered."""

    def setup(model, wl, info):
        model, base_teardown = base.setup(model, wl, info)
        import torch._dynamo  # noqa: PLC0415

        from torch._dynamo.utils import counters  # noqa: PLC0415

        torch._dynamo.reset()  # no graph of an earlier method is reused
        counters.clear()
        model.forward = torch.compile(model.forward, dynamic=False)
        info["compiled"] = "torch.compile(model.forward, dynamic=False), inductor defaults"

        def teardown():
            info["graph_breaks"] = sum(counters["graph_break"].values())
            info["graph_break_reasons"] = sorted(counters["graph_break"])[:10]
            try:
                del model.forward
            finally:
                base_teardown()
                torch._dynamo.reset()

        return model, teardown

    return setup


for _base in ("bf16", "fp8ctx-channel", "fp8ctx-channel-fp8mm"):
    _m = REGISTRY[_base]
    register(f"{_base}-compiled", make_compiled(_m), family=_m.family, unavailable=_m.unavailable,
             about=f"{_base} with the forward under torch.compile (ratios against bf16-compiled)",
             default=lambda: False, reference="bf16-compiled", extra=dict(_m.extra))


# ---------------------------------------------------------------------------------------------
# diffusers layerwise casting
# ---------------------------------------------------------------------------------------------

def _diffusers_unavailable() -> str | None:
    try:
        import diffusers.hooks  # noqa: F401, PLC0415
    except Exception as e:
        return f"diffusers not importable ({type(e).__name__}: {e})"
    return None


@register("diffusers-lc", family="diffusers",
          graph_unsafe=_HOOKS_ASSIGN_DATA, unavailable=_diffusers_unavailable,
          about="diffusers enable_layerwise_casting / hooks.apply_layerwise_casting, "
                "storage fp8 e4m3 (no scale), compute bf16")
def _setup_diffusers(model, wl, info):
    from diffusers import ModelMixin  # noqa: PLC0415
    from diffusers.hooks import apply_layerwise_casting  # noqa: PLC0415

    if isinstance(model, ModelMixin):
        model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=BF16)
        info["api"] = "ModelMixin.enable_layerwise_casting"
    else:
        apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=BF16)
        info["api"] = "diffusers.hooks.apply_layerwise_casting"
    return model, _noop  # cannot be undone (its hook refuses deinitialisation)


# ---------------------------------------------------------------------------------------------
# torchao Float8WeightOnlyConfig
# ---------------------------------------------------------------------------------------------

def _torchao_unavailable() -> str | None:
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_  # noqa: F401, PLC0415
    except Exception as e:
        return f"torchao not importable ({type(e).__name__}: {e})"
    return None


def _torchao_applies(wl) -> str | None:
    if not wl.has_linear:
        return "Float8WeightOnlyConfig quantizes nn.Linear only; this model has none (convs)"
    return None


@register("torchao-f8wo", family="torchao", unavailable=_torchao_unavailable,
          applies=_torchao_applies,
          about="torchao quantize_(m, Float8WeightOnlyConfig()): Linear weights only")
def _setup_torchao(model, wl, info):
    from torchao.quantization import Float8WeightOnlyConfig, quantize_  # noqa: PLC0415

    total = sum(p.numel() for p in model.parameters())
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if lin == 0:
        raise NotApplicable("Float8WeightOnlyConfig quantizes nn.Linear only; model has none")
    info["linear_param_fraction"] = lin / max(total, 1)
    ret = quantize_(model, Float8WeightOnlyConfig())
    if isinstance(ret, nn.Module):
        model = ret
    changed = sum(type(m.weight.data) is not torch.Tensor
                  for m in model.modules() if isinstance(m, nn.Linear))
    info["linears_quantized"] = changed
    return model, _noop


@register("torchao-f8dq", family="torchao", unavailable=_torchao_unavailable,
          applies=_torchao_applies,
          about="torchao quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())): "
                "FP8 x FP8 Linear with per-token activation scales (compare fp8ctx compute='fp8')")
def _setup_torchao_dynamic(model, wl, info):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: PLC0415

    ret = quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return (ret if isinstance(ret, nn.Module) else model), _noop


# ---------------------------------------------------------------------------------------------
# The seed's hook approach, reimplemented (revisions 1 and 2)
# ---------------------------------------------------------------------------------------------

_WEIGHT_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                  nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _seed_targets(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, _WEIGHT_LAYERS)
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.is_floating_point()]


@torch.no_grad()
def _per_tensor_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


@register("seed-r1", family="seed",
          graph_unsafe=_HOOKS_ASSIGN_DATA,
          about="seed rev 1: weight.data = fp8 (per-tensor amax/448); pre-hook dequantizes to "
                "bf16, post-hook puts fp8 back")
def _setup_seed_r1(model, wl, info):
    n = 0
    for m in _seed_targets(model):
        q, scale = _per_tensor_fp8(m.weight.data)
        m.weight.data = q

        def pre(mod, args, q=q, scale=scale):
            mod.weight.data = (q.to(BF16) * scale).to(BF16)

        def post(mod, args, output, q=q):
            mod.weight.data = q

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
        n += 1
    info["layers_hooked"] = n
    return model, _noop  # hooks and fp8 weights stay: no way back


@register("seed-r2", family="seed",
          graph_unsafe=_HOOKS_ASSIGN_DATA,
          about="seed rev 2 (final): bf16 weight.data kept + _fp8_weight buffer; pre-hook "
                "writes fp8*scale, post-hook writes _fp8_weight.to(bf16)")
def _setup_seed_r2(model, wl, info):
    n = 0
    for m in _seed_targets(model):
        q, scale = _per_tensor_fp8(m.weight.data)
        m.register_buffer("_fp8_weight", q)
        m.register_buffer("_fp8_scale", scale)

        def pre(mod, args):
            mod.weight.data = (mod._fp8_weight.to(BF16) * mod._fp8_scale).to(BF16)

        def post(mod, args, output):
            mod.weight.data = mod._fp8_weight.to(BF16)

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
        n += 1
    info["layers_hooked"] = n
    return model, _noop
