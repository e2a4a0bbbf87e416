#!/usr/bin/env python3
"""Compare fp8ctx with the alternatives (bf16, diffusers layerwise casting, torchao float8
weight-only, the seed's hook approach) on real layer shapes with random weights.

    python3 bench/compare.py                          # full run on one CUDA GPU (< 10 min on H100)
    python3 bench/compare.py --quick                  # shrunk: 2 text layers, VAE 256x256
    python3 bench/compare.py --device cpu --tiny      # toy shapes on a CPU, proves the script
    python3 bench/compare.py --workloads text,linear --methods 'bf16,fp8ctx*'
    python3 bench/compare.py --list                   # workloads and methods

Figures per (workload, method): resident weight bytes after setup, transient peak during
forward, median latency (CUDA events), output relative L2 error vs bf16, model.dtype, whether the
model is bit-exact after teardown, and for the text tower the fp8ctx enter/exit times.
Nothing is downloaded: all models are built from configs with random weights.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

_T_START = time.perf_counter()  # --budget-s counts from here (imports included)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import _methods as M  # noqa: E402
import _workloads as W  # noqa: E402
import _output as O  # noqa: E402
import _profile as P  # noqa: E402
from _measure import MiB, Dev, _sub, compare_snapshot, model_dtype, rel_l2, snapshot, state_bytes  # noqa: E402

PROFILE = [True]  # --no-profile clears it



# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _short_err(e: BaseException, limit: int = 300) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    s = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return s[:limit]


def measure_case(dev: Dev, wl, case, method: M.Method, model, inp, ref: dict, is_ref: bool) -> dict:
    def fwd():
        return case.forward(model, inp)

    for _ in range(wl.warmup):
        fwd()
    dev.sync()
    dev.reset_peak()
    before = dev.alloc()
    out = fwd()
    dev.sync()
    peak = _sub(dev.peak(), before)
    out_c = out.detach().float().cpu()
    del out
    times = dev.time_loop(fwd, wl.iters)
    r = {
        "latency_ms_median": statistics.median(times),
        "latency_ms_min": min(times),
        "latency_ms_all": [round(t, 5) for t in times],
        "peak_transient_bytes": peak,
        "out_rms": (out_c.pow(2).mean().sqrt().item() if out_c.numel() else None),
        "out_finite": bool(torch.isfinite(out_c).all().item()),
    }
    if dev.cuda and wl.graph_calls:
        if method.graph_unsafe:
            r["graph_error"] = f"not captured: {method.graph_unsafe}"
        else:
            try:
                r["graph_ms"] = dev.time_graph(fwd, wl.graph_calls)
            except Exception as e:  # a forward that syncs with the host cannot be captured
                r["graph_error"] = _short_err(e)
                dev.cleanup()
    if dev.cuda and PROFILE[0] and method.family in ("baseline", "fp8ctx"):
        try:
            r["profile"] = P.breakdown(fwd, dev.device)
        except Exception as e:  # the profiler is a diagnostic: never lose the timings over it
            r["profile_error"] = _short_err(e)
    if is_ref:
        ref[case.name] = out_c
        r["rel_l2_err"] = 0.0
    elif case.name in ref:
        r["rel_l2_err"] = rel_l2(out_c, ref[case.name])
    else:
        r["rel_l2_err"] = None
    return r


def run_one(dev: Dev, wl, method: M.Method, run_idx: int, inputs: dict, ref: dict) -> dict:
    label = method.name if run_idx == 1 else f"{method.name} #{run_idx}"
    res: dict = {"method": label, "base_method": method.name, "run": run_idx,
                 "family": method.family, "status": "ok"}
    why = method.unavailable() or method.applies(wl)
    if why:
        res.update(status="n/a", reason=why)
        return res
    info: dict = {}
    model = snap = teardown = None
    t_start = time.perf_counter()
    dev.cleanup()
    base = dev.alloc()
    try:
        model = wl.build(dev.device)
        dev.sync()
        res["model_bytes"] = _sub(dev.alloc(), base)
        res["param_bytes"] = state_bytes(model)
        snap = snapshot(model)
        dev.sync()
        t0 = time.perf_counter()
        model, teardown = method.setup(model, wl, info)
        dev.sync()
        res["setup_s"] = time.perf_counter() - t0
        res["resident_bytes"] = _sub(dev.alloc(), base)
        res["dtype"] = model_dtype(model)
        is_ref = method.name == "bf16" and run_idx == 1
        cases = {}
        for case in wl.cases:
            try:
                cases[case.name] = measure_case(dev, wl, case, method, model, inputs[case.name],
                                                ref, is_ref)
            except Exception as e:  # e.g. out of memory on the largest case
                cases[case.name] = {"error": _short_err(e)}
                res.setdefault("tracebacks", []).append(traceback.format_exc())
                dev.cleanup()
        res["cases"] = cases
        dev.sync()
        t0 = time.perf_counter()
        td, teardown = teardown, None
        td()
        dev.sync()
        res["teardown_s"] = time.perf_counter() - t0
        res["allocated_after_teardown"] = _sub(dev.alloc(), base)
        exact, detail, same = compare_snapshot(model, snap)
        res.update(bit_exact=exact, exact_detail=detail, same_objects=same)
        if wl.ctx_timing and method.ctx_timings is not None and run_idx == 1:
            ct = {"cpu": {"enter_s": res["setup_s"], "exit_s": res["teardown_s"],
                          "allocated_inside": res["resident_bytes"]}}
            ct.update(method.ctx_timings(model, lambda: _sub(dev.alloc(), base)))
            res["ctx_timings"] = ct
            exact2, detail2, _ = compare_snapshot(model, snap)
            res.update(bit_exact_after_ctx_timings=exact2, exact_detail_after_ctx=detail2)
    except M.NotApplicable as e:
        res.update(status="n/a", reason=str(e))
    except Exception as e:
        res.update(status="n/a", reason=_short_err(e))
        res.setdefault("tracebacks", []).append(traceback.format_exc())
        if teardown is not None:
            try:
                teardown()
            except Exception:
                pass
    finally:
        res["info"] = info
        del model, snap, teardown
        dev.cleanup()
    res["wall_s"] = time.perf_counter() - t_start
    return res


def _fill_ratios(results: list[dict]) -> None:
    firsts = {r["base_method"]: r for r in results if r["run"] == 1 and r["status"] == "ok"}
    for r in results:
        bf = firsts.get(M.REGISTRY[r["base_method"]].reference)
        if r["status"] != "ok" or bf is None:
            continue
        if r.get("resident_bytes") is not None and bf.get("resident_bytes"):
            r["resident_ratio"] = r["resident_bytes"] / bf["resident_bytes"]
        for cname, c in r.get("cases", {}).items():
            b = bf.get("cases", {}).get(cname, {})
            if "latency_ms_median" in c and b.get("latency_ms_median"):
                c["latency_ratio"] = c["latency_ms_median"] / b["latency_ms_median"]
            if c.get("graph_ms") is not None and b.get("graph_ms"):
                c["graph_ratio"] = c["graph_ms"] / b["graph_ms"]


def _noise(results: list[dict]) -> dict:
    out = {}
    for r2 in results:
        if r2["run"] != 2 or r2["status"] != "ok":
            continue
        r1 = next((r for r in results if r["base_method"] == r2["base_method"] and r["run"] == 1
                   and r["status"] == "ok"), None)
        if r1 is None:
            continue
        d = {}
        for cname, c2 in r2.get("cases", {}).items():
            c1 = r1.get("cases", {}).get(cname, {})
            a, b = c1.get("latency_ms_median"), c2.get("latency_ms_median")
            if a and b:
                d[cname] = {"run1_ms": a, "run2_ms": b, "spread_pct": abs(a - b) / min(a, b) * 100,
                            "err_run1": c1.get("rel_l2_err"), "err_run2": c2.get("rel_l2_err")}
        if r1.get("resident_bytes") is not None:
            d["_resident_equal"] = r1.get("resident_bytes") == r2.get("resident_bytes")
        out[r2["base_method"]] = d
    return out


def _progress(wl, r: dict) -> str:
    head = f"[{wl.name}] {r['method']:<22}"
    if r["status"] != "ok":
        return f"{head} n/a: {r.get('reason')}"
    parts = []
    if r.get("resident_bytes") is not None:
        parts.append(f"W {r['resident_bytes'] / MiB:.1f} MiB")
    for cname, c in r.get("cases", {}).items():
        if "error" in c:
            parts.append(f"{cname} error")
        else:
            e = c.get("rel_l2_err")
            parts.append(f"{cname} {c['latency_ms_median']:.3f}ms"
                         + (f" err {e:.2e}" if e is not None else ""))
    parts.append(f"exact={'yes' if r.get('bit_exact') else 'no'}")
    parts.append(f"{r.get('wall_s', 0):.1f}s")
    return head + " " + ", ".join(parts)


def run_workload(dev: Dev, wl, method_names: list[str], repeat: list[str],
                 deadline: float | None = None) -> dict:
    inputs = {c.name: c.make_inputs(dev.device) for c in wl.cases}
    dev.sync()
    ref: dict = {}
    plan = [(n, 1) for n in method_names] + [(n, 2) for n in repeat if n in method_names]
    results = []
    for name, run_idx in plan:
        if deadline is not None and time.perf_counter() > deadline:
            r = {"method": name if run_idx == 1 else f"{name} #{run_idx}", "base_method": name,
                 "run": run_idx, "family": M.REGISTRY[name].family, "status": "n/a",
                 "reason": "skipped: --budget-s exceeded"}
        else:
            r = run_one(dev, wl, M.REGISTRY[name], run_idx, inputs, ref)
        results.append(r)
        print(_progress(wl, r), flush=True)
    _fill_ratios(results)
    bf = next((r for r in results if r["base_method"] == "bf16" and r["status"] == "ok"), None)
    del inputs, ref
    dev.cleanup()
    return {
        "name": wl.name, "kind": wl.kind, "description": wl.description, "status": "ok",
        "cases": [c.name for c in wl.cases], "warmup": wl.warmup, "iters": wl.iters,
        "info": wl.info,
        "bf16_param_bytes": bf.get("param_bytes") if bf else None,
        "results": results, "noise": _noise(results),
    }


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def _version(dist: str, module: str | None = None) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        pass
    if module:
        try:
            mod = __import__(module)
            return str(getattr(mod, "__version__", "present"))
        except Exception:
            return None
    return None


def env_info(dev: Dev, args, argv: list[str], preset: str) -> dict:
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.device)
        gib = props.total_memory / 2**30
        dname = f"{props.name} ({gib:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        dname = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {
        "device": dname,
        "device_type": dev.device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python3 " + shlex.join([sys.argv[0]] + argv),
        "preset": preset,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "triton": _version("triton"),
        "accelerate": _version("accelerate"),
        "fp8ctx": _version("fp8ctx", "fp8ctx"),
        "seed": args.seed,
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="toy shapes (for --device cpu)")
    p.add_argument("--quick", action="store_true",
                   help="shrunk run: 2 text layers, VAE 256x256, fewer repeats")
    p.add_argument("--workloads", default=None,
                   help=f"comma list of {W.WORKLOAD_NAMES}, groups {sorted(W.GROUPS)} or globs")
    p.add_argument("--methods", default=None,
                   help="comma list of method names or globs ('all' = every registered one); "
                        "bf16 is always run first as the reference")
    p.add_argument("--text-layers", type=int, default=None,
                   help="decoder layers in the text tower (default 8; 2 with --quick/--tiny)")
    p.add_argument("--repeat", default="bf16,fp8ctx-channel",
                   help="methods run a second time at the end to show noise ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=0,
                   help="soft time limit in seconds: once passed, the remaining methods are "
                        "recorded as skipped (0 = none); the JSON is rewritten after each workload")
    p.add_argument("--out", default=str(HERE / "results.json"), help="JSON output path")
    p.add_argument("--markdown", default=None, help="also write a markdown report here")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the per-case torch.profiler breakdown of the bf16 and fp8ctx methods")
    p.add_argument("--list", action="store_true", help="list workloads and methods, then exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print("workloads:", ", ".join(W.WORKLOAD_NAMES), "| groups:", ", ".join(sorted(W.GROUPS)))
        for n, m in M.REGISTRY.items():
            print(f"  {n:<22} {'(default) ' if m.default() else '(opt-in)  '}{m.about}")
        return 0
    preset = "tiny" if args.tiny else ("quick" if args.quick else "full")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA not available; use --device cpu --tiny")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif not args.tiny:
        print("note: CPU run without --tiny uses real shapes and will be slow", file=sys.stderr)
    else:
        torch.set_num_threads(1)  # toy shapes: threads only add scheduling noise
    dev = Dev(device)
    PROFILE[0] = not args.no_profile

    for mod in ("transformers", "diffusers"):
        try:
            __import__(mod).logging.set_verbosity_error()
        except Exception:
            pass

    wl_names = W.select_workloads(args.workloads)
    method_names = M.select_methods(args.methods)
    if "bf16" in method_names:
        method_names.remove("bf16")
    method_names = ["bf16"] + method_names
    repeat = [n.strip() for n in args.repeat.split(",") if n.strip()]
    for n in repeat:
        if n not in M.REGISTRY:
            raise SystemExit(f"--repeat: unknown method {n!r}")

    report = {"env": env_info(dev, args, argv, preset), "methods": {
        n: {"family": M.REGISTRY[n].family, "about": M.REGISTRY[n].about} for n in method_names},
        "workloads": []}
    print(f"fp8ctx benchmark on {report['env']['device']}, preset {preset}; "
          f"workloads {wl_names}; methods {method_names}", flush=True)
    t_all = time.perf_counter()
    deadline = _T_START + args.budget_s if args.budget_s > 0 else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name in wl_names:
            try:
                wl = W.make_workload(name, preset, args.seed, args.text_layers)
            except Exception as e:
                print(f"[{name}] n/a: {_short_err(e)}", flush=True)
                report["workloads"].append({"name": name, "status": "n/a",
                                            "reason": _short_err(e),
                                            "traceback": traceback.format_exc()})
                continue
            t0 = time.perf_counter()
            try:
                w = run_workload(dev, wl, method_names, repeat, deadline)
            except Exception as e:  # inputs could not be made, etc.
                w = {"name": name, "status": "n/a", "reason": _short_err(e),
                     "traceback": traceback.format_exc()}
                dev.cleanup()
            w["wall_s"] = time.perf_counter() - t0
            report["workloads"].append(w)
            print(f"[{name}] done in {w['wall_s']:.1f}s", flush=True)
            report["wall_s"] = time.perf_counter() - t_all
            out.write_text(json.dumps(O._jsonable(report), indent=1))  # partial results survive
    report["wall_s"] = time.perf_counter() - t_all
    try:
        from fp8ctx import kernels

        report["env"]["tuned_routes"] = [[*key, route] for key, route in kernels.tuned_routes().items()]
    except Exception:  # an fp8ctx without route tuning
        pass
    out.write_text(json.dumps(O._jsonable(report), indent=1))
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(O.markdown(report))
    aux = O.aux_text(report)
    print()
    if aux:
        print(aux)
        print()
    print(f"wrote {out}" + (f" and {args.markdown}" if args.markdown else "")
          + f"; total {report['wall_s']:.1f}s")
    print()
    print(O.text_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
