"""The configurations fastres.bench compares, the models they run and their training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastres
from fastres.backends import STATUS

MODELS = ("resnet50", "resnet18", "resnext50_32x4d")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Config:
    name: str  # e.g. "torchvision", "fastres[cpu]+compile"
    family: str  # "torchvision" or "fastres"
    backend: str | None
    compile: bool


@dataclass
class Result:
    config: Config
    parity: dict = field(default_factory=dict)
    parity_ok: bool = True
    train_seconds: list[float] = field(default_factory=list)  # one per round
    infer_seconds: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None
    saved_mib: float | None = None


def build_reference(model: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, model)()
    return net.to(device).to(memory_format=torch.channels_last)


def build_fast(reference: nn.Module, backend: str) -> nn.Module:
    """fastres's model with exactly the reference's weights and buffers."""
    return fastres.convert(reference, backend=backend)


def autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_train_step(model: nn.Module, x, labels, device, dtype) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def configurations(device: str, backends: list[str], compile_: bool) -> list[Config]:
    configs = [Config("torchvision", "torchvision", None, False)]
    if compile_:
        configs.append(Config("torchvision+compile", "torchvision", None, True))
    for backend in backends:
        configs.append(Config(f"fastres[{backend}]", "fastres", backend, False))
        if compile_:
            configs.append(Config(f"fastres[{backend}]+compile", "fastres", backend, True))
    return configs


def available_backends(device: str, requested: str) -> list[str]:
    if requested != "all":
        return [requested]
    names = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return [name for name in names if STATUS[name].available] or ["torch"]
