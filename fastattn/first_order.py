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
    """(n, *gradients, *anchors) -> the n gradients (no copy); its backward raises."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.detach() for t in tensors[:n])  # aliases, not views: in-place edits stay legal

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(MESSAGE)


class _Unpacked:
    """A backward's ctx with its saved tensors already unpacked."""

    def __init__(self, ctx, saved):
        self._ctx, self.saved_tensors = ctx, saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def first_order(backward):
    """Decorate an autograd Function's backward (ctx, *grads) -> tuple of gradients or None."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False): nothing to guard, no cost
            return backward(ctx, *grads)
        saved = ctx.saved_tensors  # unpacked once: torch.utils.checkpoint refuses a second unpack
        # Not the saved outputs (out, lse): their node is this one, which q, k, v's edges cover, and
        # holding it would keep its saved tensors alive with the gradients.
        anchors = [t for t in (*saved, *grads)
                   if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not ctx]
        with torch.no_grad():
            outs = backward(_Unpacked(ctx, saved), *grads)
        given = [i for i, o in enumerate(outs) if o is not None]
        if not anchors or not given:  # nothing a second backward could reach
            return outs
        guarded = _SecondOrderError.apply(len(given), *(outs[i] for i in given), *anchors)
        outs = list(outs)
        for i, g in zip(given, guarded):
            outs[i] = g
        return tuple(outs)

    return wrapper
