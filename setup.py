"""Build script: the Python packages (kernels/ installed as fastattn.kernels) and, when it can, the
CUDA extension fastattn._C (csrc/: nvcc for the kernels, the host compiler for the pybind11 binding).

When fastattn._C is built (FASTATTN_BUILD_CUDA):
  unset / "auto"  only when a CUDA GPU is visible (nvidia-smi lists one) and nvcc and pybind11 are
                  found; a failed build then warns and installs without it (the Triton backend still works)
  "1"             always; a missing nvcc / pybind11 or a compile error fails the install
  "0"             never
No torch import here: CI installs with build isolation on CPU machines, where torch is absent, and
skips the extension in well under a second. The kernels need no PyTorch headers (docs/design.md).
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

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Every package under fastattn/ (a list by hand once left fastattn.distributed out of wheels), plus kernels/.
PACKAGES = sorted({*find_packages(where=str(ROOT), include=["fastattn", "fastattn.*"]), "fastattn.kernels"})


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
    """"80;90a" -> SASS for sm_80 and sm_90a, plus compute_80 PTX (for GPUs newer than the list). The
    PTX is the lowest arch's without an "a"/"f" suffix: arch-specific PTX (compute_90a) runs on that
    GPU only, so "90a" alone would leave newer GPUs nothing to JIT."""
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not names:
        raise SystemExit("FASTATTN_CUDA_ARCHS is empty")
    flags = []
    for a in names:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    lowest = min(int("".join(c for c in a if c.isdigit())) for a in names)
    flags += ["-gencode", f"arch=compute_{lowest},code=compute_{lowest}"]
    return flags


CU_SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))


class BuildExt(build_ext):
    """Builds fastattn._C entirely with nvcc (csrc/*.cu in parallel, the binding with the host
    compiler through nvcc, linked against the static CUDA runtime) before setuptools' own steps run;
    an optional build that fails is dropped from the extension list, so the install goes on without it."""

    def run(self):
        for ext in [e for e in self.extensions if e.name == "fastattn._C"]:
            try:
                ext.fastattn_so = self._build_cuda()
            except Exception as e:
                if getattr(ext, "fastattn_required", False):
                    raise
                _log(f"WARNING: building fastattn._C failed ({type(e).__name__}: {e}); installing without the "
                     "CUDA backend (backend='cuda' will report that it is not built)")
                self.extensions.remove(ext)
        if self.extensions:
            super().run()

    def build_extension(self, ext):
        if ext.name != "fastattn._C":
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ext.fastattn_so, target)

    def _build_cuda(self) -> str:
        import sysconfig

        home = find_cuda_home()
        if home is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        import pybind11

        nvcc = str(home / "bin" / "nvcc")
        out_dir = Path(self.build_temp).resolve() / "fastattn_C"
        out_dir.mkdir(parents=True, exist_ok=True)
        common = ["-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler", "-fPIC,-fvisibility=hidden"]
        cu_flags = [*common, "-Xptxas", "-warn-spills", *gencode_flags(os.environ.get("FASTATTN_CUDA_ARCHS", "80;90a"))]
        cpp_flags = [*common, "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]

        def compile_one(name: str) -> str:
            obj = out_dir / (name + ".o")
            flags = cu_flags if name.endswith(".cu") else cpp_flags
            run([nvcc, *flags, "-c", str(CSRC / name), "-o", str(obj)], name)
            return str(obj)

        sources = CU_SOURCES + ["bindings.cpp"]
        _log(f"compiling {len(sources)} sources with {nvcc} ({' '.join(cu_flags[cu_flags.index('-gencode'):])})")
        with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            objects = list(pool.map(compile_one, sources))
        so = out_dir / "_C.so"
        run([nvcc, "-shared", "--cudart", "static", "-o", str(so), *objects], "link")
        return str(so)


def run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(cmd)}\n{res.stdout}{res.stderr}")


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
    # Built by BuildExt with nvcc (sources listed for setuptools' bookkeeping only). The static CUDA
    # runtime is linked in: no dependency on where libcudart.so lives; streams come from torch as handles.
    ext = Extension("fastattn._C", sources=["csrc/bindings.cpp"], language="c++")
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
