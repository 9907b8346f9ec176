"""Host microseconds of a dense causal forward with grad mode off, per layer, launches stubbed (CPU).

Run from a checkout's root with that checkout on PYTHONPATH (no_grad_before_after.log: 24e3ecc as
"before", 00b44a6 as "after", taking turns):  PYTHONPATH=. python <this file> after
"""

import sys

import torch

from benchmarks import host_overhead as ho

ho.stub_launches()
paths, _ = ho.build_paths("cpu", torch.float32, 1, 16, 2, 16)
dense = paths[0]
fns = {"api fwd": dense.layers["api"], "autograd fwd": dense.layers["autograd"],
       "launcher fwd": dense.layers["launcher"][0], "sdpa fwd": dense.sdpa}
with torch.no_grad():
    result = ho.per_call_us(fns, 200, 20, lambda: None)
print(sys.argv[1], " ".join(f"{k}={v:.1f}" for k, v in result.items()))
