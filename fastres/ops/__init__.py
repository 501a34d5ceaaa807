"""fastres operators: autograd-capable ``torch.library`` custom ops with fake kernels."""

from fastres.ops.bn_act import bn_act

__all__ = ["bn_act"]
