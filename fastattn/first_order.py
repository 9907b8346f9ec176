"""The backward of fastattn's autograd Functions is first order: the kernels' gradients (and the
ring's, built from them) are not differentiable again. `first_order` marks such a backward.

torch's `once_differentiable` attaches its "differentiate twice" error only when a cotangent
requires grad. A gradient penalty takes the gradient of `out.sum()` (a constant cotangent) with
create_graph=True and differentiates it again through the saved q, k, v: there torch's guard
attaches nothing and the second-order term is silently dropped. Here every gradient made with
create_graph=True carries the error node, so a second backward through it raises.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

_MESSAGE = (b"trying to differentiate twice a fastattn attention: its backward is first order (the gradients of "
            b"a create_graph=True backward cannot be differentiated again)")


def first_order(backward):
    """Decorate an autograd Function's backward (ctx, *grads) -> tuple of gradients or None."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False): nothing to guard, no cost
            return backward(ctx, *grads)
        with torch.no_grad():
            outs = backward(ctx, *grads)
        err = _functions.DelayedError(_MESSAGE, len(outs))
        return err(*[None if o is None else o.detach().requires_grad_() for o in outs])

    return wrapper
