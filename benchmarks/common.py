"""What every benchmark script shares: one timer, the environment record and the card's ceilings.

    from benchmarks.common import use_interpreter_without_gpu, time_ms, environment, measure_ceilings

- ``time_ms(fn, grad_to_none=...)``: median milliseconds of ``fn()``. On CUDA it is
  ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed before each run); on the CPU a
  wall-clock median. CPU numbers are CPU numbers: label them so (``environment()["device_type"]``).
- ``environment()``: device name, torch/triton/CUDA/Python versions, autotune and interpreter flags.
- ``measure_ceilings()``: what this machine can do at best, measured now: a large matmul (bf16
  8192^3 on a GPU, fp32 1024^3 on the CPU) in TFLOPS and a large device copy in GB/s.
- ``peak_memory_mib(fn)``: extra device memory one call of ``fn`` needs at its peak (CUDA only).
- ``step_anatomy(fn)``: where one call of ``fn`` (a training step) goes: the host's time to issue it,
  the GPU's kernel time, host syncs, copies and launches, the top kernels and host ops (profiler).

Scripts that may run the Triton kernels without a GPU call ``use_interpreter_without_gpu()`` before
importing fastattn or triton: the interpreter has to be chosen before the kernels are defined.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
import warnings

import torch


def use_interpreter_without_gpu() -> bool:
    """Without CUDA, run Triton through its interpreter (must happen before triton is imported).
    Returns whether the interpreter is on."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return interpreter_on()


def interpreter_on() -> bool:
    """Whether Triton runs through its interpreter (TRITON_INTERPRET, as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_cuda(device) -> bool:
    return torch.device(device if device is not None else default_device()).type == "cuda"


def time_ms(fn, *, device=None, grad_to_none=None, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of one ``fn()`` call in milliseconds. ``grad_to_none``: tensors whose ``.grad``
    is reset before each timed call (so a backward does not time gradient accumulation)."""
    if _is_cuda(device):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                       return_mode="median")
    return _wall_clock_median(fn, grad_to_none, warmup_ms, rep_ms)


def _wall_clock_median(fn, grad_to_none, warmup_ms, rep_ms, min_reps=5, max_reps=1000) -> float:
    def reset():
        for x in grad_to_none or ():
            x.grad = None

    t_end = time.perf_counter() + warmup_ms / 1e3
    while True:  # at least one warm-up call
        reset()
        fn()
        if time.perf_counter() >= t_end:
            break
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn, device=None) -> float | None:
    """Peak device memory one ``fn()`` call allocates beyond what was allocated before it, in MiB
    (None on the CPU, where torch does not track it)."""
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_OPS = ("cudaMemcpyAsync", "cudaMemcpy")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def step_anatomy(fn, *, calls: int = 3, top: int = 8) -> dict:
    """Where one ``fn()`` call goes, on the device ``fn`` runs on (CUDA if available), after one
    warm-up call. Compare it with the call's time from ``time_ms``:

    - ``host_ms``: the host's time to issue one call from an idle GPU (median of ``calls``, each
      after a sync). Close to the call's time: host-bound (or the launch queue filled).
    - ``device_ms``: the GPU's busy time per call: kernels, and memcpy / memset on the device
      (profiler; 0 on the CPU). The call's time minus this is the time the GPU sat idle: host work,
      syncs, launch gaps.
    - ``syncs`` / ``copies`` / ``launches``: CUDA API calls per call, as the profiler records them
      (the profiler's own sync subtracted; rounded to 0.01, never below 0);
      ``sync_warnings``: syncs torch's sync debug mode reports per call (CUDA only; ``first_sync``:
      the first one's message).
    - ``top_kernels``: [(name, ms per call)], the ``top`` device activities by GPU time; ``host_table``: the
      profiler's top host ops by self CPU time (text).
    """
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    host = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        sync()
    averages = _profiled(fn, calls, cuda)
    idle = _profiled(lambda: None, calls, cuda)  # the profiler's own syncs and copies, subtracted

    def per_call(keys):
        return max(0.0, round(sum(_count(averages, k) - _count(idle, k) for k in keys) / calls, 2))

    kernels = [e for e in averages
               if e.device_type != torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    out = {"host_ms": statistics.median(host),
           "device_ms": sum(e.self_device_time_total for e in kernels) / calls / 1e3,
           "syncs": per_call(SYNC_OPS), "copies": per_call(COPY_OPS), "launches": per_call(LAUNCH_OPS),
           "top_kernels": [(e.key, e.self_device_time_total / calls / 1e3) for e in kernels[:top]],
           "host_table": averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)}
    if cuda:
        out.update(_sync_warnings(fn))
    return out


def _profiled(fn, calls: int, cuda: bool):
    """The profiler's key averages over `calls` calls of fn and one sync (CPU, and CUDA if there)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages()


def _count(averages, key: str) -> int:
    return sum(e.count for e in averages if e.key == key)


def _sync_warnings(fn) -> dict:
    """Syncs torch's sync debug mode reports during one ``fn()`` call (CUDA): count, first message."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"sync_warnings": len(syncs), "first_sync": syncs[0] if syncs else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        # -dirty when tracked files differ from the commit (numbers from uncommitted code say so).
        res = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device=None) -> dict:
    """Where and with what a run was measured (goes at the top of every result file)."""
    import triton

    cuda = _is_cuda(device)
    env = {
        "device_type": "cuda" if cuda else "cpu",
        "device": torch.cuda.get_device_name() if cuda else f"{_cpu_name()} (CPU, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "fastattn_autotune": os.environ.get("FASTATTN_AUTOTUNE", "1"),
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "timer": "triton.testing.do_bench (CUDA events, median)" if cuda else "wall clock (median)",
        "cpu_threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    return env


def measure_ceilings(device=None) -> dict:
    """The machine's measured best: matmul TFLOPS and device-to-device copy GB/s (read + write).
    A GPU gets the big sizes (bf16 8192^3, 1 GiB); the CPU small ones (fp32 1024^3, 64 MiB)."""
    cuda = _is_cuda(device)
    dev = "cuda" if cuda else "cpu"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_ms(lambda: a @ b, device=dev)
    src = torch.randn(2**28 if cuda else 2**24, device=dev)  # fp32: 1 GiB / 64 MiB
    dst = torch.empty_like(src)
    ms_copy = time_ms(lambda: dst.copy_(src), device=dev)
    nbytes = src.numel() * src.element_size()
    return {
        "matmul_tflops": 2 * n**3 / ms * 1e-9,
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        "copy_gbps": 2 * nbytes / ms_copy * 1e-6,
        "copy": f"{nbytes // 2**20} MiB",
    }
