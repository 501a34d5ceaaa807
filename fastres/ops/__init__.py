"""fastres operators: ``torch.library`` custom ops with fake kernels, their autograd registered
through ``torch.library`` (in C++ for the compiled bn_act ops), never a
``torch.autograd.Function``; one file per op family (see fastres/ops/registry.py)."""

from fastres.ops.bn_act import bn_act
from fastres.ops.bn_act_add import bn_act_add
from fastres.ops.bn_act_conv import bn_act_conv2d
from fastres.ops.bn_act_from_stats import bn_act_from_stats
from fastres.ops.sync_bn_act import sync_bn_act, sync_bn_act_conv2d

__all__ = [
    "bn_act",
    "bn_act_add",
    "bn_act_conv2d",
    "bn_act_from_stats",
    "sync_bn_act",
    "sync_bn_act_conv2d",
]
