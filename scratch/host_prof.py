import cProfile, pstats, sys, time, io
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import torch
import _workloads as W
import fp8ctx
wl = W.make_workload("dit", "full", 0)
case = [c for c in wl.cases if c.name == "512px"][0]
dev = torch.device("cuda")
model = wl.build(dev)
inp = case.make_inputs(dev)
def timeit(f, n=10):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3
with torch.no_grad():
    for mode in ("eager", "compiled"):
        with fp8ctx.fp8_weights(model, granularity="channel", progress_bar=False):
            fwd = model.forward if mode == "eager" else torch.compile(model.forward, dynamic=False)
            f = lambda: fwd(**inp, return_dict=False)[0]
            print(mode, "ms/forward", round(timeit(f), 2), flush=True)
            pr = cProfile.Profile(); pr.enable()
            for _ in range(5): f()
            torch.cuda.synchronize(); pr.disable()
            s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
            s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(30); print(s.getvalue()[:7000])
        torch._dynamo.reset()
