"""A handful of small fastres calls for compute-sanitizer (memcheck, racecheck, synccheck).

Usage: python benchmarks/sanitizer_cases.py --device cuda   (under compute-sanitizer, on a GPU)
       python benchmarks/sanitizer_cases.py --device cpu    (the same cases on CPU: the cpu
                                                              backend and Triton interpreted)

Each case runs forward and backward of a fused op on shapes chosen to reach the kernels' edges:
element counts that leave a partial block (tails), an input that is a view with a storage offset
(misaligned base pointer), channel counts that are not powers of two, and both memory formats. Every
result is compared with the plain PyTorch composition, so a kernel that reads the wrong memory
fails here even where the sanitizer stays silent. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

# (N, C, H, W, channels_last, storage offset in elements)
BN_ACT_CASES = [
    (2, 13, 7, 5, False, 0),
    (3, 24, 9, 9, True, 0),
    (2, 40, 5, 3, True, 1),
    (1, 7, 33, 31, False, 3),
]
# (N, C_in, side, C_out, kernel, stride, groups)
CONV_CASES = [(2, 13, 9, 24, 3, 1, 1), (3, 40, 7, 17, 1, 2, 1), (2, 16, 10, 16, 3, 2, 4)]


def _input(shape, channels_last: bool, offset: int, device: str) -> torch.Tensor:
    """A tensor of ``shape`` that starts ``offset`` elements into its storage."""
    n, c, h, w = shape
    storage = torch.randn(offset + n * c * h * w, device=device)
    if channels_last:  # (N, H, W, C) in memory, seen as (N, C, H, W)
        x = storage[offset:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        x = storage[offset:].view(shape)
    return x.requires_grad_()


def _check(name: str, ours, reference, tolerance: float = 1e-4) -> None:
    for index, (a, b) in enumerate(zip(ours, reference, strict=True)):
        if not torch.allclose(a, b, rtol=tolerance, atol=tolerance):
            error = (a - b).abs().max().item()
            sys.exit(f"{name}: result {index} differs from PyTorch's by {error:.3g}")
    print(f"ok  {name}")


def bn_act_case(backend: str, device: str, n, c, h, w, channels_last, offset) -> None:
    from fastres.ops import bn_act

    x = _input((n, c, h, w), channels_last, offset, device)
    residual = torch.randn(x.shape, device=device)
    weight = torch.randn(c, device=device, requires_grad=True)
    bias = torch.randn(c, device=device, requires_grad=True)
    grad = torch.randn(x.shape, device=device)
    results = []
    for op_backend in (backend, "torch"):
        stats = [torch.zeros(c, device=device), torch.ones(c, device=device)]
        out = bn_act(x, weight, bias, *stats, residual=residual, training=True, backend=op_backend)
        results.append([out, *torch.autograd.grad(out, (x, weight, bias), grad), *stats])
    _check(
        f"bn_act[{backend}] {n}x{c}x{h}x{w} channels_last={channels_last} offset={offset}", *results
    )


def conv_case(device: str, n, c_in, side, c_out, kernel, stride, groups) -> None:
    from fastres.ops.fused_conv2d import bn_act_conv2d_stats_triton

    x = _input((n, c_in, side, side), True, 0, device)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, device=device) * 0.1
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    padding = kernel // 2
    out, mean, var = bn_act_conv2d_stats_triton(
        x, weight, None, None, None, None, False, 1e-5, "identity", stride, padding, 1, groups, True
    )
    expected = F.conv2d(x, weight, None, stride, padding, 1, groups)
    grad = torch.randn(out.shape, device=device)
    ours = [out, mean, var, *torch.autograd.grad(out, (x, weight), grad)]
    reference = [
        expected,
        expected.mean((0, 2, 3)),
        expected.var((0, 2, 3), unbiased=False),
        *torch.autograd.grad(expected, (x, weight), grad),
    ]
    _check(
        f"bn_act_conv2d_stats_triton {n}x{c_in}x{side}x{side} -> {c_out}, "
        f"{kernel}x{kernel}/{stride} groups={groups}",
        ours,
        reference,
        tolerance=1e-3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the Triton cases interpreted: set TRITON_INTERPRET=1")
    import fastres  # noqa: F401  (after the interpreter choice: it imports triton)

    torch.manual_seed(0)
    # float32 without TF32, so that the comparison with PyTorch is tight.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    compiled = "cuda" if args.device == "cuda" else "cpu"
    for case in BN_ACT_CASES:
        for backend in (compiled, "triton"):
            bn_act_case(backend, args.device, *case)
    for case in CONV_CASES:
        conv_case(args.device, *case)


if __name__ == "__main__":
    main()
