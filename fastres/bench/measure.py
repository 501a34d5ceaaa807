"""Preparing each configuration (model, parity, steps) and timing them in interleaved rounds."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from fastres.bench import models
from fastres.bench.interleaved import time_interleaved
from fastres.bench.memory import saved_tensor_bytes
from fastres.bench.models import Config, Result, autocast, make_train_step, sync
from fastres.bench.parity import check_eval_parity, check_parity, parity_passes
from fastres.bench.peers import build_peers


@dataclass
class Prepared:
    """One configuration ready to time: its inference step, and for the PyTorch ones their model
    (compiled or not) and training step (a peer runtime has neither: inference only)."""

    result: Result
    infer_step: Callable[[], object]
    model: nn.Module | None = None
    runner: nn.Module | None = None
    train_step: Callable[[], object] | None = None


@dataclass(frozen=True)
class Batch:
    """The one batch every configuration runs: channels_last images and their labels."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def parity_images(self) -> int:
        return max(2, min(self.images.shape[0], 4))


def make_batch(args, device: str) -> Batch:
    """``args.batch_size`` random images (seeded) and labels, channels_last on ``device``."""
    generator = torch.Generator().manual_seed(0)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randn(size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)
    return Batch(images.contiguous(memory_format=torch.channels_last), labels)


def prepare(
    config: Config, reference: nn.Module, batch: Batch, args, device: str, dtype: torch.dtype
) -> Prepared:
    """Builds the configuration's model from the reference's weights (a copy of its own, so the
    configurations' optimizer steps never touch each other), checks its parity, and returns its
    training and inference steps on the shared batch."""
    result = Result(config)
    model = copy.deepcopy(reference)  # channels_last, like the reference and the input
    if config.family == "fused reference":
        return _prepare_fused_reference(result, model, reference, batch, device, dtype)
    if config.family == "fastres":
        assert config.backend is not None  # every fastres configuration names its backend
        model = models.build_fast(model, config.backend)
    runner = (
        cast(nn.Module, torch.compile(model, mode=args.compile_mode)) if config.compile else model
    )
    x, labels = batch.images, batch.labels
    k = batch.parity_images
    if config.family == "fastres" and not config.compile and device == "cpu":
        # Eval of the model as converted (running statistics untouched), as the peers run it;
        # check_parity's eval comes after a training step.
        with torch.no_grad():
            outputs = model.eval()(x[:k])
        result.parity.update(check_eval_parity(reference, outputs, x[:k]))
    if config.family != "reference" or config.compile:  # the baseline is the reference itself
        result.parity.update(check_parity(reference, runner, x[:k], labels[:k], device, dtype))
        result.parity_ok = parity_passes(result.parity, dtype)
    train_step = make_train_step(runner, x, labels, device, dtype)

    def infer_step():
        with torch.no_grad(), autocast(device, dtype):
            return runner(x)

    return Prepared(result, infer_step, model, runner, train_step)


def _prepare_fused_reference(
    result: Result,
    model: nn.Module,
    reference: nn.Module,
    batch: Batch,
    device: str,
    dtype: torch.dtype,
) -> Prepared:
    """``model`` (a copy of ``reference``, an Ultralytics detector) after its own ``fuse()``
    (BatchNorms folded into the convolutions), inference only, with its eval error on the
    parity images against the unfused reference."""
    model.eval()  # the wrapper too: in training its forward returns the loss
    detector: Any = model.model if isinstance(model, models.DetectorWithLoss) else model
    detector.fuse(verbose=False)
    k = batch.parity_images
    with torch.no_grad():
        result.parity = check_eval_parity(reference, model(batch.images[:k]), batch.images[:k])
    result.parity_ok = parity_passes(result.parity, torch.float32)

    def infer_step():
        with torch.no_grad(), autocast(device, dtype):
            return model(batch.images)

    return Prepared(result, infer_step, model)


def prepare_peers(
    reference: nn.Module, batch: Batch, openvino_precision: str
) -> tuple[list[Prepared], float, str]:
    """ONNX Runtime and OpenVINO (at ``openvino_precision``: ``"f32"`` forced, or
    ``"default"``, its own choice) on the reference exported to ONNX (fastres/bench/peers.py),
    inference only, each with its eval error on the parity images, checked by the rule for the
    precision it computes in; the export's seconds; the precision OpenVINO computes in."""
    peers, export_s = build_peers(reference, batch.images, {"openvino": openvino_precision})
    prepared = []
    for peer in peers:
        result = Result(models.Config(peer.name, "peer", None, False))
        result.first_call_s = peer.first_call_s
        k = batch.parity_images
        outputs = torch.from_numpy(peer.infer()[:k])
        result.parity = check_eval_parity(reference, outputs, batch.images[:k])
        low = _PRECISIONS.get(peer.precision, torch.float32)
        result.parity_ok = parity_passes(result.parity, low)
        prepared.append(Prepared(result, peer.infer))
    chosen = next(peer.precision for peer in peers if peer.name == "openvino")
    return prepared, export_s, chosen


# A peer's precision (fastres/bench/peers.py names them so) -> the dtype its parity rule takes.
_PRECISIONS = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def measure_memory(prepared: Prepared, batch: Batch, device: str, dtype: torch.dtype) -> None:
    """Activation bytes kept for backward, and on CUDA the training step's peak memory above
    what was allocated before it (so the other configurations' weights do not count)."""
    model, runner, result = prepared.model, prepared.runner, prepared.result
    assert model is not None and runner is not None and prepared.train_step is not None
    model.train()

    def forward():
        with autocast(device, dtype):
            return model(batch.images)

    result.saved_mib = saved_tensor_bytes(forward, exclude=model.parameters()) / 2**20
    if device == "cuda":
        runner.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prepared.train_step()
        torch.cuda.synchronize()
        result.peak_mem_mib = (torch.cuda.max_memory_allocated() - resident) / 2**20


def _time_first_eval_call(prepared: Prepared, device: str) -> None:
    """Seconds of the first inference after switching to eval: what a user waits before the
    steady state (fastres: folding and prepacking; torch.compile: compiling the eval graph)."""
    start = time.perf_counter()
    prepared.infer_step()
    sync(device)
    prepared.result.first_call_s = time.perf_counter() - start


def measure_all(
    prepared: list[Prepared], batch: Batch, args, device: str, dtype: torch.dtype
) -> None:
    """Times every configuration whose parity passed, in interleaved rounds: training steps
    first (PyTorch configurations), then inference steps in eval mode (all of them)."""
    timed = [p for p in prepared if p.result.parity_ok]
    trained = [p for p in timed if p.train_step is not None]
    warmup = 3 if device == "cuda" else 1
    for p in trained:
        assert p.runner is not None  # every configuration with a training step has a model
        p.runner.train()
    train = time_interleaved(
        {p.result.config.name: p.train_step for p in trained if p.train_step is not None},
        args.rounds,
        lambda: sync(device),
        warmup,
    )
    for p in trained:
        assert p.runner is not None
        p.result.train_seconds = train[p.result.config.name]
        measure_memory(p, batch, device, dtype)
        p.runner.eval()
        _time_first_eval_call(p, device)
    infer = time_interleaved(
        {p.result.config.name: p.infer_step for p in timed},
        args.rounds,
        lambda: sync(device),
        warmup,
    )
    for p in timed:
        p.result.infer_seconds = infer[p.result.config.name]
