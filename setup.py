"""Build script: the Python packages (kernels/ installed as fastattn.kernels) and, when it can, the
CUDA extension fastattn._C (csrc/: nvcc for the kernels, the host compiler for the pybind11 binding).

When fastattn._C is built (FASTATTN_BUILD_CUDA):
  unset / "auto"  only when a CUDA GPU is visible (nvidia-smi lists one) and nvcc and pybind11 are
                  found; a failed build then warns and installs without it (the Triton backend still works)
  "1"             always; a missing nvcc / pybind11 or a compile error fails the install
  "0"             never
No torch import here: CI installs with build isolation on CPU machines, where torch is absent, and
skips the extension in well under a second. The kernels need no PyTorch headers (DESIGN.md).
FASTATTN_CUDA_ARCHS (default "80;90a") lists the SASS targets; PTX for the lowest is embedded too, so
newer GPUs can JIT it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
PACKAGES = ["fastattn", "fastattn.ops", "fastattn.launchers", "fastattn.models", "fastattn.demo", "fastattn.kernels"]


def _log(msg: str) -> None:
    print(f"fastattn setup: {msg}", file=sys.stderr)


def find_cuda_home() -> Path | None:
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, else the one whose nvcc is on PATH, else /usr/local/cuda."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        cands.append(str(Path(on_path).resolve().parent.parent))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def find_nvcc() -> str | None:
    home = find_cuda_home()
    return str(home / "bin" / "nvcc") if home else None


def gpu_visible() -> bool:
    """A CUDA GPU is visible, found without importing torch: `nvidia-smi -L` lists one."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


def build_mode(env: dict | None = None, gpu=gpu_visible) -> str:
    """"skip", "optional" (auto-detected: a failure warns) or "required" (FASTATTN_BUILD_CUDA=1)."""
    env = os.environ if env is None else env
    flag = env.get("FASTATTN_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return "skip"
    if flag in ("1", "true", "yes", "on"):
        return "required"
    if flag not in ("", "auto"):
        raise SystemExit(f"FASTATTN_BUILD_CUDA must be 0, 1 or auto, got {flag!r}")
    return "optional" if gpu() else "skip"


def gencode_flags(archs: str) -> list[str]:
    """"80;90a" -> SASS for sm_80 and sm_90a, plus compute_80 PTX (for GPUs newer than the list)."""
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not names:
        raise SystemExit("FASTATTN_CUDA_ARCHS is empty")
    flags = []
    for a in names:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    lowest = min(names, key=lambda a: int("".join(c for c in a if c.isdigit())))
    flags += ["-gencode", f"arch=compute_{lowest},code=compute_{lowest}"]
    return flags


CU_SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (in parallel) and links them into fastattn._C with the binding."""

    def build_extension(self, ext):
        if ext.name != "fastattn._C":
            return super().build_extension(ext)
        required = getattr(ext, "fastattn_required", False)
        try:
            self._build_cuda(ext)
        except Exception as e:
            if required:
                raise
            _log(f"WARNING: building fastattn._C failed ({type(e).__name__}: {e}); installing without the "
                 "CUDA backend (backend='cuda' will report it is not built)")

    def _build_cuda(self, ext):
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        import pybind11  # noqa: F401  (checked early: the binding needs its headers)

        cuda_home = find_cuda_home()
        obj_dir = Path(self.build_temp) / "csrc"
        obj_dir.mkdir(parents=True, exist_ok=True)
        flags = ["-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler", "-fPIC", "-Xptxas", "-warn-spills",
                 *gencode_flags(os.environ.get("FASTATTN_CUDA_ARCHS", "80;90a"))]

        def compile_one(name: str) -> str:
            obj = obj_dir / (name + ".o")
            cmd = [nvcc, *flags, "-c", str(CSRC / name), "-o", str(obj)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {name}:\n{res.stdout}{res.stderr}")
            return str(obj)

        _log(f"compiling {len(CU_SOURCES)} CUDA sources with {nvcc} ({' '.join(flags[-6:])})")
        jobs = max(1, min(len(CU_SOURCES), os.cpu_count() or 1))
        with ThreadPoolExecutor(jobs) as pool:
            objects = list(pool.map(compile_one, CU_SOURCES))
        ext.extra_objects = objects
        lib_dirs = (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib")
        lib = next((d for d in lib_dirs if (d / "libcudart_static.a").exists()), None)
        if lib is None:
            raise RuntimeError(f"libcudart_static.a not found under {cuda_home}")
        ext.library_dirs = [str(lib)]
        ext.include_dirs = [str(CSRC), str(cuda_home / "include"), pybind11.get_include()]
        super().build_extension(ext)


def extensions() -> list[Extension]:
    mode = build_mode()
    if mode == "skip":
        _log("not building fastattn._C (no CUDA GPU visible; FASTATTN_BUILD_CUDA=1 forces it)")
        return []
    if mode == "optional":
        missing = [what for what, ok in (("nvcc", find_nvcc() is not None), ("pybind11", _has_pybind11())) if not ok]
        if missing:
            _log(f"not building fastattn._C: {' and '.join(missing)} not found")
            return []
    ext = Extension(
        "fastattn._C",
        sources=["csrc/bindings.cpp"],
        # Static CUDA runtime: no dependency on where libcudart.so lives; streams come from torch as handles.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
        depends=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu*")) + sorted(CSRC.glob("*.h"))],
        language="c++",
    )
    ext.fastattn_required = mode == "required"
    return [ext]


def _has_pybind11() -> bool:
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    setup(
        packages=PACKAGES,
        package_dir={"fastattn.kernels": "kernels"},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt},
    )
