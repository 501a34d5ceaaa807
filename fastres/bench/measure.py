"""Preparing each configuration (model, parity, steps) and timing them in interleaved rounds."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from fastres.bench import models
from fastres.bench.models import Config, Result, autocast, make_train_step, sync
from fastres.bench.parity import check_parity, parity_passes
from fastres.interleaved import time_interleaved
from fastres.memory import saved_tensor_bytes


@dataclass
class Prepared:
    """One configuration ready to time: its model (compiled or not) and its two steps."""

    result: Result
    model: nn.Module
    runner: nn.Module
    batch: torch.Tensor
    train_step: Callable[[], object]
    infer_step: Callable[[], object]


def prepare(
    config: Config, reference: nn.Module, args, device: str, dtype: torch.dtype
) -> Prepared:
    """Builds the configuration's model from the reference's weights (a copy of its own, so the
    configurations' optimizer steps never touch each other), checks its parity, and returns its
    training and inference steps on one fixed channels_last batch."""
    result = Result(config)
    model = copy.deepcopy(reference)  # channels_last, like the reference and the input
    if config.family == "fastres":
        assert config.backend is not None  # every fastres configuration names its backend
        model = models.build_fast(model, config.backend)
    runner = (
        cast(nn.Module, torch.compile(model, mode=args.compile_mode)) if config.compile else model
    )
    images = args.batch_size
    x = torch.randn(images, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 1000, (images,), device=device)
    if config.family != "reference" or config.compile:  # the baseline is the reference itself
        parity_images = max(2, min(images, 4))
        result.parity = check_parity(
            reference, runner, x[:parity_images], labels[:parity_images], device, dtype
        )
        result.parity_ok = parity_passes(result.parity, dtype)
    train_step = make_train_step(runner, x, labels, device, dtype)

    def infer_step():
        with torch.no_grad(), autocast(device, dtype):
            return runner(x)

    return Prepared(result, model, runner, x, train_step, infer_step)


def measure_memory(prepared: Prepared, device: str, dtype: torch.dtype) -> None:
    """Activation bytes kept for backward, and on CUDA the training step's peak memory above
    what was allocated before it (so the other configurations' weights do not count)."""
    model, result = prepared.model, prepared.result
    model.train()

    def forward():
        with autocast(device, dtype):
            return model(prepared.batch)

    result.saved_mib = saved_tensor_bytes(forward, exclude=model.parameters()) / 2**20
    if device == "cuda":
        prepared.runner.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prepared.train_step()
        torch.cuda.synchronize()
        result.peak_mem_mib = (torch.cuda.max_memory_allocated() - resident) / 2**20


def measure_all(prepared: list[Prepared], args, device: str, dtype: torch.dtype) -> None:
    """Times every configuration whose parity passed, in interleaved rounds: training steps
    first, then inference steps in eval mode."""
    timed = [p for p in prepared if p.result.parity_ok]
    warmup = 3 if device == "cuda" else 1
    for p in timed:
        p.runner.train()
    train = time_interleaved(
        {p.result.config.name: p.train_step for p in timed},
        args.rounds,
        lambda: sync(device),
        warmup,
    )
    for p in timed:
        p.result.train_seconds = train[p.result.config.name]
        measure_memory(p, device, dtype)
        p.runner.eval()
    infer = time_interleaved(
        {p.result.config.name: p.infer_step for p in timed},
        args.rounds,
        lambda: sync(device),
        warmup,
    )
    for p in timed:
        p.result.infer_seconds = infer[p.result.config.name]
