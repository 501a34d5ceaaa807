"""ResNet-50's layer shapes, shared by the benchmarks (benchmarks/ is on sys.path for them)."""

# (C_in, side, C_out, kernel, stride, groups): every distinct convolution of ResNet-50 (and the
# grouped 3x3 of ResNeXt-50's first stage).
RESNET50_CONVOLUTIONS = [
    (3, 224, 64, 7, 2, 1),
    (64, 56, 64, 1, 1, 1),
    (64, 56, 64, 3, 1, 1),
    (64, 56, 256, 1, 1, 1),
    (256, 56, 64, 1, 1, 1),
    (256, 56, 128, 1, 1, 1),
    (128, 56, 128, 3, 2, 1),
    (128, 28, 512, 1, 1, 1),
    (256, 56, 512, 1, 2, 1),
    (512, 28, 128, 1, 1, 1),
    (128, 28, 128, 3, 1, 1),
    (512, 28, 256, 1, 1, 1),
    (256, 28, 256, 3, 2, 1),
    (256, 14, 1024, 1, 1, 1),
    (512, 28, 1024, 1, 2, 1),
    (1024, 14, 256, 1, 1, 1),
    (256, 14, 256, 3, 1, 1),
    (1024, 14, 512, 1, 1, 1),
    (512, 14, 512, 3, 2, 1),
    (512, 7, 2048, 1, 1, 1),
    (1024, 14, 2048, 1, 2, 1),
    (2048, 7, 512, 1, 1, 1),
    (512, 7, 512, 3, 1, 1),
    (128, 56, 128, 3, 1, 32),
]

# ResNet-50's distinct BatchNorm shapes (channels, height = width), and whether a residual is
# added there (the last BatchNorm of each bottleneck).
RESNET50_BN_SHAPES = [
    (64, 112, False),
    (64, 56, False),
    (128, 56, False),
    (256, 56, True),
    (128, 28, False),
    (256, 28, False),
    (512, 28, True),
    (256, 14, False),
    (512, 14, False),
    (1024, 14, True),
    (512, 7, False),
    (2048, 7, True),
]


def conv_id(spec) -> str:
    """'64x56-3x3s1-64': input channels x side, kernel and stride (and groups), output channels."""
    c, s, o, k, st, g = spec
    return f"{c}x{s}-{k}x{k}s{st}" + (f"g{g}" if g > 1 else "") + f"-{o}"
