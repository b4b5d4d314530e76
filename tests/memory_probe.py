"""Peak RSS increase of one fused (or reference) forward+backward, in a fresh process.

python tests/memory_probe.py IMPL N_HEADS ROWS D V DTYPE -> prints JSON with the increase in
bytes and the bytes of the gradients (the outputs)."""
import json
import resource
import sys

import torch

import mtp_ext
from mtp_ext import reference


def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    impl, n, N, D, V, dtype = sys.argv[1], *map(int, sys.argv[2:6]), getattr(torch, sys.argv[6])
    fn = {"fused": mtp_ext.mtp_loss, "reference": reference.mtp_loss}[impl]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 1, N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (1, N), generator=g)
    # warm up libraries, threads and kernels on a small problem that frees nothing big
    small = torch.randn(n, 1, 8, D).to(dtype).requires_grad_()
    fn(small, w[:64].detach().requires_grad_(), labels[:, :8] % 64).loss.backward()
    base = maxrss()
    fn(h, w, labels).loss.backward()
    grads = h.grad.nbytes + w.grad.nbytes
    print(json.dumps({"increase": maxrss() - base, "grads": grads}))


if __name__ == "__main__":
    main()
