"""Three walks through fastres's layers: which files a call enters, in order, and every call
that moves back up a layer.

    python benchmarks/call_walks.py [--out walks.md]

The walks, each a call a user makes:

* ``convert``: ``fastres.convert(torchvision.models.resnet50())``;
* ``triton training forward``: one converted bottleneck's training forward on the ``triton``
  backend, down to the kernels (the Triton interpreter runs them on CPU);
* ``folded eval on cpu``: the same block's eval forward under ``torch.no_grad()`` on ``cpu``.

The forwards are walked on their second call (the first builds caches and tunes kernels), so
they show what every call runs. Layers, top to bottom, as the design's table orders them: model
(``convert``, builders, the package's entry points), adapter, module, plan, op, kernel; files
outside them (BatchNorm semantics, activations, backends, layout helpers) are shared helpers,
ranked below every layer, so any call they make into a layer counts as a move back up.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

# The triton walk runs the kernels under the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

import fastres  # noqa: E402

PACKAGE = Path(fastres.__file__).resolve().parent

# (layer, path prefixes inside the package), top to bottom.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("__init__.py", "conversion.py", "models.py", "builders.py", "explain.py")),
    ("adapter", ("adapters/",)),
    ("module", ("fast_block.py", "modules.py", "sync_batch_norm.py", "module_tree.py")),
    ("plan", ("plans/",)),
    ("op", ("ops/",)),
    ("kernel", ("triton/",)),
]
SHARED = "shared helper"


def layer_of(path: str) -> tuple[int, str]:
    """(rank, layer name) of a file inside the package; shared helpers rank below all."""
    for rank, (name, prefixes) in enumerate(LAYERS):
        if path.startswith(prefixes):
            return rank, name
    return len(LAYERS), SHARED


def package_path(frame: FrameType | None) -> str | None:
    """The path, inside the package, of the nearest frame from ``frame`` up that runs fastres
    code; None when there is none."""
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if file.is_relative_to(PACKAGE):
            return file.relative_to(PACKAGE).as_posix()
        frame = frame.f_back
    return None


class Walk:
    """The files a call enters, collapsed where one file calls itself, and the upward moves."""

    def __init__(self) -> None:
        self.entered: list[str] = []
        self.moves_up: Counter[tuple[str, str]] = Counter()

    def profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call":
            return
        callee = package_path(frame)
        if callee is None or package_path(frame.f_back) is None:
            if callee is not None and (not self.entered or self.entered[-1] != callee):
                self.entered.append(callee)
            return
        caller = package_path(frame.f_back)
        assert caller is not None
        if callee != caller and (not self.entered or self.entered[-1] != callee):
            self.entered.append(callee)
        if layer_of(callee)[0] < layer_of(caller)[0]:
            self.moves_up[(caller, callee)] += 1

    def record(self, call: Callable[[], object]) -> None:
        sys.setprofile(self.profile)
        try:
            call()
        finally:
            sys.setprofile(None)

    def markdown(self, title: str) -> str:
        files = list(dict.fromkeys(self.entered))
        lines = [
            f"### {title}",
            "",
            f"{len(files)} files entered, {len(self.entered)} moves from file to file; "
            f"{sum(self.moves_up.values())} calls move back up a layer "
            f"({len(self.moves_up)} distinct).",
            "",
            "Files, in the order first entered: "
            + ", ".join(f"`{path}` ({layer_of(path)[1]})" for path in files),
            "",
        ]
        for (caller, callee), count in sorted(self.moves_up.items()):
            lines.append(
                f"- up: `{caller}` ({layer_of(caller)[1]}) -> `{callee}` "
                f"({layer_of(callee)[1]}) x{count}"
            )
        return "\n".join(lines) + "\n"


def converted_block(backend: str) -> torch.nn.Module:
    """A converted torchvision bottleneck with a downsampling shortcut, on ``backend``."""
    torch.manual_seed(0)
    block = torchvision.models.resnet.Bottleneck(
        16,
        4,
        stride=2,
        downsample=torch.nn.Sequential(
            torch.nn.Conv2d(16, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16)
        ),
    )
    return fastres.convert(torch.nn.Sequential(block), backend=backend)


def walks() -> dict[str, Walk]:
    recorded: dict[str, Walk] = {}

    recorded["convert"] = Walk()
    model = torchvision.models.resnet50()
    recorded["convert"].record(lambda: fastres.convert(model))

    x = torch.randn(2, 16, 8, 8)
    triton_block = converted_block("triton").train()
    triton_block(x)
    recorded["triton training forward"] = Walk()
    recorded["triton training forward"].record(lambda: triton_block(x))

    cpu_block = converted_block("cpu").eval()
    with torch.no_grad():
        cpu_block(x)
        recorded["folded eval on cpu"] = Walk()
        recorded["folded eval on cpu"].record(lambda: cpu_block(x))
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the walks here (default: print them)")
    args = parser.parse_args()
    text = "".join(walk.markdown(title) + "\n" for title, walk in walks().items())
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
