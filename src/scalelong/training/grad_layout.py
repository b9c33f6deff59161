"""Gradients laid out as DDP's buckets expect: DDP copies each gradient into a bucket view made
with its parameter's strides, and warns ("Grad strides do not match bucket view strides") when
they differ. For a parameter with dimensions of size 1 (a 1x1 convolution's weight, (O, I, 1, 1))
the strides of those dimensions are arbitrary: a convolution whose input is channels_last (the
UNet's attention output projection) returns its weight's gradient with other strides for them,
the same memory. A hook gives such a gradient its parameter's strides: a view, nothing copied."""

from __future__ import annotations

from torch import Tensor, nn


def _same_memory_layout(size, a, b) -> bool:
    return all(x == y for n, x, y in zip(size, a, b) if n != 1)


def match_gradient_strides(net: nn.Module) -> int:
    """Hook every parameter with a dimension of size 1 so that its gradient arrives with the
    parameter's strides where only those dimensions' strides differ; returns how many."""
    hooked = 0
    for p in net.parameters():
        if not p.requires_grad or p.dim() < 2 or 1 not in p.shape:
            continue

        def restride(grad: Tensor, p: nn.Parameter = p) -> Tensor:
            size, stride = p.shape, p.stride()  # read at each step: a later .to(memory_format) counts
            if grad.stride() == stride or not _same_memory_layout(size, grad.stride(), stride):
                return grad
            return grad.as_strided(size, stride)

        p.register_hook(restride)
        hooked += 1
    return hooked
