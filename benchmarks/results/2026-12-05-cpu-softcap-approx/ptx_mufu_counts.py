"""Special-function instructions in the sm_90 PTX of one config per prefill kernel, dense vs softcap
(exp2 tanh) vs softcap through tanh.approx.f32 (run with Triton 3.6 on PYTHONPATH; no GPU needed).

    PYTHONPATH=/path/to/triton-3.6 python benchmarks/results/2026-12-05-cpu-softcap-approx/ptx_mufu_counts.py
"""

import re
import sys
from pathlib import Path

sys.argv = sys.argv[:1]  # aot_compile_check parses nothing at import, but keep its argv clean
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import aot_compile_check as aot  # noqa: E402
import triton  # noqa: E402

compiled = []
_compile = triton.compile


def _keep(*args, **kwargs):
    c = _compile(*args, **kwargs)
    compiled.append(c)
    return c


aot.triton.compile = _keep
CONFIGS = {"fwd": aot.configs.BlockConfig(128, 64, 8, 3), "dkdv": aot.configs.BlockConfig(32, 128, 8, 3),
           "dq": aot.configs.BlockConfig(64, 64, 4, 3)}
OPS = (r"ex2\.approx", r"tanh\.approx", r"rcp\.approx", r"div\.full", r"div\.rn")
for kind, cfg in CONFIGS.items():
    for variant in ("dense", "softcap", "softcap_approx"):
        aot.compile_one(kind, cfg, "bf16", 128, True, 90, variant)
        ptx = compiled[-1].asm["ptx"]
        print(kind, variant, {op.replace("\\", ""): len(re.findall(op, ptx)) for op in OPS})
