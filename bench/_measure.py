"""Measuring one model for bench/compare.py: timing on a device (CUDA events, CUDA-graph replay with L2 flushed),
memory figures, parameter snapshots and bit-exactness after teardown, output error."""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch

MiB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

class Dev:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def alloc(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def time_graph(self, fn, calls: int, replays: int = 7) -> float:
        """GPU-only milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, each
        behind a 256 MiB memset that evicts L2 (so weights come from HBM, as in a real forward), minus
        the same graph of memsets alone. No host cost is inside: this is the time with CUDA graphs,
        and what the kernels themselves cost when the host is fast enough to keep the GPU busy."""
        flush = torch.empty(256 * MiB, dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs = []
        for with_fn in (True, False):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    flush.zero_()
                    if with_fn:
                        fn()
            graphs.append(graph)
        medians = []
        for graph in graphs:
            graph.replay()
            times = self.time_loop(graph.replay, replays)
            medians.append(statistics.median(times))
        del graphs, flush
        return max(medians[0] - medians[1], 0.0) / calls

    def time_loop(self, fn, iters: int) -> list[float]:
        """Per-iteration milliseconds: CUDA events on a GPU, perf_counter on a CPU."""
        if self.cuda:
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(iters)]
            for s, e in evs:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in evs]
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def _sub(a, b):
    return None if a is None or b is None else a - b


# ---------------------------------------------------------------------------------------------
# Snapshot / bit-exactness
# ---------------------------------------------------------------------------------------------

def _named_tensors(model: torch.nn.Module):
    for n, p in model.named_parameters():
        yield "param:" + n, p
    for n, b in model.named_buffers():
        yield "buffer:" + n, b


def snapshot(model: torch.nn.Module) -> dict:
    """CPU copies of every parameter and buffer (plus object ids), taken before setup."""
    return {n: (id(t), t.detach().to("cpu", copy=True)) for n, t in _named_tensors(model)}


def _bitwise_equal(t: torch.Tensor, ref: torch.Tensor) -> bool:
    d = t.detach()
    if type(d) is not torch.Tensor:  # tensor subclass (e.g. torchao Float8Tensor)
        return False
    if d.dtype != ref.dtype or d.shape != ref.shape:
        return False
    a = d.contiguous().reshape(-1).view(torch.uint8)
    b = ref.to(d.device).contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(a, b))


def compare_snapshot(model: torch.nn.Module, snap: dict) -> tuple[bool, str, bool]:
    """(bit exact, detail, same tensor objects)."""
    cur = dict(_named_tensors(model))
    missing = [n for n in snap if n not in cur]
    extra = [n for n in cur if n not in snap]
    differ, dtype_changed, replaced = [], 0, 0
    for name, (oid, ref) in snap.items():
        t = cur.get(name)
        if t is None:
            continue
        if id(t) != oid:
            replaced += 1
        if not _bitwise_equal(t, ref):
            differ.append(name)
            if type(t.detach()) is not torch.Tensor or t.dtype != ref.dtype:
                dtype_changed += 1
    exact = not (missing or extra or differ)
    parts = []
    if differ:
        parts.append(f"{len(differ)}/{len(snap)} tensors differ")
    if dtype_changed:
        parts.append(f"{dtype_changed} changed dtype/type")
    if missing:
        parts.append(f"{len(missing)} missing")
    if extra:
        parts.append(f"{len(extra)} extra ({extra[0].split(':', 1)[1]}...)")
    if replaced:
        parts.append(f"{replaced} objects replaced")
    if exact and not replaced:
        parts.append(f"all {len(snap)} tensors equal, same objects")
    elif exact:
        parts.append(f"all {len(snap)} tensors equal")
    return exact, "; ".join(parts), (not missing and replaced == 0)


def model_dtype(model: torch.nn.Module) -> str | None:
    try:
        d = getattr(model, "dtype", None)
        if isinstance(d, torch.dtype):
            return str(d)
    except Exception:
        pass
    for p in model.parameters():
        return str(p.dtype)
    return None


def state_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for _, t in _named_tensors(model):
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.device)
            if key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
        except Exception:
            total += t.numel() * t.element_size()
    return total


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
