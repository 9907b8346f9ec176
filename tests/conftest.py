"""Test set-up: Triton runs through its interpreter when no GPU is present (set before triton is
imported), tests marked `gpu` are skipped without CUDA, and `DEVICE` is where kernels run."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Tests use each kernel's first table config instead of autotuning: GPU time is short.
    os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter cannot run bf16 tl.dot (triton-lang/triton#11584), so bf16 runs on a GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fresh random inputs on every run; FASTATTN_TEST_SEED=N replays a failing run.
SEED = int(os.environ.get("FASTATTN_TEST_SEED", torch.seed() % (2**31)))


def pytest_report_header(config):
    return f"fastattn: device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, " \
           f"seed={SEED} (FASTATTN_TEST_SEED={SEED} replays this run)"


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the run's seed and the test's id."""
    return torch.Generator().manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
