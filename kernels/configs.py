"""Block sizes for the attention kernels: a small table keyed on head dim, tuned on the GPU.

Each kernel has a short candidate list per head-dim bucket. On a GPU the first call for a new
(head dim, causal, dtype, flags, sequence-length bucket) times the candidates and keeps the fastest
(fastattn.launchers.plans); ``FASTATTN_AUTOTUNE=0`` skips that and uses the first candidate (tests
do this to keep GPU time short; a launch then falls back along the list only if a config does not
fit the chip's shared memory). The Triton interpreter (CPU) always uses one fixed, small config.

Candidates are (BLOCK_M, BLOCK_N, num_warps, num_stages[, tma[, ws]]). BLOCK_M tiles queries,
BLOCK_N keys. tma: the tiles a kernel streams (the forward's and dQ's K/V, dK/dV's Q and dO) move
through tensor descriptors (Hopper's tensor memory accelerator) instead of pointer loads, where the
call allows it (launchers.triton_attention).
ws (the forward only, with tma): Q through a descriptor too and the key loop warp-specialised
(Triton's automatic producer/consumer split), see kernels/attn_fwd.py.
lpt (the prefill kernels): the grid runs the longest tiles of every (batch, head) first, then the
next longest, and so on (greedy longest-processing-time scheduling of causal tiles; kernels/tiles.py,
program_coords).
atomic_dq (dK/dV only; NOT deterministic, so never in a table and no API flag yet: only forced):
dK/dV also computes dQ = dS K for its key tile and adds it into a float32 buffer with atomics, and the
dQ kernel does not run (5 matmuls per pair of tiles instead of 7; see kernels/attn_bwd.py). The sum's
order then varies from run to run, and so do dQ's last bits.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False  # streamed tiles through tensor descriptors (not yet timed on a GPU: in no table)
    ws: bool = False  # the forward's key loop warp-specialised, Q by descriptor too (needs tma; in no table)
    lpt: bool = False  # the longest tiles first (prefill kernels; not yet timed on a GPU: in no table)
    atomic_dq: bool = False  # dK/dV adds dQ with atomics, no dQ kernel (non-deterministic: never in a table)

    def __post_init__(self):
        if self.ws and not self.tma:
            raise ValueError("BlockConfig: ws (a warp-specialised key loop) needs tma (it feeds on descriptors)")

    def constexprs(self, arg_names) -> dict:
        """The config as a kernel's constexprs, those of them among its arg_names (a kernel without
        BLOCK_N takes BLOCK_M only; one without TMA, no streamed-tile path; and so on)."""
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "TMA": self.tma, "WARP_SPEC": self.ws,
                "LPT": self.lpt, "ATOMIC_DQ": self.atomic_dq}
        return {k: v for k, v in meta.items() if k in arg_names}

    def as_list(self) -> list:
        """[BLOCK_M, BLOCK_N, num_warps, num_stages] then tma, ws, lpt, atomic_dq up to the last one
        set (e.g. [128, 64, 8, 3, True] for tma alone): as reports and JSON write it;
        BlockConfig(*as_list()) gives the config back."""
        flags = [self.tma, self.ws, self.lpt, self.atomic_dq]
        while flags and not flags[-1]:
            flags.pop()
        return [self.block_m, self.block_n, self.num_warps, self.num_stages] + flags

    def label(self) -> str:
        """e.g. "128x64 w4 s3 tma ws lpt" (dK/dV's may end in " atomic-dq")."""
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}" + " tma" * self.tma
                + " ws" * self.ws + " lpt" * self.lpt + " atomic-dq" * self.atomic_dq)


def _table(rows):
    return {d: [BlockConfig(*c) for c in cands] for d, cands in rows.items()}


# Keyed on the padded head dim bucket (<= 64, <= 128, <= 256).
GPU_CANDIDATES = {
    "fwd": _table({
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
        256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    }),
    # dK/dV: BLOCK_N keys stay resident, BLOCK_M query tiles stream.
    "dkdv": _table({
        64: [(64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3)],
        # (64x128 w8 s3: FlexAttention's sm_90 choice for its dK/dV blocks at D <= 128, torch 2.13;
        # compiles for sm_90 with 0-4 B spill, 161 KiB shared; untimed here, the tuner decides)
        128: [(64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 3)],
        256: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    }),
    # dQ: BLOCK_M queries stay resident, BLOCK_N key tiles stream.
    "dq": _table({
        64: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
        128: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3)],  # (last: Flex's)
        256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    }),
    # The bias gradient summed over the batch/heads (kernels/bias_grad.py; FASTATTN_BIAS_GRAD=kernel):
    # one (BLOCK_M, BLOCK_N) tile of it per program, two matmuls per (batch, head) it sums. Not yet
    # timed on a GPU: chosen by what compiles for sm_90 (tools/aot_compile_check.py --kinds dbias;
    # benchmarks/results/2026-12-05-cpu-dbias/): no spills but the s1 configs' 8-60 B (every modifier
    # on); s1 runs the loop unpipelined, in half the shared memory or less.
    "dbias": _table({
        64: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 1), (128, 32, 8, 2)],
        128: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 1), (128, 32, 8, 2)],
        256: [(64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 4, 1)],
    }),
    # Split-KV decoding (kernels/decode.py): only BLOCK_N (keys per step) and the launch settings
    # matter; the query-row tile follows the call (GQA group x new tokens). Memory-bound: pipelined
    # key tiles. Not yet timed on a GPU (the decode kernel is not in "auto" yet): chosen by what
    # compiles for sm_90 without register spills (benchmarks/results/2026-12-03-cpu-decode/).
    "decode": _table({
        64: [(0, 128, 8, 3), (0, 64, 4, 4), (0, 32, 4, 4)],
        128: [(0, 64, 8, 3), (0, 128, 8, 3), (0, 32, 4, 4)],
        256: [(0, 32, 8, 3), (0, 32, 4, 3), (0, 64, 8, 2)],
    }),
}

# The wider space the GPU table is chosen from: tools/aot_compile_check.py --configs sweep compiles
# it for a target (shared memory, registers, spills), benchmarks/config_sweep.py times what
# compiles well against the table and cuDNN on a GPU; winners move into GPU_CANDIDATES.
SWEEP_TILES = (32, 64, 128)
SWEEP_WARPS = (4, 8)
SWEEP_STAGES = (2, 3, 4)


def sweep_space(kind: str) -> list[BlockConfig]:
    """Every (BLOCK_M, BLOCK_N, num_warps, num_stages) of the sweep for one kernel, the same for each
    head dim (32x32 tiles left out: the fallback's, too small for wgmma); also with the streamed
    tiles through tensor descriptors (tma), and the forward's with tma and a warp-specialised key loop
    (ws) at 4 warps only: Triton 3.6 warp-specialises on sm_90 only there (at 8 it compiles the loop
    unspecialised, silently: the same kernel as tma's)."""
    paths = ((False, False), (True, False)) + (((True, True),) if kind == "fwd" else ())
    return [BlockConfig(m, n, w, s, t, ws) for t, ws in paths for m in SWEEP_TILES for n in SWEEP_TILES
            if (m, n) != (32, 32) for w in SWEEP_WARPS if not (ws and w != 4) for s in SWEEP_STAGES]


# fp32 runs true-fp32 dots on the FMA units (no tensor cores): small tiles keep registers, shared
# memory and compile time (fully unrolled FMA dots) in check. It is the accuracy path, not a fast one.
FP32_CONFIGS = {"fwd": BlockConfig(32, 32, 4, 2), "dkdv": BlockConfig(32, 32, 4, 1), "dq": BlockConfig(32, 32, 4, 1),
                "dbias": BlockConfig(32, 32, 4, 1), "decode": BlockConfig(0, 16, 8, 1)}  # decode: no spills on sm_90 for D up to 256

# Small enough for any head dim and dtype: without autotuning, a launch whose config does not fit
# the chip's shared memory falls back along the list to this one.
FALLBACK = BlockConfig(32, 32, 4, 1)

# The backward's row-wise preprocess (delta = rowsum(dO * O)): memory-bound, one config everywhere.
# Also the launch settings of the small row-wise kernels (key bounds, decode combine, KV append).
PREPROCESS = BlockConfig(64, 64, 4, 1)

# Interpreter: BLOCK_M != BLOCK_N on purpose, so CPU tests exercise the unequal-tile causal logic.
INTERPRETER_CONFIGS = {
    "fwd": BlockConfig(64, 32),
    "dkdv": BlockConfig(32, 64),
    "dq": BlockConfig(64, 32),
    "dbias": BlockConfig(32, 64),
    "decode": BlockConfig(0, 32),
}

_forced: dict[str, BlockConfig] = {}


# Triton picks the interpreter when the kernels are defined (at import), from TRITON_INTERPRET.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_enabled() -> bool:
    return _INTERPRETER


def settings() -> tuple:
    """What picks a kernel's candidates besides its call: the pinned configs and autotuning."""
    return tuple(_forced.items()), autotune_enabled()


def autotune_enabled() -> bool:
    return not interpreter_enabled() and os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


def head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def seq_bucket(n: int) -> int:
    """Sequence lengths share a tuned config within a power of two (capped), to bound retuning."""
    return min(1 << (max(n, 1) - 1).bit_length(), 16384)  # (triton.next_power_of_2: 4 us a call)


def candidates(kind: str, block_d: int, fp32: bool) -> list[BlockConfig]:
    """Configs the kernel may use, best guess first: a forced one, the interpreter's, fp32's, or the
    GPU table's (ending with the fallback when not autotuning)."""
    if kind in _forced:
        return [_forced[kind]]
    if interpreter_enabled():
        return [INTERPRETER_CONFIGS[kind]]
    if fp32:
        return [FP32_CONFIGS[kind], FALLBACK]
    table = GPU_CANDIDATES[kind][head_dim_bucket(block_d)]
    return table if autotune_enabled() else table + [FALLBACK]


@contextlib.contextmanager
def forced(**configs: BlockConfig):
    """Pin block configs, e.g. ``forced(fwd=BlockConfig(16, 32))``: tests cover other tilings."""
    unknown = set(configs) - set(GPU_CANDIDATES)
    if unknown:
        raise ValueError(f"unknown kernel kinds {sorted(unknown)}; expected {sorted(GPU_CANDIDATES)}")
    for kind, c in configs.items():
        if ((c.ws and kind != "fwd") or (c.lpt and kind in ("decode", "dbias")) or (c.atomic_dq and kind != "dkdv")
                or (c.tma and kind == "dbias")):
            raise ValueError(f"forced({kind}={c.label()}): {kind} has no such path (ws: fwd only; lpt: "
                             "fwd, dkdv, dq; tma: not dbias; atomic_dq: dkdv only)")
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)
