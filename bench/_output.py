"""The benchmark's output: the compact text table, the auxiliary lines and the markdown report of a run's
results (the dict bench/compare.py builds and writes as JSON)."""

from __future__ import annotations

import math

import _profile as P

MiB = 1024 * 1024
DTYPE_SHORT = {
    "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
    "torch.float8_e4m3fn": "f8e4m3", "torch.float8_e5m2": "f8e5m2",
}

# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else (f"{x:.2f}" if x < 100 else f"{x:.1f}")


def _err(x) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.1e}")


def _dshort(d) -> str:
    return "-" if d is None else DTYPE_SHORT.get(d, d.replace("torch.", ""))


def _exact(r) -> str:
    v = r.get("bit_exact")
    return "-" if v is None else ("yes" if v else "no")


def _row_cells(r: dict, case_names: list[str]) -> list[str] | None:
    if r["status"] != "ok":
        return None
    cases = r.get("cases", {})
    lat = " ".join("err" if "error" in cases.get(c, {"error": 1}) else
                   _ms(cases[c].get("latency_ms_median")) for c in case_names)
    rat = " ".join(_ratio(cases.get(c, {}).get("latency_ratio")) for c in case_names)
    graph = " ".join(_ratio(cases.get(c, {}).get("graph_ratio")) for c in case_names)
    peaks = [cases[c].get("peak_transient_bytes") for c in case_names
             if c in cases and cases[c].get("peak_transient_bytes") is not None]
    errs = [cases[c].get("rel_l2_err") for c in case_names
            if c in cases and cases[c].get("rel_l2_err") is not None]
    return [r["method"], _mib(r.get("resident_bytes")), _ratio(r.get("resident_ratio")),
            _mib(max(peaks) if peaks else None), lat, rat, graph, _err(max(errs) if errs else None),
            _dshort(r.get("dtype")), _exact(r)]


HEAD = ["method", "W MiB", "xbf16", "peak MiB", "latency ms", "x bf16", "graph x bf16", "rel err",
        "dtype", "exact"]
RIGHT = {1, 2, 3, 4, 5, 6, 7}


def _fmt_row(cells: list[str], widths: list[int]) -> str:
    return " ".join(c.rjust(widths[i]) if i in RIGHT else c.ljust(widths[i])
                    for i, c in enumerate(cells)).rstrip()


def text_table(report: dict, width: int = 100) -> str:
    lines = []
    for w in report["workloads"]:
        if w.get("status") != "ok":
            lines.append(f"== {w['name']}: n/a: {w.get('reason')}"[:width])
            continue
        rows = [_row_cells(r, w["cases"]) for r in w["results"]]
        ok_rows = [c for c in rows if c is not None]
        widths = [max([len(HEAD[i])] + [len(c[i]) for c in ok_rows]) for i in range(len(HEAD))]
        widths[0] = max([widths[0]] + [len(r["method"]) for r in w["results"]])
        lines.append(f"== {w['name']} [{' '.join(w['cases'])}]: {w['description']}"[:width])

        lines.append(_fmt_row(HEAD, widths))
        for r, cells in zip(w["results"], rows, strict=True):
            if cells is None:
                lines.append(f"{r['method'].ljust(widths[0])} n/a: {r.get('reason')}"[:width])
            else:
                lines.append(_fmt_row(cells, widths))
    lines.append("W = resident weights after setup (allocated minus before the model); peak = "
                 "transient peak")
    lines.append("of one forward; latency = median per case (cases in [..]); rel err = max over "
                 "cases vs bf16;")
    lines.append("x bf16 = ratio to bf16 (first run; *-compiled: to bf16-compiled); graph x bf16 = the same ratio for GPU time "
                 "alone (CUDA graph,")
    lines.append("L2 flushed between calls; '-' = not captured); exact = bit-exact after teardown; "
                 "#2 = second run (noise)")
    return "\n".join(lines)


def aux_text(report: dict) -> str:
    lines = []
    for w in report["workloads"]:
        if w.get("status") != "ok":
            continue
        for r in w["results"]:
            ct = r.get("ctx_timings")
            if not ct:
                continue
            parts = []
            for k in ("cpu", "keep", "store"):
                d = ct.get(k, {})
                if "error" in d:
                    parts.append(f"{k}: {d['error'][:60]}")
                elif d:
                    s = f"{k}: enter {d['enter_s']:.3f}s exit {d['exit_s']:.3f}s"
                    if "from_module_s" in d:
                        s += f" (from_module {d['from_module_s']:.3f}s)"
                    parts.append(s)
            lines.append(f"ctx timing [{w['name']}] {r['method']}: " + " | ".join(parts))
        for meth, d in w.get("noise", {}).items():
            sp = ", ".join(f"{c} {v['spread_pct']:.1f}%" for c, v in d.items()
                           if not c.startswith("_"))
            lines.append(f"noise [{w['name']}] {meth} run1 vs run2 latency spread: {sp}")
    na = [(w["name"], r["method"], r.get("reason")) for w in report["workloads"]
          if w.get("status") == "ok" for r in w["results"] if r["status"] != "ok"]
    for wn, m, why in na:
        lines.append(f"n/a [{wn}] {m}: {why}")
    for w in report["workloads"]:
        for r in w.get("results", []):
            if r["status"] == "ok" and r.get("bit_exact") is False and r["family"] == "fp8ctx":
                lines.append(f"WARNING [{w['name']}] {r['method']} not bit-exact after exit: "
                             f"{r.get('exact_detail')}")
    return "\n".join(lines)


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|")


def markdown(report: dict) -> str:
    e = report["env"]
    out = ["# fp8ctx benchmark: fp8ctx vs alternatives", ""]
    out += ["| | |", "|---|---|"]
    for k in ("device", "date", "command", "preset", "python", "torch", "cuda", "triton",
              "diffusers", "transformers", "torchao", "accelerate", "fp8ctx"):
        out.append(f"| {k} | `{_md_escape(e.get(k))}` |")
    out.append(f"| total wall time | {report.get('wall_s', 0):.0f} s |")
    out += ["", "## Summary", "",
            "W = resident weight bytes after setup (memory_allocated after setup minus before the "
            "model existed); peak = transient peak during one forward (max over cases); latency = "
            "median over timed iterations (CUDA events, eager: host cost included) per case; "
            "graph x bf16 = the ratio of GPU time alone (the forward captured in a CUDA graph, "
            "replayed with L2 flushed before each call; '-' where the method cannot be captured); "
            "rel err = relative L2 error of "
            "the output vs the bf16 output (max over cases); dtype = what `model.dtype` (or the "
            "first parameter) reports; exact = every parameter and buffer bit-identical to a "
            "snapshot taken before setup, after teardown.", ""]
    for w in report["workloads"]:
        out.append(f"### {w['name']}")
        out.append("")
        if w.get("status") != "ok":
            out += [f"n/a: {_md_escape(w.get('reason'))}", ""]
            continue
        out.append(f"{_md_escape(w['description'])}. Cases: {', '.join(w['cases'])}; "
                   f"{w['warmup']} warm-up + {w['iters']} timed iterations.")
        out.append("")
        out.append("| " + " | ".join(HEAD) + " |")
        out.append("|" + "|".join("---:" if i in RIGHT else "---" for i in range(len(HEAD))) + "|")
        for r in w["results"]:
            cells = _row_cells(r, w["cases"])
            if cells is None:
                cells = [r["method"], f"n/a: {r.get('reason')}"] + [""] * (len(HEAD) - 2)
            out.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
        out.append("")
    out += ["## Per case", "",
            "| workload | case | method | latency ms | x bf16 | min ms | graph ms | graph x bf16 | "
            "peak MiB | rel err |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for w in report["workloads"]:
        for r in w.get("results", []):
            if r["status"] != "ok":
                continue
            for cname, c in r.get("cases", {}).items():
                if "error" in c:
                    out.append(f"| {w['name']} | {cname} | {r['method']} | "
                               f"{_md_escape(c['error'])} | | | | | | |")
                    continue
                out.append(f"| {w['name']} | {cname} | {r['method']} | "
                           f"{_ms(c.get('latency_ms_median'))} | "
                           f"{_ratio(c.get('latency_ratio'))} | "
                           f"{_ms(c.get('latency_ms_min'))} | "
                           f"{_ms(c.get('graph_ms')) if 'graph_ms' in c else _md_escape(c.get('graph_error', '-'))} | "
                           f"{_ratio(c.get('graph_ratio'))} | "
                           f"{_mib(c.get('peak_transient_bytes'))} | {_err(c.get('rel_l2_err'))} |")
    out += ["", "## Setup, teardown, bit-exactness", "",
            "| workload | method | setup s | teardown s | exact | detail |",
            "|---|---|---:|---:|---|---|"]
    for w in report["workloads"]:
        for r in w.get("results", []):
            if r["status"] != "ok":
                continue
            st, tt = r.get("setup_s"), r.get("teardown_s")
            out.append(f"| {w['name']} | {r['method']} | {'-' if st is None else f'{st:.3f}'} | "
                       f"{'-' if tt is None else f'{tt:.3f}'} | {_exact(r)} | "
                       f"{_md_escape(r.get('exact_detail', ''))} |")
    ctx_rows = []
    for w in report["workloads"]:
        for r in w.get("results", []):
            ct = r.get("ctx_timings")
            if not ct:
                continue
            for k in ("cpu", "keep", "store"):
                d = ct.get(k, {})
                if "error" in d:
                    ctx_rows.append(f"| {w['name']} | {r['method']} | {k} | "
                                    f"{_md_escape(d['error'])} | | | |")
                elif d:
                    fm = d.get("from_module_s")
                    ctx_rows.append(
                        f"| {w['name']} | {r['method']} | {k} | {d['enter_s']:.3f} | "
                        f"{d['exit_s']:.3f} | {'-' if fm is None else f'{fm:.3f}'} | "
                        f"{_mib(d.get('allocated_inside'))} |")
    if ctx_rows:
        out += ["", "## fp8ctx context enter/exit (text tower)", "",
                "originals=cpu is the main run; keep = originals stay on the GPU; store = "
                "`FP8Store.from_module` once, then `fp8_weights(model, store=store)`.", "",
                "| workload | method | mode | enter s | exit s | from_module s | "
                "allocated inside MiB |", "|---|---|---|---:|---:|---:|---:|"] + ctx_rows
    noise_rows = []
    for w in report["workloads"]:
        for meth, d in w.get("noise", {}).items():
            for c, v in d.items():
                if c.startswith("_"):
                    continue
                noise_rows.append(f"| {w['name']} | {meth} | {c} | {_ms(v['run1_ms'])} | "
                                  f"{_ms(v['run2_ms'])} | {v['spread_pct']:.1f}% |")
    if noise_rows:
        out += ["", "## Noise (same method run twice)", "",
                "| workload | method | case | run 1 ms | run 2 ms | spread |",
                "|---|---|---|---:|---:|---:|"] + noise_rows
    out += P.markdown_section(report)
    routes = report["env"].get("tuned_routes")
    if routes:
        out += ["", "## Routes the tuner chose (fp8ctx.kernels.tuned_routes())", "",
                "| token bucket | N | K | dtype | GPU | granularity | block | FP8 | bias | route |",
                "|---:|---:|---:|---|---|---|---:|---|---|---|"]
        out += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in routes]
    na = [(w["name"], r["method"], r.get("reason")) for w in report["workloads"]
          for r in w.get("results", []) if r["status"] != "ok"]
    if na:
        out += ["", "## Not applicable", ""]
        out += [f"- {wn} / {m}: {_md_escape(why)}" for wn, m, why in na]
    out.append("")
    return "\n".join(out)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)
