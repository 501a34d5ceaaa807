"""fastres operators: autograd-capable ``torch.library`` custom ops with fake kernels."""

from fastres.ops.bn_act import bn_act
from fastres.ops.bn_act_conv import bn_act_conv2d
from fastres.ops.sync_bn_act import sync_bn_act, sync_bn_act_conv2d

__all__ = ["bn_act", "bn_act_conv2d", "sync_bn_act", "sync_bn_act_conv2d"]
