"""Command line: ``python -m fastattn check`` (also installed as the ``fastattn`` command)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="list usable backends and check them against the reference")
    check.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        # No GPU: run the Triton kernels through the interpreter. It must be set before triton is
        # imported, and importing the fastattn package already imported it: start over with it set.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastattn", *(sys.argv[1:] if argv is None else argv)])

    from fastattn.selfcheck import run_check

    return 0 if run_check(args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
