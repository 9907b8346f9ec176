"""Launch the Triton attention kernels (kernels/ -> here -> fastattn.ops).

Inputs are FlashAttention-layout tensors q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), or packed
sequences q (Tq, Hq, D), k/v (Tk, Hkv, D) with int32 cu_seqlens, with any strides whose last dim is
contiguous; they are passed to the kernels as base pointer + strides, with no copy. An optional
key-padding mask (B, Sk) (True = real key) applies to padded inputs, with its key bounds
(``masks.key_bounds``; the ops compute them once per forward and pass them to the backward too).
Outputs are allocated contiguous.

Score modifiers (fastattn/modifiers.py) arrive as bias (4-D, broadcastable to (B, Hq, Sq, Sk); its
stride-0 expansion is what the kernels read), alibi_slopes (B or 1, Hq) float32, sinks (Hq,),
window_left/right (-1 = unbounded) and softcap (0 = off): the ops' flat arguments, which the
public functions here take too and gather into one ``score_mods.Mods`` record for the rest. Without
them every modifier argument is a constant and the kernels compile without the modifier code.

Each kernel's flat runtime argument order (pointers, ints, floats: what the launch plans pass before
the constexprs) is written once, in its builder (``_fwd_args``, ``_preprocess_args``, ``_dkdv_args``,
``_dq_args``).

Host time is part of a call's cost. A call builds its integer arguments once and looks its launch
plans up (``plans``) by everything that decides them: kernel flags, dtype, device, the integers
themselves and pointer alignment. A hit launches straight away; a miss (a new shape) builds the
plans. Nothing here reads a tensor's values (no host sync), and scratch comes from torch's
allocator, so a warmed-up call can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import triton

from fastattn.kernels import configs
from fastattn.kernels.attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from fastattn.kernels.attn_fwd import attn_fwd_kernel
from fastattn.kernels.bias_grad import attn_bwd_dbias_kernel
from fastattn.launchers import plans
from fastattn.launchers.device import on_device
from fastattn.launchers.key_bounds import key_bounds
from fastattn.launchers.score_mods import NO_FLAGS, Mods, bias_grad_in_kernel, launch_args

LOG2E = math.log2(math.e)
MAX_CACHED_SIGNATURES = plans.MAX_SIGNATURES

_plans = plans.signature_cache()
_class_plans = plans.signature_cache()  # the forward's plans by plans.class_key, after _plans misses


@contextlib.contextmanager
def forced_configs(**cfgs: configs.BlockConfig):
    """Launch with pinned block configs, e.g. ``forced_configs(fwd=BlockConfig(16, 32))`` (tests cover
    other tilings); plans made before or inside are dropped on the way in and out."""
    clear_plans()
    try:
        with configs.forced(**cfgs):
            yield
    finally:
        clear_plans()


def clear_plans() -> None:
    """Forget every launch plan and tuned config, of every launcher (tests; a long-running process
    changing shapes)."""
    plans.clear()


def _needs_wide_offsets(varlen: bool, max_rows: int, *xs: torch.Tensor) -> bool:
    """True when a row offset inside one (batch, head) slice can reach 2**31 elements: the kernels
    then compute row offsets in 64 bits (slower: 64-bit offset vectors spill registers). Packed
    inputs (T, H, D) add a 64-bit sequence start, so only their rows within a sequence (max_rows)
    count."""
    if varlen:
        return _wide_rows(max_rows, max(x.stride(0) for x in xs))
    return any(_wide_rows(x.shape[1], x.stride(1)) for x in xs)


def _wide_rows(rows: int, row_stride: int) -> bool:
    return (rows + 256) * row_stride >= 2**31


@functools.lru_cache(maxsize=4096)  # (per call: 2.3 us to work out, 0.2 to look up)
def _packed_rows(sq: int, sk: int, row_stride: int) -> tuple:
    """A packed call's max_seqlen_q/k as its launch plans depend on them (they change with almost
    every batch, and a plan keyed on their values was rebuilt, through Triton's JIT launch, for each):
    how Triton specialises them, the tuning bucket, 64-bit row offsets (_needs_wide_offsets; row_stride:
    the largest of the call's tensors), and the values themselves only past 16 x the grid limit (where
    an lpt grid may not fit them)."""
    rows = max(sq, sk)
    return (plans.specialization((sq, sk)), configs.seq_bucket(rows), _wide_rows(rows, row_stride),
            (sq, sk) if rows > 16 * MAX_GRID_YZ else None)


def _layout(varlen: bool, *xs: torch.Tensor):
    """xs with a unit-stride last dim (the kernels index the head dim with unit stride: anything
    else costs one copy), and their (batch, seq, head) strides, flattened. Packed tensors (T, H, D)
    get batch stride 0: the batch index picks a sequence through cu_seqlens."""
    tensors, strides = [], []
    for x in xs:
        st = x.stride()
        if st[-1] != 1:
            x = x.contiguous()
            st = x.stride()
        tensors.append(x)
        strides += (0, st[0], st[1]) if varlen else st[:3]
    return tensors, tuple(strides)


def _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(batch, Sq, Sk, Hq, Hkv, D, Tq, Tk); packed inputs: Sq/Sk are the max lengths, Tq/Tk the totals
    (0 for padded inputs, where the kernels do not read them)."""
    if cu_seqlens_q is None:
        b, sq, hq, d = q.shape
        return b, sq, k.shape[1], hq, k.shape[2], d, 0, 0
    tq, hq, d = q.shape
    return cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, hq, k.shape[1], d, tq, k.shape[0]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the lse the kernels save for the backward: float64 for fp32 inputs (an fp32
    natural-log lse rounds the forward's log2 statistics by up to 3 ulps, which doubles fp32's
    gradient error on peaky rows: docs/design.md, "Precision of the backward"), else float32. The
    lse a caller gets back is float32 either way (fastattn.ops.autograd, ring_blocks)."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def _contiguous_strides(varlen: bool, s: int, h: int, d: int) -> tuple:
    # The (batch, seq, head) strides of a freshly allocated contiguous (B, S, H, D) / (T, H, D) tensor.
    return (0, h * d, d) if varlen else (s * h * d, h * d, d)


def _masks(q, key_padding_mask, kv_bounds, cu_seqlens_q, cu_seqlens_k):
    """(kpm uint8, kv_bounds, cu_q, cu_k, kpm row stride, the tensors among them that a call uses).
    Pointers a call does not use (their flag is off) get q as a placeholder: never read, and
    nothing to allocate."""
    if cu_seqlens_q is not None:
        cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # read with unit stride
        return q, q, cu_q, cu_k, 0, (cu_q, cu_k)
    if key_padding_mask is None:
        return q, q, q, q, 0, ()
    kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    kpm = kpm.view(torch.uint8)
    bounds = key_bounds(key_padding_mask) if kv_bounds is None else kv_bounds
    return kpm, bounds, q, q, kpm.stride(0), (kpm, bounds)


def _constexprs(q, causal, has_kpm, varlen, head_dim, wide, flags=None) -> dict:
    # fp32 inputs are computed in true fp32: tf32 would fail the tolerance rule on a GPU.
    return dict(CAUSAL=causal, HAS_KPM=has_kpm, VARLEN=varlen, HEAD_DIM=head_dim,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), WIDE=wide, **(flags or NO_FLAGS))


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third axes (the backend's grid limit too)


def _tuning_len(sq: int, sk: int, mod_ints: tuple, flags: dict) -> int:
    """The length that keys a call's tuning bucket (plans.build's seq_len): the longer sequence, or
    under a sliding window the keys a query can see (left + right + 1; an unbounded side is Sq + Sk
    there): a 128-key window over 8k tokens has the few key tiles per query tile of a short
    sequence, and must not take the tiles tuned for a 4096-key window."""
    if flags["LOCAL"]:
        return min(max(sq, sk), mod_ints[5] + mod_ints[6] + 1)
    return max(sq, sk)


def _tile_grid(rows: int, block: int, heads: int, batch: int, lpt: bool) -> tuple:
    """A prefill kernel's grid over `rows` in tiles of `block` (kernels/tiles.py, program_coords):
    (tiles, heads, batch), or with a config's lpt (heads, batch, tiles)."""
    tiles = -(-rows // block)
    return (heads, batch, tiles) if lpt else (tiles, heads, batch)


def _tile(kind: str, c: configs.BlockConfig) -> int:
    """The tile a kernel's programs own: dK/dV's are key tiles, the others' query tiles."""
    return c.block_n if kind == "dkdv" else c.block_m


def _candidates(kind: str, consts: dict, tma_ok: bool = False, ws_ok: bool = False, rows: int = 0,
                atomic_ok: bool = True) -> list[configs.BlockConfig]:
    """The kernel's configs for this call over `rows` (its tiles' sequence length); a config with tma
    becomes its pointer-load twin where the call cannot take tensor descriptors (tma_ok: _tma_ok), one
    with ws its unspecialised tma twin where the warp-specialised loop cannot take the call (ws_ok:
    _ws_ok), one with lpt its grid-order twin where the tiles would not fit lpt's grid axis, one with
    atomic_dq its deterministic twin where the dQ kernel must run (atomic_ok False: it writes dbias)."""
    path = {} if tma_ok and ws_ok else dict(ws=False) if tma_ok else dict(tma=False, ws=False)
    cands = []
    for c in configs.candidates(kind, consts["BLOCK_D"], consts["DOT_PRECISION"] == "ieee"):
        lpt = c.lpt and -(-rows // _tile(kind, c)) <= MAX_GRID_YZ
        cands.append(dataclasses.replace(c, **path, lpt=lpt, atomic_dq=c.atomic_dq and atomic_ok))
    return list(dict.fromkeys(cands))


def _tma_ok(consts: dict, tensors: tuple, strides: tuple, keys: bool = True, heads: bool = False) -> bool:
    """Whether these tensors' tiles may come through tensor descriptors: this Triton has them;
    fp16/bf16 (fp32's FMA dots gain nothing and spill more); no key-padding mask must hide them (keys:
    they are K/V); every (batch, head, sequence) base and row is 16-byte aligned, and rows do not
    repeat (a sequence stride of 0; heads: a descriptor spans heads too, dK/dV's under GQA, so nor
    do heads). strides: (batch, seq, head) per tensor. The tensor memory accelerator's rules; the
    plans' key holds the strides and alignment."""
    if ((keys and consts["HAS_KPM"]) or consts["DOT_PRECISION"] == "ieee"
            or not hasattr(triton.language, "make_tensor_descriptor")):
        return False
    size = tensors[0].element_size()
    return (all(x.data_ptr() % 16 == 0 for x in tensors) and all(st * size % 16 == 0 for st in strides)
            and all(st > 0 for st in strides[1::3]) and not (heads and 0 in strides[2::3]))


def _ws_ok(consts: dict, q, q_strides: tuple) -> bool:
    """Whether the forward may warp-specialise (a config's ws): Q takes a descriptor too, and no bias
    tile is loaded in the key loop (Triton 3.6's pass fails on it; kernels/attn_fwd.py)."""
    return not consts["HAS_BIAS"] and _tma_ok(consts, (q,), q_strides)


def forward(q, k, v, key_padding_mask, kv_bounds, causal: bool, scale: float, bias=None, alibi_slopes=None,
            sinks=None, window_left: int = -1, window_right: int = -1, softcap: float = 0.0):
    """Padded batches: out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) natural log, lse_dtype(q.dtype).
    kv_bounds: key_bounds(key_padding_mask), or None to compute it here."""
    return _forward(q, k, v, causal, scale, key_padding_mask, kv_bounds, None, None, 0, 0,
                    Mods(bias, alibi_slopes, sinks, window_left, window_right, softcap))


def forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                   scale: float, bias=None, alibi_slopes=None, sinks=None, window_left: int = -1,
                   window_right: int = -1, softcap: float = 0.0):
    """Packed sequences q (Tq, Hq, D), k/v (Tk, Hkv, D): out (Tq, Hq, D) and lse (Hq, Tq), lse_dtype(q.dtype)."""
    return _forward(q, k, v, causal, scale, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    Mods(bias, alibi_slopes, sinks, window_left, window_right, softcap))


def backward(dout, q, k, v, out, lse, dlse, key_padding_mask, kv_bounds, causal: bool, scale: float, bias=None,
             alibi_slopes=None, sinks=None, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
             bias_grad: bool = False):
    """Padded batches: (dq, dk, dv, dbias, dsinks) given dout and, when the caller differentiates
    through lse, dlse (else None). dbias (bias's shape) only with bias_grad, dsinks only with sinks;
    else None."""
    return _backward(dout, q, k, v, out, lse, dlse, causal, scale, key_padding_mask, kv_bounds, None, None, 0, 0,
                     Mods(bias, alibi_slopes, sinks, window_left, window_right, softcap), bias_grad)


def backward_varlen(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                    max_seqlen_k: int, causal: bool, scale: float, bias=None, alibi_slopes=None, sinks=None,
                    window_left: int = -1, window_right: int = -1, softcap: float = 0.0, bias_grad: bool = False):
    """Packed sequences: (dq, dk, dv, dbias, dsinks)."""
    return _backward(dout, q, k, v, out, lse, dlse, causal, scale, None, None, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, Mods(bias, alibi_slopes, sinks, window_left, window_right, softcap),
                     bias_grad)


def _fwd_args(q, k, v, out, lse, masks, mod_ptrs, strides, lse_strides, sizes, totals, mod_ints, qk_scale, cap2):
    """attn_fwd_kernel's runtime arguments in its order. masks: (kpm, kv_bounds, cu_q, cu_k);
    strides: q, k, v, out (batch, seq, head); sizes: (kpm row stride, GROUP, Sq, Sk); totals: (Tq, Tk);
    mod_ptrs/mod_ints: score_mods.kernel_args'."""
    return (q, k, v, out, lse, *masks, *mod_ptrs, *strides, *lse_strides, *sizes, *totals, *mod_ints, qk_scale, cap2)


def _forward(q, k, v, causal, scale, key_padding_mask, kv_bounds, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, mods: Mods):
    varlen = cu_seqlens_q is not None
    (q, k, v), in_strides = _layout(varlen, q, k, v)
    b, sq, sk, hq, hkv, d, tq, tk = _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((hq, tq) if varlen else (b, hq, sq), dtype=lse_dtype(q.dtype))
    if out.numel() == 0 or b == 0:
        return out, lse
    kpm, bounds, cu_q, cu_k, kpm_stride, extra = _masks(q, key_padding_mask, kv_bounds, cu_seqlens_q, cu_seqlens_k)
    lse_strides = (0, tq) if varlen else (hq * sq, sq)
    strides = (*in_strides, *_contiguous_strides(varlen, sq, hq, d))
    sizes = (kpm_stride, hq // hkv, sq, sk)
    mod_ptrs, mod_ints, cap2, flags, mod_key = launch_args(q, b, hq, sq, sk, mods)
    if mod_key is not None:
        extra = (*extra, *mod_ptrs)
    args = _fwd_args(q, k, v, out, lse, (kpm, bounds, cu_q, cu_k), mod_ptrs, strides, lse_strides, sizes, (tq, tk),
                     mod_ints, scale * LOG2E, cap2)
    grid = lambda c: _tile_grid(sq, c.block_m, hq, b, c.lpt)
    device = q.get_device()
    # Fresh outputs are aligned; the inputs' alignment is part of the key (Triton specialises on it).
    # Packed totals and max lengths change with every batch: key on how Triton specialises them, not
    # their values (with modifiers, whose integers derive from the lengths, the lengths themselves).
    totals = plans.specialization((tq, tk)) if varlen else None
    # (packed row strides: q, k, v's from in_strides, out's hq * d)
    size_key = ((*sizes[:2], *_packed_rows(sq, sk, max(*in_strides[1::3], hq * d)))
                if varlen and mod_key is None else sizes)
    key = ("fwd", q.dtype, device, causal, key_padding_mask is not None, varlen, d, strides, size_key, totals,
           plans.aligned((q, k, v, *extra)), mod_key)
    found = _plans.get(key)
    if found is not None:
        plan, = found
        plans.launch(device, ((plan, grid(plan.config), args),))
        return out, lse
    wide = _needs_wide_offsets(varlen, max(sq, sk), q, k, v, out) or (mod_key is not None and mod_key[2])
    consts = _constexprs(q, causal, key_padding_mask is not None, varlen, d, wide, flags)
    tma_ok, ws_ok = _tma_ok(consts, (k, v), in_strides[3:9]), _ws_ok(consts, q, in_strides[:3])
    seq_len = _tuning_len(sq, sk, mod_ints, flags)
    # (rows past 16 x the grid limit: an lpt candidate's tiles may not fit its grid axis)
    ckey = plans.class_key("fwd", args, device, tuple(consts.items()), tma_ok, ws_ok, configs.seq_bucket(seq_len),
                           sq if sq > 16 * MAX_GRID_YZ else None)
    found = _class_plans.get(ckey)
    if found is not None:  # a new shape that Triton specialises as a known one: its plan, no build
        plan, = found
        plans.launch(device, ((plan, grid(plan.config), args),))
        plans.remember(_plans, key, found, MAX_CACHED_SIGNATURES)
        return out, lse
    with on_device(device):
        cands = _candidates("fwd", consts, tma_ok, ws_ok, sq)
        plan = plans.build("fwd", attn_fwd_kernel, cands, grid, args, consts, seq_len=seq_len, outputs=(3, 4),
                           device=q.device)
    plans.remember(_plans, key, (plan,), MAX_CACHED_SIGNATURES)
    plans.remember(_class_plans, ckey, (plan,), MAX_CACHED_SIGNATURES)
    return out, lse


def _preprocess_args(out, dout, dlse, delta, out_strides, dout_strides, lse_strides, rows):
    """attn_bwd_preprocess_kernel's runtime arguments in its order."""
    return (out, dout, dlse, delta, *out_strides, *dout_strides, *lse_strides, rows)


def _dkdv_args(q, k, v, dout, lse, delta, dk, dv, dq_sum, masks, bias, alibi, in_strides, dk_strides, dq_strides,
               tail, floats):
    """attn_bwd_dkdv_kernel's runtime arguments in its order. in_strides: q, k, v, dout; dk_strides:
    dk's (and dv's, also contiguous); dq_sum: the float32 dQ a config's atomic_dq adds into (else any
    tensor: not read), dq_strides its; tail: (lse strides, sizes, totals, modifier ints) as the
    forward's; floats: (sm_scale, qk_scale, cap2)."""
    return (q, k, v, dout, lse, delta, dk, dv, dq_sum, *masks, bias, alibi, *in_strides, *dk_strides, *dk_strides,
            *dq_strides, *tail, *floats)


def _dq_args(q, k, v, dout, lse, delta, dq, masks, bias, alibi, dbias, in_strides, dq_strides, tail, dbias_strides,
             floats):
    """attn_bwd_dq_kernel's runtime arguments in its order (as _dkdv_args', plus the bias gradient)."""
    return (q, k, v, dout, lse, delta, dq, *masks, bias, alibi, dbias, *in_strides, *dq_strides, *tail,
            *dbias_strides, *floats)


def _dbias_args(q, k, v, dout, lse, delta, masks, bias, alibi, dbias, in_strides, tail, sums, floats):
    """attn_bwd_dbias_kernel's runtime arguments in its order (as _dq_args', without dQ and sm_scale,
    which only dQ takes; sums: the gradient's (batch, head, row) strides, then the batch elements and
    heads each program sums and the gradient's head count)."""
    return (q, k, v, dout, lse, delta, *masks, bias, alibi, dbias, *in_strides, *tail, *sums, *floats[1:])


def _broadcast_dims(bias_shape, full: tuple) -> list[int]:
    """The dims of (B, Hq, Sq, Sk) = full that a bias of bias_shape broadcasts over (size 1 against
    more, or against 0: an empty batch's gradient is the bias's shape of zeros): its gradient is
    summed over them."""
    return [i for i in range(4) if bias_shape[i] == 1 and full[i] != 1]


def _summed_dbias(bias, full: tuple, sk: int):
    """The bias gradient as the dbias kernel writes it (kernels/bias_grad.py): bias's shape and dtype,
    summed over the batch and/or heads in the kernel, where FASTATTN_BIAS_GRAD=kernel asks for it
    and the bias broadcasts over them only (not over rows or keys, whose sums the buffer path makes);
    else None."""
    in_kernel = bias_grad_in_kernel()  # (first: a bad value is refused whatever the bias)
    dims = _broadcast_dims(bias.shape, full)
    # (sk: the kernel's key tiles, 16 keys at least, are its grid's axis 1, at most MAX_GRID_YZ)
    if not in_kernel or not dims or max(dims) > 1 or sk > 16 * MAX_GRID_YZ:
        return None
    # Every element is written (zeros where no query sees the key): no zero-fill.
    return torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)


def _backward(dout, q, k, v, out, lse, dlse, causal, scale, key_padding_mask, kv_bounds, cu_seqlens_q, cu_seqlens_k,
              max_seqlen_q, max_seqlen_k, mods: Mods, bias_grad):
    varlen = cu_seqlens_q is not None
    (q, k, v, dout, out), in_strides = _layout(varlen, q, k, v, dout, out)
    s_qkvdo, s_out = in_strides[:12], in_strides[12:]
    b, sq, sk, hq, hkv, d, tq, tk = _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    plain = mods.off()
    bias, sinks = mods.bias, mods.sinks
    dbias = None  # the dQ kernel's (B, Hq, Sq, Sk) bias gradient
    summed = None  # or the dbias kernel's, bias-shaped: summed over the batch/heads in the kernel
    if bias_grad:
        full = (b, hq, sq, sk)
        summed = _summed_dbias(bias, full, sk)
        if summed is None:
            # Tiles the kernels skip (outside the window, padding) are never written: start from 0. A
            # broadcast bias sums its gradient over the broadcast dims afterwards, in float32.
            dbias = q.new_zeros(full, dtype=torch.float32 if _broadcast_dims(bias.shape, full) else bias.dtype)
    if dq.numel() == 0 or dk.numel() == 0 or b == 0:
        dsinks = None
        if sinks is not None:  # no keys (or no queries): out = 0, lse = the sink, so delta = -dlse
            dsinks = (torch.zeros_like(sinks) if dlse is None or dq.numel() == 0
                      else _dsinks(sinks, lse, -dlse.float(), varlen))
        return (dq.zero_(), dk.zero_(), dv.zero_(), _reduce_dbias(dbias, bias) if summed is None else summed.zero_(),
                dsinks)
    if lse.dtype != lse_dtype(q.dtype):  # a caller's float32 lse for fp32 inputs: one kernel variant per dtype
        lse = lse.to(lse_dtype(q.dtype))
    lse = lse.contiguous()
    delta = torch.empty_like(lse, dtype=torch.float32)
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else delta  # placeholder: not read without HAS_DLSE
    kpm, bounds, cu_q, cu_k, kpm_stride, extra = _masks(q, key_padding_mask, kv_bounds, cu_seqlens_q, cu_seqlens_k)
    lse_strides = (0, tq) if varlen else (hq * sq, sq)
    s_dk = _contiguous_strides(varlen, sk, hkv, d)  # dk and dv
    s_dq = _contiguous_strides(varlen, sq, hq, d)
    sizes = (kpm_stride, hq // hkv, sq, sk)
    mod_ptrs, mod_ints, cap2, flags, mod_key = launch_args(q, b, hq, sq, sk, mods)
    bias_p, alibi_p, _ = mod_ptrs
    dbias_args = (q, 0, 0, 0)
    if not plain:
        grad = summed if summed is not None else dbias
        sums = ()  # the dbias kernel's: gradient strides (batch, head, row), batch elements and heads summed
        if summed is not None:
            n_b, n_h = (b if bias.shape[0] == 1 else 1), (hq if bias.shape[1] == 1 else 1)
            sums = (*summed.stride()[:3], n_b, n_h, bias.shape[1])
        if grad is not None:  # its (Sq, Sk) slices take 64-bit offsets from 2**31 elements
            mod_key = (*mod_key[:2], mod_key[2] or (sq + 256) * sk >= 2**31, mod_key[3], grad.dtype, sums[3:])
        extra = (*extra, *mod_ptrs)
        dbias_args = (q, 0, 0, 0) if dbias is None else (dbias, *dbias.stride()[:3])
    # The preprocess is row-wise: packed inputs run as one sequence of Tq rows, so their row offsets
    # span all of them (64-bit if that reaches 2**31 elements).
    rows, pre_batch = (tq, 1) if varlen else (sq, b)
    pre_wide = varlen and (rows + 64) * max(out.stride(0), dout.stride(0)) >= 2**31
    tail = (*lse_strides, *sizes, tq, tk, *mod_ints)
    floats = (scale, scale * LOG2E, cap2)
    masks = (kpm, bounds, cu_q, cu_k)
    pre_args = _preprocess_args(out, dout, dlse, delta, s_out, s_qkvdo[9:], lse_strides, rows)
    grids = (lambda c: (-(-rows // c.block_m), hq, pre_batch),
             lambda c: _tile_grid(sk, c.block_n, hkv, b, c.lpt),
             lambda c: _tile_grid(sq, c.block_m, hq, b, c.lpt),
             lambda c: (-(-sq // c.block_m), -(-sk // c.block_n), bias.shape[0] * bias.shape[1]))
    device = q.get_device()
    # As the forward's key; the packed totals (Tq, Tk, the lse stride, the preprocess rows) by class,
    # and without modifiers the max lengths by class too and not the number of sequences (only the
    # grids, rebuilt per call, and a bias gradient's shape take it).
    totals = (plans.specialization((tq, tk)), pre_wide) if varlen else (lse_strides, rows)
    packed = varlen and mod_key is None
    # (packed row strides: q, k, v, dout, out's from in_strides; dq's hq * d, dk and dv's hkv * d)
    size_key = (*sizes[:2], *_packed_rows(sq, sk, max(*in_strides[1::3], hq * d))) if packed else sizes
    key = ("bwd", q.dtype, device, causal, key_padding_mask is not None, varlen, has_dlse, d, None if packed else b,
           hq, hkv, in_strides, size_key, totals, plans.aligned((q, k, v, dout, out, lse, dlse, *extra)), mod_key)
    found = _plans.get(key)
    if found is None:
        wide = (_needs_wide_offsets(varlen, max(sq, sk), q, k, v, out, dout, dq, dk, dv)
                or (mod_key is not None and mod_key[2]))
        flags = {name: on for name, on in flags.items() if name != "HAS_SINKS"}  # the sinks' gradient is ours
        flags_dq = {**flags, "HAS_DBIAS": dbias is not None}
        consts = _constexprs(q, causal, key_padding_mask is not None, varlen, d, wide, flags)
        consts_dq = _constexprs(q, causal, key_padding_mask is not None, varlen, d, wide, flags_dq)
        consts_dkdv = {**consts, "GQA": hq != hkv}  # one loop over (query head, query block) for a group
        pre_consts = dict(HAS_DLSE=has_dlse, HEAD_DIM=d, BLOCK_D=consts["BLOCK_D"], WIDE=wide or pre_wide)
        # The tiles each kernel streams, through descriptors with a config's tma: dK/dV's Q and dO
        # (whatever the key padding), dQ's K and V.
        tma_ok = (_tma_ok(consts, (q, dout), s_qkvdo[:3] + s_qkvdo[9:], keys=False, heads=hq != hkv),
                  _tma_ok(consts, (k, v), s_qkvdo[3:9]))
        dkdv_cands = _candidates("dkdv", consts, tma_ok[0], rows=sk, atomic_ok=dbias is None)
        atomic = dkdv_cands[0].atomic_dq  # (only a forced config has it: a list of one)
        if any(c.atomic_dq != atomic for c in dkdv_cands):  # tuning must not choose the dQ path
            raise ValueError("dK/dV candidates mix atomic_dq and deterministic configs")
    else:
        atomic = found[1].config.atomic_dq
    # With a dK/dV config's atomic_dq, dK/dV adds dQ into a float32 twin of dq and no dQ kernel runs.
    dq_sum = torch.zeros(dq.shape, dtype=torch.float32, device=dq.device) if atomic else dq
    dkdv_args = _dkdv_args(q, k, v, dout, lse, delta, dk, dv, dq_sum, masks, bias_p, alibi_p, s_qkvdo, s_dk, s_dq,
                           tail, floats)
    dq_args = _dq_args(q, k, v, dout, lse, delta, dq, masks, bias_p, alibi_p, dbias_args[0], s_qkvdo, s_dq, tail,
                       dbias_args[1:], floats)
    dbias_k_args = None if summed is None else _dbias_args(q, k, v, dout, lse, delta, masks, bias_p, alibi_p, summed,
                                                            s_qkvdo, tail, sums, floats)
    all_args = (pre_args, dkdv_args, dq_args, dbias_k_args)
    if found is not None:
        plans.launch(device, [(plan, grid(plan.config), args) for plan, grid, args in zip(found, grids, all_args)
                              if plan is not None])
    else:
        span = _tuning_len(sq, sk, mod_ints, flags)
        with on_device(device):
            pre_plan = plans.build("bwd_preprocess", attn_bwd_preprocess_kernel, [configs.PREPROCESS], grids[0],
                                   pre_args, pre_consts, seq_len=rows, outputs=(3,), device=q.device)
            dkdv_plan = plans.build("dkdv", attn_bwd_dkdv_kernel, dkdv_cands, grids[1], dkdv_args, consts_dkdv,
                                    seq_len=span, outputs=(6, 7), device=q.device, sums=(8,) if atomic else ())
            dq_plan = None  # (atomic: dK/dV did dQ's work)
            if not atomic:  # dbias (zero-filled, partly written) is not checked against a sentinel; dq is.
                dq_plan = plans.build("dq", attn_bwd_dq_kernel, _candidates("dq", consts_dq, tma_ok[1], rows=sq),
                                      grids[2], dq_args, consts_dq, seq_len=span, outputs=(6,), device=q.device)
            built = (pre_plan, dkdv_plan, dq_plan)
            if summed is not None:  # the dbias kernel's (after the preprocess: it reads delta)
                built += (plans.build("dbias", attn_bwd_dbias_kernel, _candidates("dbias", consts), grids[3],
                                      dbias_k_args, consts, seq_len=span, outputs=(12,), device=q.device),)
        plans.remember(_plans, key, built, MAX_CACHED_SIGNATURES)
    if atomic:
        dq.copy_(dq_sum)
    if plain:
        return dq, dk, dv, None, None
    dsinks = None if sinks is None else _dsinks(sinks, lse, delta, varlen)
    return dq, dk, dv, _reduce_dbias(dbias, bias) if summed is None else summed, dsinks


def _dsinks(sinks, lse, delta, varlen: bool):
    """d loss / d sink_h = -sum over rows of P(sink) * delta with P(sink) = exp(sink_h - lse) (lse
    counts the sink) and delta = rowsum(dO * O) - dlse; lse/delta (B, Hq, Sq) or packed (Hq, Tq)."""
    head_view = (sinks.shape[0], 1) if varlen else (1, sinks.shape[0], 1)
    # lse is -inf only on a row without keys whose sink is -inf too: P(sink) = 0 there, not NaN.
    p_sink = torch.exp(sinks.float().view(head_view) - lse).masked_fill_(lse == float("-inf"), 0.0)
    return -(p_sink * delta).sum(dim=1 if varlen else (0, 2)).to(sinks.dtype)


def _reduce_dbias(dbias, bias):
    """The kernel's (B, Hq, Sq, Sk) bias gradient summed over the dims that bias broadcasts, in bias's dtype."""
    if dbias is None:
        return None
    dims = _broadcast_dims(bias.shape, dbias.shape)
    return dbias.sum(dim=dims, keepdim=True).to(bias.dtype) if dims else dbias
