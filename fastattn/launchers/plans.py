"""Launch plans for the Triton kernels: how a kernel is launched, decided once per call signature.

A plan is a block config plus, on a GPU, Triton's compiled kernel. The first call with a new
signature picks the config (timed over the table's candidates; the first one that fits when
FASTATTN_AUTOTUNE=0, under CUDA-graph capture, or in the interpreter) and launches through Triton's
JIT, which compiles the kernel and hands it back. Later calls launch that compiled kernel directly:
no autotuner dispatch, no argument binding, no re-specialisation, no config lookup.

A compiled kernel is only valid for arguments that Triton would have specialised the same way:
each integer by its value class (== 1, divisible by 16, 32- or 64-bit) and each pointer by 16-byte
alignment. ``specialization`` computes exactly those properties and is part of the plan key.

The direct launch bypasses Triton's own launch path, so the first direct launch of every compiled
kernel is checked once against a JIT launch (outputs pre-filled with a sentinel, so a launch that
writes nothing cannot pass; the kernels are deterministic, so the outputs must agree bit for bit);
a mismatch or an error falls back to the JIT path with a warning.
``FASTATTN_DIRECT_LAUNCH=0`` turns direct launches off.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

try:  # where Triton keeps its allocator (a context variable): read per launch of a descriptor kernel
    from triton.runtime import _allocation
except ImportError:
    _allocation = None

from fastattn.kernels import configs
from fastattn.launchers.device import on_device, stream_of

_I32, _I64 = 2**31, 2**63


def specialization(args: tuple) -> tuple:
    """What Triton specialises a launch on, per argument: an int's value class (1, multiple of 16,
    other; 32/64-bit/unsigned range), a tensor's 16-byte alignment and its dtype (what the compiled
    kernel is typed for), nothing for a float."""
    key = []
    for a in args:
        t = type(a)
        if t is int:
            key.append((a == 1, a % 16 == 0, 0 if -_I32 <= a < _I32 else 1 if -_I64 <= a < _I64 else 2))
        elif t is float:
            key.append(None)
        elif isinstance(a, torch.Tensor):
            key.append((a.data_ptr() % 16 == 0, a.dtype))
        else:
            key.append(None)
    return tuple(key)


def class_key(kind: str, args: tuple, *decided_by) -> tuple:
    """A launch's key by what its plan depends on, not by exact integers: the runtime arguments'
    specialisation (what picks the compiled kernel) and `decided_by`, whatever else picks the
    constexprs, the candidates and the tuning bucket. For a second lookup after an exact-value key
    misses (a KV cache one token longer): a hit reuses the plan with no build. The launch settings
    (configs.forced() pins, FASTATTN_AUTOTUNE, FASTATTN_DIRECT_LAUNCH) are part of it: a plan built
    under other settings is not reused for a new shape."""
    return (kind, specialization(args), *decided_by, configs.settings(), direct_launch_enabled())


def aligned(tensors) -> bool | tuple:
    """True when every tensor's data is 16-byte aligned (the usual case, one test), else each one's."""
    acc = 0
    for t in tensors:
        acc |= t.data_ptr()
    if acc % 16 == 0:
        return True
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def direct_launch_enabled() -> bool:
    return not configs.interpreter_enabled() and os.environ.get("FASTATTN_DIRECT_LAUNCH", "1") != "0"


def _tma_scratch(size: int, alignment: int, stream):
    """Global memory for the tensor descriptors a kernel creates (Triton asks at each launch, for
    the launch's stream: ours are torch's current stream). From torch's allocator on the current
    device (its blocks are 512-byte aligned, more than Triton asks), so CUDA-graph capture takes it
    from the graph's pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_allocator() -> None:
    """Kernels that create tensor descriptors need Triton's allocator, a context variable: before
    every such launch, in whichever thread launches (autograd runs backwards in its own), install
    ours where none is set. An allocator the application set is left in place."""
    if _no_allocator():
        triton.set_allocator(_tma_scratch)


def _no_allocator() -> bool:
    if _allocation is None:  # a Triton that moved it: set ours every time
        return True
    return isinstance(_allocation._allocator.get(), _allocation.NullAllocator)


@dataclass
class Plan:
    """How one kernel is launched for one signature."""

    kernel: object  # triton JITFunction (InterpretedFunction in the interpreter)
    config: configs.BlockConfig
    constexprs: dict  # every constexpr, block sizes included
    tail: tuple  # the constexpr values in the kernel's argument order: a compiled kernel takes all arguments
    handle: object | None = None  # triton CompiledKernel, launched directly when set
    provisional: bool = False  # built during a CUDA-graph capture (untuned, unchecked): not to be kept
    scratch: bool = False  # it creates tensor descriptors: Triton's allocator must be set

    def launch(self, grid: tuple, args: tuple, stream: int | None = None) -> None:
        if self.scratch:
            _install_allocator()
        if self.handle is not None:
            self.handle[grid](*args, *self.tail, stream=stream)
        else:
            _jit_launch(self.kernel, grid, args, self.constexprs, self.config)


def launch(device: int, launches) -> None:
    """Launch (plan, grid, args) in order on CUDA device `device` (a tensor's get_device(); -1: the
    CPU, through the interpreter)."""
    if device < 0:
        for plan, grid, args in launches:
            plan.launch(grid, args)
        return
    with on_device(device):
        stream = torch._C._cuda_getCurrentRawStream(device)
        for plan, grid, args in launches:
            plan.launch(grid, args, stream)


def _jit_launch(kernel, grid, args, constexprs, config):
    """Triton's own launch path: binds, specialises, compiles if needed; returns the compiled kernel
    (None in the interpreter)."""
    if constexprs.get("TMA"):
        _install_allocator()
    return kernel[grid](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


def constexpr_tail(kernel, n_args: int, constexprs: dict) -> tuple:
    """The constexpr values in argument order after the first n_args (runtime) arguments. Raises if
    the kernel's remaining arguments are not exactly the given constexprs (a launcher/kernel mismatch)."""
    names = list(kernel.arg_names[n_args:])
    if sorted(names) != sorted(constexprs):
        raise TypeError(f"the kernel's trailing arguments {names} are not the launcher's constexprs "
                        f"{sorted(constexprs)}")
    return tuple(constexprs[n] for n in names)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# Tuned configs, keyed by kernel + constexprs (dtype, head dim, flags) + device + sequence bucket.
_tuned: dict[tuple, configs.BlockConfig] = {}
# Compiled kernels, keyed by the tuning key + the config + the arguments' specialisation.
_handles: dict[tuple, object] = {}
_warned: set[str] = set()
# Every launcher's plans by call signature (signature_cache), for clear().
_signature_caches: list[dict] = []


def signature_cache() -> dict:
    """A launcher's plans by call signature: a dict that clear() empties."""
    cache: dict = {}
    _signature_caches.append(cache)
    return cache


MAX_SIGNATURES = 4096  # per launcher: plans are looked up by exact integers (e.g. a KV cache growing per token)


def remember(cache: dict, key: tuple, value: tuple, limit: int = MAX_SIGNATURES) -> None:
    """Keep a call's plans (None entries: kernels the call does not launch), at most `limit`
    signatures (a growing KV cache or changing shapes must not grow memory without bound). Plans
    built during a CUDA-graph capture are not kept: the next eager call builds them properly."""
    if any(p is not None and p.provisional for p in value):
        return
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def tuned_configs() -> list[dict]:
    """Every config chosen so far (tuned, or the first that fit): kernel name, constexprs, dtype,
    sequence bucket, config. For benchmark reports: which tile each measured call ran."""
    return [{"kernel": name, "constexprs": dict(consts), "dtype": dtype, "seq_bucket": bucket,
             "config": c.as_list()}
            for (name, _, consts, dtype, _, bucket, _), c in _tuned.items()]


def clear() -> None:
    """Forget every launch plan and tuned config (tests; a long-running process changing shapes)."""
    for cache in _signature_caches:
        cache.clear()
    _tuned.clear()
    _handles.clear()


def build(name: str, kernel, cands: list[configs.BlockConfig], grid_for, args: tuple, constexprs: dict, *,
          seq_len: int, outputs: tuple[int, ...], device: torch.device, verify=None,
          sums: tuple[int, ...] = ()) -> Plan:
    """A plan for launching `kernel` on `args` (runtime arguments, in order), launched once: the
    outputs are written as by any launch.

    cands: the configs to choose from, best guess first; grid_for(config) -> the launch grid;
    seq_len: the length that keys the tuning bucket; outputs: indices of the output tensors in
    args (to check a direct launch once); name: the kernel's name in warnings. A kernel that
    writes into a tensor in place (a KV cache: it cannot be refilled with a sentinel) passes
    outputs=() and verify() -> bool, which checks what the direct launch wrote. sums: indices of
    tensors the kernel adds into with atomics (the caller zero-fills them): zeroed again before every
    further launch building makes (tuning's, the check's), so that they end up holding one launch's
    sums, and not compared by the check (atomics add in any order). Under CUDA-graph capture nothing
    may sync: no tuning, no check, and the plan is provisional."""
    # Every tensor argument's dtype: a compiled kernel is typed by all of them (a bias or sinks may
    # differ from q's dtype), and so are its resources (a config chosen for one may not fit another).
    dtypes = tuple([a.dtype for a in args if isinstance(a, torch.Tensor)])
    tune_key = (name, tuple(cands), tuple(sorted(constexprs.items())), str(args[0].dtype), str(device),
                configs.seq_bucket(seq_len), dtypes)
    capturing = _capturing(device)
    with _syncs_allowed(device):  # building a plan may sync (tuning, the check) even in sync-debug mode
        config, handle, launched = _tuned.get(tune_key), None, False
        if config is None:
            if len(cands) > 1 and configs.autotune_enabled() and not capturing:
                config = _tune(kernel, cands, grid_for, args, constexprs)
            else:
                config, handle = _first_fitting(kernel, cands, grid_for, args, constexprs)
                launched = True
            if not capturing:
                _tuned[tune_key] = config
        full = {**constexprs, **config.constexprs(kernel.arg_names)}
        plan = Plan(kernel, config, full, constexpr_tail(kernel, len(args), full), provisional=capturing,
                    scratch=bool(full.get("TMA")))
        grid = grid_for(config)
        direct = not capturing and direct_launch_enabled()
        handle_key = (tune_key, config, specialization(args)) if direct else None
        if not launched:
            _zero(args, sums)  # (tuning may have launched it)
            if direct and handle_key in _handles:
                # A new signature that Triton specialises as an earlier one (e.g. a KV cache grown by a
                # token): its compiled kernel, checked then (None: the check failed, the JIT path).
                plan.handle = _handles[handle_key]
                plan.launch(grid, args, stream_of(args[0]))
                return plan
            handle = _jit_launch(kernel, grid, args, full, config)
        if handle is None or not direct:
            return plan  # interpreter, a graph capture, or direct launches turned off
        if handle_key not in _handles:
            _handles[handle_key] = _checked(name, handle, plan, grid, args, outputs, verify, sums)
    plan.handle = _handles[handle_key]
    return plan


@contextlib.contextmanager
def _syncs_allowed(device: torch.device):
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _first_fitting(kernel, cands, grid_for, args, constexprs):
    """(config, compiled kernel) of the first candidate that fits the chip's resources, found by
    launching it."""
    for i, c in enumerate(cands):
        try:
            return c, _jit_launch(kernel, grid_for(c), args, {**constexprs, **c.constexprs(kernel.arg_names)}, c)
        except OutOfResources:
            if i == len(cands) - 1:
                raise
    raise ValueError("no block configs to choose from")


def _tune(kernel, cands, grid_for, args, constexprs) -> configs.BlockConfig:
    """The fastest candidate on these arguments (GPU time, short runs: tuning is paid once per key)."""
    best, best_ms = None, float("inf")
    for c in cands:
        run = lambda: _jit_launch(kernel, grid_for(c), args, {**constexprs, **c.constexprs(kernel.arg_names)}, c)
        try:
            run()
        except OutOfResources:
            continue
        ms = triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise OutOfResources(0, 0, f"shared memory or registers: none of {cands} fits")
    return best


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(-1).view(torch.uint8)  # outputs are fresh and contiguous: a view, never a copy


_SENTINEL = 0xFF  # every output byte set before a checked launch: a launch that writes nothing shows


def _zero(args, sums) -> None:
    for i in sums:
        args[i].zero_()


def _checked(name, handle, plan, grid, args, outputs, verify=None, sums=()):
    """`handle` if launching it directly writes exactly what Triton's own launch writes (outputs
    filled with a sentinel before each, compared bit for bit; or, for an in-place kernel, verify()
    after one direct launch), else None with a warning. Either way the outputs end up holding the
    JIT launch's results, and the sums (zeroed before each launch, not compared) one launch's."""
    if verify is not None and sums:
        raise ValueError(f"{name}: an in-place kernel's check (verify) cannot also take sums")
    expected, same = None, False
    try:
        plan.handle = handle
        if verify is not None:  # in place: one direct launch, then verify; a JIT launch redoes it if wrong
            with on_device(args[0].get_device()):
                plan.launch(grid, args, stream_of(args[0]))
            same = bool(verify())
            reason = "it did not write what verify() expected"
        else:
            plan.handle = None
            for i in outputs:
                _bits(args[i]).fill_(_SENTINEL)
            _zero(args, sums)
            _jit_launch(plan.kernel, grid, args, plan.constexprs, plan.config)
            expected = [args[i].clone() for i in (*outputs, *sums)]
            for i in outputs:
                _bits(args[i]).fill_(_SENTINEL)
            _zero(args, sums)
            plan.handle = handle
            with on_device(args[0].get_device()):
                plan.launch(grid, args, stream_of(args[0]))
            same = all(torch.equal(_bits(e), _bits(args[i])) for e, i in zip(expected, outputs))  # (not sums)
            reason = "its outputs differ from Triton's own launch"
    except Exception as e:  # an API the direct launch did not expect: fall back, keep working
        reason = f"{type(e).__name__}: {e}"
    finally:
        plan.handle = None
    if same:
        return handle
    if expected is None:
        _zero(args, sums)
        _jit_launch(plan.kernel, grid, args, plan.constexprs, plan.config)
    else:
        for e, i in zip(expected, (*outputs, *sums)):
            args[i].copy_(e)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"fastattn: launching the compiled {name} kernel directly failed its check ({reason}); "
                      f"using Triton's launch path for it (same results, more host time)", stacklevel=2)
    return None
