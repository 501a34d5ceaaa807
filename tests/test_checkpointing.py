"""Activation checkpointing around converted blocks behaves as around the library's blocks.

``torch.utils.checkpoint`` recomputes a segment's forward in backward, and by default stops as
soon as the tensors autograd saved have been recomputed ("early stop"). nn.BatchNorm2d updates
its running statistics inside the op that saves its tensors, so the recomputation updates them a
second time; a fused op that updated them after saving its tensors had that second update cut
off at the end of each segment. Compared in float64, where fastres matches the library exactly:
outputs, every gradient and every buffer (running statistics, num_batches_tracked).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import fastres
from fastres.testing import assert_close


def _checkpointed_resnet(model: torchvision.models.ResNet, x: torch.Tensor, early_stop: bool):
    """torchvision's ResNet forward with every residual block in a checkpointed segment."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            h = checkpoint(block, h, use_reentrant=False, early_stop=early_stop)
    return model.fc(torch.flatten(model.avgpool(h), 1))


def _compare(fast: torch.nn.Module, reference: torch.nn.Module, outputs) -> None:
    assert_close(outputs[0], outputs[1], "output")
    for (name, p), q in zip(reference.named_parameters(), fast.parameters(), strict=True):
        # Whole-network gradients in float64: the tight tolerance, relative to the tensor's
        # magnitude (elements that nearly cancel differ by summation order alone).
        scale = max(1.0, p.grad.abs().max().item())
        assert_close(q.grad / scale, p.grad / scale, f"{name}.grad")
    for (name, b), c in zip(reference.named_buffers(), fast.buffers(), strict=True):
        assert_close(c, b, name)


def _train_twice(model, run) -> torch.Tensor:
    """Two forward + backward passes (running statistics after two steps)."""
    for _ in range(2):
        out = run(model)
        out.sum().backward()
    return out.detach()


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-recompute"])
def test_torchvision_blocks_under_checkpoint_match_the_library(early_stop):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).double().train()
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outputs = [
        _train_twice(model, lambda m: _checkpointed_resnet(m, x, early_stop))
        for model in (fast, reference)
    ]
    _compare(fast, reference, outputs)


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-recompute"])
def test_timm_grad_checkpointing_matches_the_library(early_stop):
    torch.manual_seed(0)
    reference = timm.create_model("resnet50", num_classes=10).double().train()
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model in (fast, reference):
        model.set_grad_checkpointing(True)
    with set_checkpoint_early_stop(early_stop):
        outputs = [_train_twice(model, lambda m: m(x)) for model in (fast, reference)]
    _compare(fast, reference, outputs)


@pytest.mark.parametrize(
    "backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton_interpreter)]
)
def test_fused_op_updates_running_statistics_before_saving(backend):
    """The update happens inside bn_act's op, before autograd packs its saved tensors: the last
    pack already sees the updated running statistics (what checkpoint's early stop relies on)."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    seen = []

    def pack(t):
        seen.append(running_mean.clone())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastres.ops.bn_act(
            x, None, None, running_mean, running_var, training=True, momentum=0.5, backend=backend
        )
    assert seen and not torch.equal(seen[-1], torch.zeros(4)), "updated after the last pack"
    assert torch.equal(seen[-1], running_mean)
