"""Command line (also installed as the ``fastattn`` command):

    python -m fastattn demo    train the reference models on generated tasks (about a minute on a CPU)
    python -m fastattn check   list usable backends and check them against the reference
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="list usable backends and check them against the reference")
    check.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo = sub.add_parser("demo", help="train the reference models on generated tasks (CPU, ~1 minute)")
    from fastattn import backends  # (fastattn is imported already: this is its __main__)

    demo.add_argument("--backend", default="auto", choices=["auto", *(n for n in backends.BACKENDS if n != "cuda")],
                      help="attention backend of the models (default: auto; not cuda: its kernels take fp16/bf16 "
                           "and the demo's models are fp32)")
    demo.add_argument("--out", default="demo-output", help="folder for the PNG and summary.json")
    demo.add_argument("--quick", action="store_true",
                      help="a quarter of the training steps (a smoke test: its exit status does not check the goals)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda (fp32 models: the triton backend)")
    args = parser.parse_args(argv)

    import torch

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except (RuntimeError, TypeError) as e:
            parser.error(f"--device {args.device!r}: {e}")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device must be cpu or cuda, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA GPU is visible to this torch ({torch.__version__})")

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        # No GPU: run the Triton kernels through the interpreter. It must be set before triton is
        # imported, and importing the fastattn package already imported it: start over with it set
        # (in place for the command line; a child process when called from Python, which goes on).
        if argv is None:
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, "-m", "fastattn", *sys.argv[1:]])
        return subprocess.call([sys.executable, "-m", "fastattn", *argv], env={**os.environ, "TRITON_INTERPRET": "1"})

    if args.command == "demo":
        from fastattn.demo.run import run, unmet_goals

        summary = run(args.backend, args.out, quick=args.quick, seed=args.seed, device=args.device)
        if args.quick:
            return 0
        unmet = unmet_goals(summary)
        for goal in unmet:
            print(f"goal not met: {goal}", file=sys.stderr)
        return 1 if unmet else 0

    from fastattn.selfcheck import run_check

    return 0 if run_check(args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
