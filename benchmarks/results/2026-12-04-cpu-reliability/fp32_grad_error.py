"""fp32 gradient error vs float64: fastattn triton (through the interpreter, its default tiles) vs plain
PyTorch fp32 autograd of the same math. B2 Sq256 Sk128 Hq4 Hkv1 D256, q scaled by argv (issue 26, item 1).
--ordered-dot: the interpreter's fp32 tl.dot rounded as a GPU's (fastattn.testing.ordered_fp32_dot, one
FMA chain per element in k order instead of numpy's blocked matmul), three seeds per scale.

    python fp32_grad_error.py 1 10 50                      # fp32_grad_error_interpreter.log
    python fp32_grad_error.py --ordered-dot 1 10 30 50     # fp32_grad_error_ordered_dot.log
"""
import contextlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch

import fastattn
from fastattn import testing


def naive(q, k, v, scale):
    g = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
    p = torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1)
    return (p @ vh).transpose(1, 2)

def errs(qs, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Sq, Sk, Hq, Hkv, D = 2, 256, 128, 4, 1, 256
    q = torch.randn(B, Sq, Hq, D, generator=g) * qs
    k = torch.randn(B, Sk, Hkv, D, generator=g)
    v = torch.randn(B, Sk, Hkv, D, generator=g)
    do = torch.randn(B, Sq, Hq, D, generator=g)
    scale = D ** -0.5
    def grads(fn, dtype):
        xs = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(do.to(dtype))
        return [out.detach()] + [x.grad for x in xs]
    ref = grads(lambda a, b, c: naive(a, b, c, scale), torch.float64)
    tor = grads(lambda a, b, c: naive(a, b, c, scale), torch.float32)
    fa = grads(lambda a, b, c: fastattn.attention(a, b, c, backend="triton"), torch.float32)
    res = {}
    for name, r, t, f in zip(("out", "dq", "dk", "dv"), ref, tor, fa):
        et = (t.double() - r).abs().max().item()
        ef = (f.double() - r).abs().max().item()
        res[name] = (ef, et, ef / et)
    return res

ordered = "--ordered-dot" in sys.argv
for qs in [float(a) for a in sys.argv[1:] if a != "--ordered-dot"] or [1.0, 10.0, 50.0]:
    for seed in (0, 1, 2) if ordered else (0,):
        with testing.ordered_fp32_dot() if ordered else contextlib.nullcontext():
            r = errs(qs, seed)
        parts = [f"{n} {ef:.1e} vs {et:.1e} ({ratio:.1f}x)" for n, (ef, et, ratio) in r.items()]
        print(f"q x{qs:g}" + (f" seed {seed}" if ordered else "") + ": " + ", ".join(parts), flush=True)
