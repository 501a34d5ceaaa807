"""A record of the ops a computation dispatches, for tests that check which kernels ran."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """Within ``with OpLog() as log:``, ``log.ops`` lists each dispatched op's name
    (``"aten.convolution"``, ``"fastres.bn_act_conv2d_stats_triton"``, ...), in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
