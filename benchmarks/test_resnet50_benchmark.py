"""ResNet-50 training step and the activation bytes kept for backward: torchvision eager against
fastres (torchvision's model after fastres.convert), side by side in one run.

Input 224x224, channels_last, batch FASTRES_BENCH_BATCH; on a GPU under autocast in
FASTRES_BENCH_DTYPE (float32 runs without autocast). Target: activation bytes at
most 0.86 of torchvision's; the step itself is reported against torchvision eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import BATCH, DEVICE, DTYPE, timed

import fastres
from fastres.bench.memory import saved_tensor_bytes


def _model(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(DEVICE).to(memory_format=torch.channels_last)
    return fastres.convert(model, inplace=True) if impl == "fastres" else model


@pytest.mark.parametrize("impl", ["torchvision", "fastres"])
def test_resnet50_training_step(benchmark, describe, impl):
    model = _model(impl).train()
    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(DEVICE, dtype=DTYPE, enabled=DTYPE != torch.float32)

    def forward():
        with autocast:
            return model(x)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward().float(), labels)
        loss.backward()
        optimizer.step()

    timed(step)()  # warm-up: allocator, oneDNN / cuDNN algorithm choice
    saved = saved_tensor_bytes(forward, exclude=model.parameters())
    describe(
        op="resnet50_train_step",
        shape=[BATCH, 3, 224, 224],
        impl=impl,
        mode="train",
        images=BATCH,
        saved_bytes=saved,
        bytes=0,
        residual=False,
    )
    benchmark(timed(step))
