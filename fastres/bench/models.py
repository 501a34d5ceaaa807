"""The configurations fastres.bench compares, the models they run and their training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastres
from fastres.backends import STATUS

# torchvision's by name; timm's as "timm:<name>", Hugging Face transformers' as "hf:<name>" and
# Ultralytics' as "ultralytics:<model yaml without .yaml>" (built from their configurations,
# random weights: nothing is downloaded).
MODELS = (
    "resnet50",
    "resnet18",
    "resnext50_32x4d",
    "timm:resnet18",
    "timm:resnet50",
    "timm:resnet50d",
    "hf:resnet-18",
    "hf:resnet-50",
    "ultralytics:yolov8-cls-resnet50",
    "ultralytics:yolo11n",
    "ultralytics:yolov8n",
    "ultralytics:yolo26n",
)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Config:
    name: str  # e.g. "torchvision", "timm+compile", "fastres[cpu]+compile"
    # "reference" (the library's own model), "fused reference" (an Ultralytics detector after
    # its fuse(): inference only), "fastres", or "peer" (ONNX Runtime, OpenVINO)
    family: str
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
    # Seconds of the first inference in eval (a peer: its session or compilation, then that).
    first_call_s: float | None = None


class LogitsOf(nn.Module):
    """A classifier whose forward returns more than the logits, as one that returns the logits
    tensor: transformers' (an output object with ``.logits``) and Ultralytics' (in eval,
    ``(probabilities, logits)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, tuple):  # Ultralytics in eval (in training: the logits)
            return out[1]
        return out if isinstance(out, torch.Tensor) else out.logits


class DetectorWithLoss(nn.Module):
    """An Ultralytics detector as the benchmark runs it: in training its forward returns
    Ultralytics' own detection loss (``model.loss``: box, class and DFL terms, with its
    default hyperparameters) for three fixed boxes per image; in eval, the predictions tensor
    (boxes and class scores per anchor)."""

    model: Any  # ultralytics' DetectionModel (its loss() and args are not nn.Module's)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from ultralytics.cfg import get_cfg

        self.model = model
        self.model.args = get_cfg()  # what the loss reads (box, cls and dfl gains)

    @staticmethod
    def targets(x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Three boxes (normalised xywh) of classes 0, 1 and 2 in every image of the batch."""
        n = x.shape[0]
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.3]])
        return {
            "cls": torch.arange(3.0).repeat(n)[:, None].to(x.device),
            "bboxes": boxes.repeat(n, 1).to(x.device),
            "batch_idx": torch.arange(n).repeat_interleave(3).to(x.device, torch.float32),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            loss, _ = self.model.loss({"img": x, **self.targets(x)}, self.model(x))
            return loss.sum()
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out


def training_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a training step minimises: a detector's own (its forward returns it, a scalar),
    else cross-entropy of the logits, in float32 at least."""
    if output.dim() == 0:
        return output
    return F.cross_entropy(output.to(torch.promote_types(output.dtype, torch.float32)), labels)


def _library_model(model: str) -> nn.Module:
    library, _, name = model.rpartition(":")
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    if library == "hf":
        from transformers import ResNetConfig, ResNetForImageClassification

        configs = {  # microsoft/resnet-50's and resnet-18's
            "resnet-50": ResNetConfig(),
            "resnet-18": ResNetConfig(
                layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]
            ),
        }
        config = configs[name]
        config.num_labels = 1000  # ImageNet's, like the other models (the default is 2)
        return LogitsOf(ResNetForImageClassification(config))
    if library == "ultralytics" and "-cls" in name:
        from ultralytics.nn.tasks import ClassificationModel

        return LogitsOf(ClassificationModel(f"{name}.yaml", nc=1000, verbose=False))
    if library == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel

        return DetectorWithLoss(DetectionModel(f"{name}.yaml", verbose=False))
    return getattr(torchvision.models, name)()


def is_detector(model: str) -> bool:
    """An Ultralytics detection model (one of MODELS)."""
    return model.startswith("ultralytics:") and "-cls" not in model


def reference_library(model: str) -> str:
    """The library whose own model is the reference: torchvision, timm, transformers or
    ultralytics."""
    library = model.rpartition(":")[0]
    return {"": "torchvision", "hf": "transformers"}.get(library, library)


def build_reference(model: str, device: str) -> nn.Module:
    """The library's own model (one of MODELS), random weights, channels_last on ``device``."""
    torch.manual_seed(0)
    net = _library_model(model).to(device)
    # Module.to takes memory_format at run time; its type stubs do not say so.
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


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
            output = model(x)
        loss = training_loss(output, labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def configurations(model: str, backends: list[str], compile_: bool) -> list[Config]:
    """The reference (the library's own model, eager and compiled) and fastres on each
    backend (eager and compiled)."""
    library = reference_library(model)
    configs = [Config(library, "reference", None, False)]
    if is_detector(model):  # what Ultralytics runs for inference: BatchNorms folded by fuse()
        configs.append(Config(f"{library}+fuse", "fused reference", None, False))
    if compile_:
        configs.append(Config(f"{library}+compile", "reference", None, True))
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
