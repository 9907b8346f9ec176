"""Command line (also installed as the ``fastattn`` command):

    python -m fastattn demo    train the reference models on generated tasks (about a minute on a CPU)
    python -m fastattn check   list usable backends and check them against the reference
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="list usable backends and check them against the reference")
    check.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo = sub.add_parser("demo", help="train the reference models on generated tasks (CPU, ~1 minute)")
    demo.add_argument("--backend", default="auto", help="attention backend of the models (default: auto)")
    demo.add_argument("--out", default="demo-output", help="folder for the PNG and summary.json")
    demo.add_argument("--quick", action="store_true", help="a quarter of the training steps (a smoke test)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda (fp32 models: the triton backend)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        # No GPU: run the Triton kernels through the interpreter. It must be set before triton is
        # imported, and importing the fastattn package already imported it: start over with it set.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastattn", *(sys.argv[1:] if argv is None else argv)])

    if args.command == "demo":
        from fastattn.demo.run import run

        summary = run(args.backend, args.out, quick=args.quick, seed=args.seed, device=args.device)
        return 0 if summary["dates"]["exact_match"] >= summary["dates"]["goal"] or args.quick else 1

    from fastattn.selfcheck import run_check

    return 0 if run_check(args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
