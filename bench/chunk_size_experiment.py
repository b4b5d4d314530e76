"""Fused loss time against chunk_size at V = 128256 (n = 4, N = 512, D = 1024), bf16 and fp32,
forward+backward, median of 3: python bench/chunk_size_experiment.py prints the times."""
import statistics, time, torch, mtp_ext
from mtp_ext import benchmark as B
for dt in ("bf16", "fp32"):
    case = B.Case(n=4, N=512, D=1024, V=128256, dtype=dt)
    h0, w0, labels = B.make_inputs(case)
    for cs in (None, 512, 1024, 2048):
        def step():
            h = h0.detach().requires_grad_(); w = w0.detach().requires_grad_()
            mtp_ext.mtp_loss(h, w, labels, chunk_size=cs).loss.backward()
        step()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
        print(dt, "chunk_size", cs, "median %.3f" % statistics.median(ts), [round(t, 3) for t in ts], flush=True)
