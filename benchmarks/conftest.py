"""`pytest benchmarks/`: without a GPU the Triton kernels run through the interpreter, which has
to be chosen before fastattn (and triton) are imported."""

from benchmarks.common import use_interpreter_without_gpu

use_interpreter_without_gpu()
