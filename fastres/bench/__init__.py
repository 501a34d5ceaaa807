"""``python -m fastres.bench``: verify, then benchmark, a ResNet against torchvision's.

It builds torchvision's model and the fastres one from the same weights, checks parity first
(largest output and gradient differences; a configuration whose parity check fails is reported
as failed, its speed is not measured, and the command exits non-zero), then measures side by
side in one run: training-step and inference throughput, peak memory on CUDA, and the activation
bytes kept for backward, for torchvision eager, torchvision + torch.compile, fastres eager on each
available backend, and fastres + torch.compile. Steps are timed in interleaved rounds (one step
of every configuration per round, in a rotating order; fastres.bench.interleaved), so that a machine
that slows down or speeds up mid-run moves every configuration alike. It prints medians with
their interquartile ranges, speed-ups over torchvision eager paired round by round (marked
"n.s." when not significant) and the targets, and writes a CSV and a PNG chart under ``--out``.

The package: :mod:`~fastres.bench.models` (configurations, models, steps),
:mod:`~fastres.bench.parity`, :mod:`~fastres.bench.measure` (preparation, interleaved timing),
:mod:`~fastres.bench.report` (table, CSV, chart) and :mod:`~fastres.bench.cli`.
"""

from fastres.bench.cli import main, parse_args
from fastres.bench.models import MODELS
from fastres.bench.report import device_name, row_speedup_text, speedup_text

__all__ = ["MODELS", "device_name", "main", "parse_args", "row_speedup_text", "speedup_text"]
