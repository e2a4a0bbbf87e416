"""Which way a W8A16 linear runs on the GPU, chosen by measurement once per problem and remembered.

Two routes compute the same function: the fused kernel (FP8 tiles decoded in registers, best while the call is
memory-bound) and dequantize + cuBLAS (one pass writing the dense weight, then the vendor GEMM; best once the
call is compute-bound, as Triton's mixed-input tensor-core rate is below cuBLAS's). Where the crossover lies
depends on the GPU, the shape and the dtype, so the first eager call of each (token bucket, N, K, dtype,
device, scheme, bias) times both on the real inputs (GPU time, the weights evicted from L2) and keeps the faster.
Tuning is skipped — and the measured default of :func:`._plan.pick_config` used — while a CUDA graph is being
captured, when tuning is off (``FP8CTX_TUNE=0`` or :func:`set_tuning`), and off the GPU. With ``FP8CTX_TUNE_CACHE=<dir>`` (or
``set_tuning(cache_dir=...)``) the choices persist in one JSON file per device under that directory.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Callable

import torch

from .._errors import FP8Error
from ._capability import device_name
from ._plan import CFG_MID, CFG_T16, CFG_T64, CFG_T64_SMALL_W, FUSED_CONFIGS, KernelConfig, pick_config

__all__ = ["ROUTES", "RouteKey", "choose", "for_tracer", "key_of", "routes", "set_tuning"]

ROUTES = ("fused", "dequant")
_FILE_VERSION = 1
_CACHE_DIR_ENV = os.environ.get("FP8CTX_TUNE_CACHE") or None

RouteKey = tuple[int, int, int, str, str, str, int, str, bool]

_state = {"enabled": os.environ.get("FP8CTX_TUNE", "1").lower() not in ("0", "off", "false", "no")}
_cache_dir: list[Path | None] = [Path(_CACHE_DIR_ENV) if _CACHE_DIR_ENV else None]
_routes: dict[RouteKey, str] = {}
_loaded_files: set[Path] = set()
# the hot path's memo, filled by _triton.w8a16_linear: (x shape, x dtype, weight shape, FP8 dtype, granularity,
# block, no bias, device) -> ((config, launch plan) or None for the dequantize route, expected scale shape); a call
# seen before skips routing, planning and scale checks. Cleared whenever the route choices may change.
resolved: dict[tuple[object, ...], tuple[object, tuple[int, ...]]] = {}


def set_tuning(enabled: bool = True, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Turn measured route choice on or off, and choose where choices persist (None: this process only).

    Raises:
        FP8Error: ``enabled`` is not a bool.

    Example:
        >>> set_tuning(False); set_tuning(True)
    """
    if not isinstance(enabled, bool):
        raise FP8Error(f"set_tuning(enabled=...) takes True or False, got {enabled!r}")
    _state["enabled"] = enabled
    _cache_dir[0] = Path(cache_dir) if cache_dir is not None else None
    resolved.clear()


def routes() -> dict[RouteKey, str]:
    """A copy of the routes chosen so far: ``(token bucket, N, K, dtype, device, granularity, block, fp8
    format, bias) -> "fused:<config>"`` or ``"dequant"``."""
    return dict(_routes)


def token_bucket(tokens: int) -> int:
    """Calls of 1..16 tokens share a bucket, then one per power of two (a prompt of 300 tokens and one of 500
    run the same way)."""
    return 16 if tokens <= 16 else 1 << (tokens - 1).bit_length()


def fused_route(tokens: int, n: int, k: int) -> str:
    """The fused configuration worth trying at this size (also above where the default prefers cuBLAS)."""
    config = pick_config(tokens, n, k)
    if config is None:
        config = CFG_MID if tokens <= 1024 else (CFG_T64 if n * k >= 30_000_000 else CFG_T64_SMALL_W)
    return "fused:" + _config_name(config)


def default_route(tokens: int, n: int, k: int) -> str:
    config = pick_config(tokens, n, k)
    return "dequant" if config is None else "fused:" + _config_name(config)


def key_of(tokens: int, n: int, k: int, dtype: torch.dtype, device: torch.device, layout, fp8_dtype, bias: bool) -> RouteKey:
    """The route key of a call (see :func:`routes`)."""
    return (
        token_bucket(tokens), n, k, str(dtype), device_name(device), layout.granularity.value, layout.block_size,
        str(fp8_dtype), bias,
    )  # fmt: skip


def for_tracer(key: RouteKey, tokens: int, n: int, k: int, measure: Callable[[], object]) -> str:
    """The route a tracer records for ``key``: the one measured so far (in this process or the cache file), else
    measured now by ``measure()`` (which runs the call on made-up inputs of the same sizes: a tracer has no real
    ones), else — tuning off, or a CUDA graph being captured — the default."""
    known = _known(key)
    if known is None and _state["enabled"] and not torch.cuda.is_current_stream_capturing():
        measure()
        known = _routes.get(key)
    return known if known is not None else default_route(tokens, n, k)


def _known(key: RouteKey) -> str | None:
    """The route measured for ``key`` in this process, or read from the device's cache file (once per file)."""
    known = _routes.get(key)
    if known is None:
        path = _file(key[4])
        if path is not None and path not in _loaded_files:
            _load(path)
            known = _routes.get(key)
    return known


def _config_name(config: KernelConfig) -> str:
    return next((name for name, known in FUSED_CONFIGS.items() if known == config), "t16")


def config_of(route: str) -> KernelConfig | None:
    """The fused configuration a route names, or None for ``"dequant"``."""
    if route == "dequant":
        return None
    return FUSED_CONFIGS.get(route.partition(":")[2], CFG_T16)


# GPU cycles the timer keeps the GPU busy for while the host launches the timed call (~0.5 ms at 2 GHz, several
# times the host cost of either route), so the events bracket GPU work alone
_HOST_COVER_CYCLES = 1_000_000


def _time_ms(run: Callable[[], object], flush: torch.Tensor, repeats: int = 5) -> float:
    """Median GPU milliseconds of ``run``, each time behind a write of ``flush`` (twice the L2 size): the weights
    come from HBM as they do inside a forward, not from the L2 the warm-up left them in (which would flatter
    whichever route reads fewer bytes). A GPU spin after the flush covers the host's launches: without it the
    start event fires while the host is still launching, and the route with fewer or cheaper launches wins on
    host time (measured on an H200: dequantize + cuBLAS timed 0.151 ms against the fused kernel's 0.129 ms at
    1024 x 3072 x 3072, where the GPU spends 0.037 and 0.076 ms)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        flush.zero_()
        torch.cuda._sleep(_HOST_COVER_CYCLES)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)


def _file(gpu: str) -> Path | None:
    folder = _cache_dir[0]
    if folder is None:
        return None
    name = gpu.replace(" ", "_").replace("/", "_")
    return folder / f"routes-{name}.json"


def _load(path: Path) -> None:
    """Read a route file in full before using any of it.

    Raises:
        FP8Error: the file is not a route file of this version (names the field; delete it to re-tune).
    """
    _loaded_files.add(path)
    if not path.is_file():
        return
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FP8Error(f"route cache {path} is not readable JSON ({err}); delete it to re-tune") from None
    if not isinstance(content, dict) or content.get("version") != _FILE_VERSION or not isinstance(
        content.get("routes"), list
    ):
        raise FP8Error(f"route cache {path}: expected version {_FILE_VERSION} with a 'routes' list; delete it")
    loaded: dict[RouteKey, str] = {}
    for item in content["routes"]:
        ok = isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) and len(item[0]) == 9
        route = item[1] if ok else None
        if not ok or not (route == "dequant" or (isinstance(route, str) and route.partition(":")[2] in FUSED_CONFIGS)):
            raise FP8Error(f"route cache {path}: bad entry {item!r} (expected [[9 key fields], route]); delete it")
        loaded[tuple(item[0])] = route  # type: ignore[assignment]
    _routes.update(loaded)


def _save(path: Path, device_name: str) -> None:
    mine = [[list(key), route] for key, route in _routes.items() if key[4] == device_name]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"version": _FILE_VERSION, "routes": mine}))
    temporary.replace(path)


def choose(
    key: RouteKey, tokens: int, n: int, k: int, device: torch.device, run: Callable[[str], object]
) -> str:
    """The route for ``key``: remembered, measured now with ``run(route)``, or the default.

    Args:
        key: see :func:`routes` (the device field is the device's name).
        tokens, n, k: the call's size (for the default and the fused candidate).
        device: the CUDA device.
        run: runs the call once by the named route (its result is thrown away).
    """
    known = _known(key)
    if known is not None:
        return known
    if not _state["enabled"] or torch.cuda.is_current_stream_capturing():
        return default_route(tokens, n, k)
    candidates = [fused_route(tokens, n, k), "dequant"]
    for route in candidates:  # first calls compile and warm up; not timed
        run(route)
    flush = _flush_buffer(device)
    timings = {route: _time_ms(lambda route=route: run(route), flush) for route in candidates}
    del flush
    best = min(candidates, key=timings.__getitem__)
    _routes[key] = best
    path = _file(key[4])
    if path is not None:
        _save(path, key[4])
    return best
