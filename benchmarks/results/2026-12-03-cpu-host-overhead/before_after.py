"""Before/after of the hot-path change on one machine: host time per call of fastattn.attention /
attention_varlen forward+backward (Triton launches stubbed) and SDPA's, with the method of
benchmarks/host_overhead.py (fastest of 30 batches of 200 calls, variants taking turns).

    python before_after.py before OLD_TREE   # PYTHONPATH=OLD_TREE: a checkout of 3ee3fc5, kernels/
                                             # linked as fastattn/kernels
    python before_after.py after REPO

The old code has no launch plans, so the stubs differ: there its _launch (which held the
autotuner's per-call dispatch) and the preprocess launch are no-ops, so its numbers leave out the
autotuner's cost; here every Plan.launch is a no-op.
"""

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402

which, tree = sys.argv[1], sys.argv[2]
assert os.path.dirname(fastattn.__file__).startswith(tree), fastattn.__file__
if which == "before":
    from fastattn.launchers import triton_attention as old

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    old._launch = lambda *a, **k: None
    old.attn_bwd_preprocess_kernel = Stub()
else:
    from fastattn.launchers import plans

    plans.Plan.launch = lambda self, grid, args, stream=None: None
    plans._jit_launch = lambda kernel, grid, args, constexprs, config: None

b, s, h, d = 1, 16, 2, 16
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(b, s, h, d, generator=g).requires_grad_() for _ in range(3))
dout = torch.randn(b, s, h, d, generator=g)
mask = torch.ones(b, s, dtype=torch.bool)
mask[:, -s // 4:] = False
qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))  # SDPA's (B, H, S, D)
dout_t = dout.transpose(1, 2)
qp, kp, vp = (x.detach().reshape(b * s, h, d).requires_grad_() for x in (q, k, v))  # packed (T, H, D)
dout_p = dout.reshape(b * s, h, d)
cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)


def varlen():
    out = fastattn.attention_varlen(qp, kp, vp, cu, cu, s, s, causal=True, backend="triton")
    out.backward(dout_p)


fns = {
    "dense fwd+bwd": lambda: fastattn.attention(q, k, v, causal=True, backend="triton").backward(dout),
    "mask fwd+bwd": lambda: fastattn.attention(q, k, v, key_padding_mask=mask, backend="triton").backward(dout),
    "varlen fwd+bwd": varlen,
    "sdpa dense fwd+bwd": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).backward(dout_t),
    "sdpa mask fwd+bwd": lambda: F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask[:, None, None, :]).backward(dout_t),
}
best = dict.fromkeys(fns, float("inf"))
for fn in fns.values():
    for _ in range(200):
        fn()
for _ in range(30):
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        best[name] = min(best[name], (time.perf_counter() - t0) / 200 * 1e6)
print(json.dumps({"code": which, **{k: round(v, 1) for k, v in best.items()}}))
