import sys, re
sys.argv = ["x"]
sys.path.insert(0, "/work/main/tools")
import aot_compile_check as a
import triton
seen = []
orig = triton.compile
def cap(*args, **kw):
    c = orig(*args, **kw); seen.append(c); return c
a.triton.compile = cap
cfgs = {"fwd": a.configs.BlockConfig(128, 64, 8, 3), "dkdv": a.configs.BlockConfig(32, 128, 8, 3), "dq": a.configs.BlockConfig(64, 64, 4, 3)}
for kind, cfg in cfgs.items():
    for v in ("dense", "softcap", "softcap_approx"):
        a.compile_one(kind, cfg, "bf16", 128, True, 90, v)
        ptx = seen[-1].asm["ptx"]
        counts = {k.replace("\\", ""): len(re.findall(k, ptx)) for k in (r"ex2\.approx", r"tanh\.approx", r"rcp\.approx", r"div\.full", r"div\.rn")}
        print(kind, v, counts)
