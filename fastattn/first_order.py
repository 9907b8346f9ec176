"""The backward of fastattn's autograd Functions is first order: the kernels' gradients (and the
ring's, built from them) are not differentiable again. `first_order` marks such a backward.

torch's `once_differentiable` attaches its "differentiate twice" error node only when a cotangent
requires grad, and with no edge to the Function's inputs. A gradient penalty takes the gradient of
`out.sum()` (a constant cotangent) with create_graph=True and differentiates it again through the
saved q, k, v, and `torch.autograd.grad(penalty, params)` only runs the nodes on a path to params:
either way the second-order term was silently dropped. Here every gradient made with
create_graph=True passes through a node with edges to the saved inputs (and the cotangents) that
require grad, and that node raises when a second backward reaches it.
"""

from __future__ import annotations

import functools

import torch

MESSAGE = ("trying to differentiate twice a fastattn attention: its backward is first order (the gradients "
           "of a create_graph=True backward cannot be differentiated again)")


class _SecondOrderError(torch.autograd.Function):
    """(n, *gradients, *anchors) -> the n gradients, as views; its backward raises."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(MESSAGE)


def first_order(backward):
    """Decorate an autograd Function's backward (ctx, *grads) -> tuple of gradients or None."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False): nothing to guard, no cost
            return backward(ctx, *grads)
        anchors = [t for t in (*ctx.saved_tensors, *grads)
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        with torch.no_grad():
            outs = backward(ctx, *grads)
        given = [i for i, o in enumerate(outs) if o is not None]
        if not anchors or not given:  # nothing a second backward could reach
            return outs
        guarded = _SecondOrderError.apply(len(given), *(outs[i] for i in given), *anchors)
        outs = list(outs)
        for i, g in zip(given, guarded):
            outs[i] = g
        return tuple(outs)

    return wrapper
