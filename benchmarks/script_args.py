"""Argument checks shared by the GPU check's benchmark scripts (layer_table.py, profile_step.py,
finalize_share.py), which run on a CUDA GPU or, interpreted, on CPU."""

from __future__ import annotations

import argparse
import os

import torch


def require_device(parser: argparse.ArgumentParser, device: str) -> bool:
    """Whether ``device`` is ``"cuda"``; a usage error when it cannot run the Triton kernels
    (no CUDA GPU visible, or ``"cpu"`` without the Triton interpreter)."""
    on_gpu = device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the Triton kernels interpreted: set TRITON_INTERPRET=1")
    return on_gpu


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str):
    """A usage error for the first of ``names`` (attributes of ``args``) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
