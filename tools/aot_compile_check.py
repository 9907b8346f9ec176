"""Compile the Triton kernels for a GPU target on a machine without a GPU (no launch).

    python tools/aot_compile_check.py [--arch 90] [--dtype fp16] [--head-dims 64,128,256]
        [--variants dense,mask,varlen,bias,alibi,window,softcap,softcap_approx,sinks,all] [--decode-only | --no-decode]
        [--configs table|sweep] [--json FILE] [--kinds fwd,dkdv,dq] [--filter ' ws'] [--twin lpt|atomic_dq]

The prefill kernels are compiled as the runtime specialises a typical call (typical_ints,
specialize: aligned pointers and strides, MHA's group of 1 as a constant; --group for GQA). Before
2026-12-05 they were compiled unspecialised, which overstated registers and spills several-fold
(dK/dV at D=128: 1492 B then, 12 B now) and understated shared memory (no pipelined 16-byte copies).

Catches what the interpreter does not: compile errors, configs whose shared memory exceeds the
chip (H100: 227 KiB per block), and dots that did not lower to tensor-core instructions (wgmma on
sm_90, mma on sm_80; "+tma" where tiles move through tensor descriptors, "+ws" where a loop is
warp-specialised), with registers and spills from ptxas -v. Uses the ptxas bundled with triton.
Takes minutes: a maintainer tool, not part of the test suite. ``--configs sweep`` compiles the
prefill kernels in every config of kernels/configs.sweep_space(kind) instead of the GPU table
(benchmarks/config_sweep.py times what compiles well); ``--json`` writes one record per compiled
prefill kernel.

Needs only Triton (not torch, not an installed fastattn): kernels/ is loaded as fastattn.kernels
from the repository, so the check also runs against another Triton, e.g. the GPU image's version
installed under its Python with `pip install --target DIR triton==X` and `PYTHONPATH=DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import importlib.util  # noqa: E402
import types  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _load_kernels():
    """kernels/ as the package fastattn.kernels, without running fastattn/__init__ (it imports torch)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "fastattn" not in sys.modules:
        sys.modules["fastattn"] = types.ModuleType("fastattn")
    spec = importlib.util.spec_from_file_location("fastattn.kernels", os.path.join(root, "kernels", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "kernels")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["fastattn.kernels"] = package
    spec.loader.exec_module(package)
    return [importlib.import_module(f"fastattn.kernels.{m}")
            for m in ("configs", "attn_fwd", "attn_bwd", "bias_grad", "key_bounds", "decode")]


configs, _fwd, _bwd, _bias_grad, _bounds, _decode = _load_kernels()
KERNELS = {"fwd": _fwd.attn_fwd_kernel, "dkdv": _bwd.attn_bwd_dkdv_kernel, "dq": _bwd.attn_bwd_dq_kernel,
           "dbias": _bias_grad.attn_bwd_dbias_kernel}
TENSOR_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "K_NEW", "V_NEW", "K_CACHE", "V_CACHE")
FP32_POINTERS = ("LSE", "DELTA", "DLSE", "O_PART", "LSE_PART", "ALIBI", "SINKS", "DBIAS", "DQ_SUM")
INT32_POINTERS = ("KV_BOUNDS", "CU_Q", "CU_K", "BOUNDS", "SEQLENS", "BLOCK_TABLE")
SCALARS_FP32 = ("qk_scale", "sm_scale", "cap2")
# Score-modifier variants (--variants): the kernels' modifier flags each turns on.
MOD_VARIANTS = {"bias": ("HAS_BIAS", "HAS_DBIAS"), "alibi": ("HAS_ALIBI",), "window": ("LOCAL",),
                "softcap": ("SOFTCAP",), "softcap_approx": ("SOFTCAP",), "sinks": ("HAS_SINKS",),
                "all": ("HAS_BIAS", "HAS_DBIAS", "HAS_ALIBI", "LOCAL", "SOFTCAP", "HAS_SINKS")}
MOD_FLAGS = ("LOCAL", "HAS_BIAS", "HAS_ALIBI", "SOFTCAP", "HAS_SINKS", "HAS_DBIAS")


def mod_flags(kernel, variant: str) -> dict:
    """The kernel's modifier constexprs for a variant (off for dense/mask/varlen)."""
    on = MOD_VARIANTS.get(variant, ())
    flags = {f: f in on for f in MOD_FLAGS if f in kernel.arg_names}
    if variant == "softcap_approx" and "SOFTCAP" in flags:
        flags["SOFTCAP"] = 2  # tanh.approx.f32 (FASTATTN_SOFTCAP_TANH=approx)
    return flags
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def signature(kernel, dtype: str, constexprs: dict, fp32_outputs: bool = False) -> dict:
    """Triton signature: tensors in `dtype` (O in fp32 with fp32_outputs: split-KV partials)."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif fp32_outputs and name == "O":
            sig[name] = "*fp32"
        elif name == "LSE" and dtype == "fp32" and kernel in KERNELS.values():
            sig[name] = "*fp64"  # the prefill kernels save a float64 lse for fp32 inputs (launchers: lse_dtype)
        elif name == "DBIAS" and kernel is KERNELS["dbias"]:
            sig[name] = "*" + dtype  # summed in the kernel, written in the bias's dtype
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name in TENSOR_POINTERS or name == "BIAS":
            sig[name] = "*" + dtype
        elif name in SCALARS_FP32:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def typical_ints(head_dim: int, group: int, heads: int = 16, seqlen: int = 16384) -> dict:
    """The prefill kernels' integer arguments in a typical call: contiguous (B, S, H, D) tensors
    (H = heads * group query heads, heads KV heads), S = seqlen, a (1, H, S, S) bias, a window of
    4095 keys. The runtime specialises on them (see specialize), so the compile check does too."""
    hq = heads * group
    q_like = dict(b=seqlen * hq * head_dim, s=hq * head_dim, h=head_dim)  # q, o, do, dq
    kv_like = dict(b=seqlen * heads * head_dim, s=heads * head_dim, h=head_dim)  # k, v, dk, dv
    ints = {f"stride_{t}{a}": n for t in ("q", "o", "do", "dq") for a, n in q_like.items()}
    ints.update({f"stride_{t}{a}": n for t in ("k", "v", "dk", "dv") for a, n in kv_like.items()})
    ints.update(stride_lb=hq * seqlen, stride_lh=seqlen, stride_kpm_b=seqlen, GROUP=group, Sq=seqlen, Sk=seqlen,
                stride_bb=0, stride_bh=seqlen * seqlen, stride_bm=seqlen, stride_bn=1, stride_ab=0, left=4095,
                right=0, stride_dbb=0, stride_dbh=seqlen * seqlen, stride_dbm=seqlen,
                n_b=2, n_h=1, Hb=hq)  # (the dbias kernel: a (1, H, S, S) bias's gradient, summed over B=2)
    return ints


def specialize(kernel, signature_: dict, constexprs: dict, ints: dict) -> dict:
    """Triton's runtime specialisation of a call, applied to a compile: an integer argument equal to
    1 becomes the constant 1 (MHA's group of one head), one divisible by 16 and every
    pointer (fresh tensors are 16-byte aligned) get tt.divisibility 16 (wider loads). Arguments in
    do_not_specialize keep neither. Updates signature_ and constexprs; returns the attrs."""
    attrs = {}
    skip = {kernel.arg_names[p.num] for p in kernel.params if p.do_not_specialize}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs or name in skip:
            continue
        if signature_[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints and ints[name] == 1:
            signature_[name] = "constexpr"
            constexprs[name] = 1
        elif name in ints and ints[name] % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_one(kind, cfg, dtype, head_dim, causal, arch, variant="dense", group=1):
    block_d = max(16, triton.next_power_of_2(head_dim))
    kernel = KERNELS[kind]
    constexprs = dict(CAUSAL=causal, HAS_KPM=variant == "mask", VARLEN=variant == "varlen", HEAD_DIM=head_dim,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                      BLOCK_D=block_d, WIDE=False, **mod_flags(kernel, variant), **cfg.constexprs(kernel.arg_names),
                      **({"GQA": group > 1} if "GQA" in kernel.arg_names else {}))
    sig = signature(kernel, dtype, constexprs)
    attrs = specialize(kernel, sig, constexprs, typical_ints(head_dim, group))
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    return compiled.metadata.shared, _instructions(ptx), time.time() - t0, _registers(ptx, arch)


def compile_small_kernels(dtype, arch):
    """The backward's preprocess (per head dim bucket, with and without dlse) and key_bounds: no
    table configs, one launch config each."""
    results = []
    for d in (40, 64, 128, 256):
        for has_dlse in (False, True):
            consts = dict(HAS_DLSE=has_dlse, HEAD_DIM=d, BLOCK_M=configs.PREPROCESS.block_m,
                          BLOCK_D=max(16, triton.next_power_of_2(d)), WIDE=False)
            results.append((f"preprocess D{d} dlse={has_dlse}", _bwd.attn_bwd_preprocess_kernel, consts,
                            configs.PREPROCESS))
    results.append(("key_bounds", _bounds.key_bounds_kernel, dict(BLOCK=1024), configs.PREPROCESS))
    bad = 0
    for label, kernel, consts, cfg in results:
        try:
            src = ASTSource(fn=kernel, signature=signature(kernel, dtype, consts), constexprs=consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            print(f"{label:<36} ok   smem {compiled.metadata.shared:>6} {_registers(compiled.asm['ptx'], arch)}")
        except Exception as e:
            bad += 1
            print(f"{label:<36} FAILED: {type(e).__name__}: {str(e)[-400:]}")
    return bad


def compile_decode_kernels(dtype, arch, head_dims, variants=("dense",)):
    """The split-KV decode kernel (each candidate; contiguous and paged caches; one query row
    tile of GQA 4 x 1 token and a full one; final output and fp32 partials; each score-modifier
    variant asked for; "full": the few-query route's cache without lengths, "mask": that with a
    key-padding mask), its combine, the KV append."""
    jobs = []
    variants = [v for v in variants if v in ("dense", "full", "mask", *MOD_VARIANTS)]
    for d in head_dims:
        block_d = max(16, triton.next_power_of_2(d))
        fp32 = dtype == "fp32"
        cands = [configs.FP32_CONFIGS["decode"]] if fp32 else configs.GPU_CANDIDATES["decode"][
            configs.head_dim_bucket(block_d)]
        for cfg in cands:
            for page_size in (0, 16, 64):
                for block_r in (16, 64 if d <= 128 else 32):
                    for variant in variants:
                        partial = block_r == 16 and page_size == 16
                        consts = dict(CAUSAL=True, PAGE_SIZE=page_size, HEAD_DIM=d,
                                      DOT_PRECISION="ieee" if fp32 else "tf32", BLOCK_R=block_r, BLOCK_N=cfg.block_n,
                                      BLOCK_D=block_d, WIDE=False, HAS_KPM=variant == "mask",
                                      FULL=variant in ("full", "mask"),
                                      **mod_flags(_decode.decode_attn_kernel, variant))
                        label = (f"decode D{d} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} page{page_size} "
                                 f"r{block_r} {variant}")
                        jobs.append((label + (" partial" if partial else ""), _decode.decode_attn_kernel, consts, cfg,
                                     partial))
        jobs.append((f"decode_combine D{d}", _decode.decode_combine_kernel,
                     dict(HEAD_DIM=d, BLOCK_S=128, BLOCK_D=block_d), configs.PREPROCESS, False))
        for page_size in (0, 16):
            jobs.append((f"kv_append D{d} page{page_size}", _decode.kv_append_kernel,
                         dict(HEAD_DIM=d, BLOCK_D=block_d, PAGE_SIZE=page_size), configs.PREPROCESS, False))
    bad = 0
    for label, kernel, consts, cfg, partial in jobs:
        try:
            src = ASTSource(fn=kernel, signature=signature(kernel, dtype, consts, partial), constexprs=consts)
            t0 = time.time()
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            ptx = compiled.asm["ptx"]
            mma = _instructions(ptx)
            over = compiled.metadata.shared > SMEM_LIMIT.get(arch, 1 << 30)
            bad += over
            print(f"{label:<52} ok   smem {compiled.metadata.shared:>6} {mma:<6} {_registers(ptx, arch):<22} "
                  f"{time.time() - t0:4.1f}s{' OVER SMEM LIMIT' if over else ''}", flush=True)
        except Exception as e:
            bad += 1
            print(f"{label:<52} FAILED: {type(e).__name__}: {str(e)[-400:]}")
    return bad


def _instructions(ptx: str) -> str:
    """The matrix instructions in the PTX (wgmma on sm_90, mma.sync otherwise, or none), plus "+tma"
    when it moves tiles with the tensor memory accelerator (cp.async.bulk.tensor: tensor
    descriptors) and "+ws" when it is warp-specialised (setmaxnreg: the warp groups' register split,
    which Triton's specialisation emits on sm_90)."""
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
    return mma + ("+tma" if "cp.async.bulk.tensor" in ptx else "") + ("+ws" if "setmaxnreg" in ptx else "")


def _registers(ptx: str, arch: int) -> str:
    """Registers and spill bytes from `ptxas -v` (triton's bundled ptxas) on the generated PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    tool = getattr(tool, "path", tool)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([tool, "-v", f"-arch={arch_flag}", path, "-o", os.devnull], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spill"


def _record(kind, d, causal, variant, cfg, smem, mma, regs, arch) -> dict:
    """One compiled prefill kernel as --json writes it (spill -1: ptxas did not say)."""
    n_regs, spill = (int(x) if x.isdigit() else -1 for x in re.findall(r"(\S+) (?:regs|B spill)", regs))
    return {"kind": kind, "head_dim": d, "causal": causal, "variant": variant,
            "config": cfg.as_list(), "smem": smem, "mma": mma,
            "regs": n_regs, "spill": spill, "fits": smem <= SMEM_LIMIT.get(arch, 1 << 30)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--variants", default="dense",
                    help="comma list of dense, mask (key padding), varlen, and the score modifiers "
                         f"{', '.join(MOD_VARIANTS)}; for the decode kernel also full (the few-query route)")
    ap.add_argument("--decode-only", action="store_true", help="only the decoding kernels (kernels/decode.py)")
    ap.add_argument("--no-decode", action="store_true", help="all but the decoding kernels")
    ap.add_argument("--configs", default="table", choices=["table", "sweep"],
                    help="prefill kernels: the GPU table's candidates, or configs.sweep_space(kind)")
    ap.add_argument("--json", default=None, help="write the prefill kernels' records here")
    ap.add_argument("--kinds", default=",".join(KERNELS), help=f"prefill kernels, of {','.join(KERNELS)}")
    ap.add_argument("--group", type=int, default=1,
                    help="query heads per KV head of the typical call the prefill kernels are specialised for "
                         "(1: MHA; more compiles dK/dV's one loop over (head, query block), its GQA constexpr)")
    ap.add_argument("--twin", choices=["lpt", "atomic_dq"], default=None,
                    help="each config as its twin with this flag set: lpt (the longest tiles first), atomic_dq "
                         "(dK/dV adds dQ with atomics; dK/dV's configs only)")
    ap.add_argument("--filter", default="",
                    help="only configs whose label holds this, e.g. ' ws' (labels: '128x64 w4 s3 tma ws')")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    bad = 0
    if not args.no_decode:
        bad += compile_decode_kernels(args.dtype, args.arch, list(map(int, args.head_dims.split(","))),
                                      args.variants.split(","))
    if args.decode_only:
        print(f"{bad} problem(s)")
        return 1 if bad else 0
    if args.configs == "table":
        bad += compile_small_kernels(args.dtype, args.arch)
    records = []
    print(f"{'kernel':<5} {'D':>4} {'causal':<6} {'config / variant':<30} {'smem':>7} {'mma':<6} "
          f"{'registers':<22} time")
    for d in map(int, args.head_dims.split(",")):
        block_d = max(16, triton.next_power_of_2(d))
        for causal, variant in ((c == "1", v) for c in args.causal.split(",") for v in args.variants.split(",")):
            for kind in args.kinds.split(","):
                if args.configs == "sweep":
                    cands = configs.sweep_space(kind)
                elif args.dtype == "fp32":
                    cands = [configs.FP32_CONFIGS[kind], configs.FALLBACK]
                else:
                    cands = configs.GPU_CANDIDATES[kind][configs.head_dim_bucket(block_d)] + [configs.FALLBACK]
                if args.twin and (args.twin != "atomic_dq" or kind == "dkdv"):
                    cands = [dataclasses.replace(c, **{args.twin: True}) for c in cands]
                for cfg in (c for c in cands if args.filter in c.label()):
                    try:
                        smem, mma, dt, regs = compile_one(kind, cfg, args.dtype, d, causal, args.arch, variant,
                                                          args.group)
                    except Exception as e:
                        bad += 1
                        print(f"{kind:<5} {d:>4} {causal!s:<6} {cfg} FAILED: {type(e).__name__}: {str(e)[-400:]}")
                        continue
                    over = smem > SMEM_LIMIT.get(args.arch, 1 << 30)
                    want = "wgmma" if args.arch >= 90 else "mma"
                    flag = " OVER SMEM LIMIT" if over else ""
                    bad += bool(flag) and args.configs == "table"  # the sweep expects some not to fit
                    # wgmma needs 64-row tiles; 32-row tiles (the fallback) use mma.sync on sm_90.
                    flag += f" (note: {mma}, not {want})" if args.dtype != "fp32" and not mma.startswith(want) else ""
                    label = f"{cfg.label()} {variant}"
                    print(f"{kind:<5} {d:>4} {causal!s:<6} {label:<30} {smem:>7} {mma:<6} {regs:<22} {dt:4.1f}s{flag}",
                          flush=True)
                    records.append(_record(kind, d, causal, variant, cfg, smem, mma, regs, args.arch))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "dtype": args.dtype, "group": args.group,
                       "specialized": "runtime-like (typical_ints)", "records": records}, f,
                      indent=1)
    print(f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
