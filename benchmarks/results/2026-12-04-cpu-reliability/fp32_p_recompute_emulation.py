"""Gradients from P recomputed out of the saved lse (fastattn's backward), fp32, against float64 and
against PyTorch's fp32 autograd of the same math. 'same dot': the backward's q.k has the forward's
rounding (a GPU's ordered fp32 FMA dot); 'other dot': a different summation order (numpy's BLAS in
the interpreter)."""
import torch

Sq, Sk, D = 256, 128, 256
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
f32 = torch.float32
def grads_from_p(p, q, k, v, do, scale):
    p = p.double()
    q, k, v, do = (x.double() for x in (q, k, v, do))
    dv = p.T @ do
    dp = do @ v.T
    o = p @ v
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return ds @ k * scale, ds.T @ q * scale, dv
def references(q, k, v, do, scale):
    """(dq, dk, dv) of the plain math in float64, and in fp32 (PyTorch's autograd)."""
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    (torch.softmax(xs[0] @ xs[1].T * scale, -1) @ xs[2]).backward(do.double())
    ref = [x.grad for x in xs]
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    (torch.softmax(xs[0] @ xs[1].T * scale, -1) @ xs[2]).backward(do)
    return ref, [x.grad for x in xs]
def run(qs):
    q = torch.randn(Sq, D) * qs
    k, v, do = torch.randn(Sk, D), torch.randn(Sk, D), torch.randn(Sq, D)
    scale = D ** -0.5
    ref, tor = references(q, k, v, do, scale)
    qk_scale = torch.tensor(scale * LOG2E, dtype=f32)
    dot = q @ k.T
    s2 = dot * qk_scale
    m2 = s2.max(-1).values
    lse = (m2 + torch.log2(torch.exp2(s2 - m2[:, None]).sum(-1))) * torch.tensor(LN2, dtype=f32)
    lse2 = lse[:, None] * torch.tensor(LOG2E, dtype=f32)
    perm = torch.randperm(D)
    other = (k[:, perm] @ q[:, perm].T).T  # same products, another summation order
    res = []
    for name, d in (("same dot", dot), ("other dot", other)):
        p = torch.exp2(d * qk_scale - lse2)
        g = grads_from_p(p, q, k, v, do, scale)
        res.append(name + ": " + ", ".join(f"{n} {((a - r).abs().max() / (t.double() - r).abs().max()).item():.1f}x"
                                          for n, a, t, r in zip(("dq", "dk", "dv"), g, tor, ref)))
    print(f"q x{qs}: " + "; ".join(res))
if __name__ == "__main__":
    torch.manual_seed(0)
    for qs in (1, 10, 50):
        run(qs)
