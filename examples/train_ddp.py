"""Train a ResNet-50 on fastres's fused blocks with DistributedDataParallel and synchronized
BatchNorm.

Start one process per GPU (or several on a CPU machine) with torchrun::

    torchrun --nproc_per_node=8 examples/train_ddp.py --data /path/to/imagenet/train
    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 20          # synthetic images, CPU ok

Each process takes its GPU from LOCAL_RANK and joins an NCCL group; without GPUs the processes
run on CPU and join a gloo group. The model is torchvision's ResNet-50 passed through
``fastres.convert(model, sync_bn=True)``: every block runs on the fused kernels and every
BatchNorm computes its batch statistics over all processes, so training with P processes of B
images each behaves as one process with P * B images.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import fastres


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an ImageFolder directory (default: synthetic images)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="for a global batch of 256, scaled linearly with the global batch",
    )
    parser.add_argument("--backend", default="auto", help="fastres backend for the blocks")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--workers", type=int, default=4, help="data loading processes")
    return parser.parse_args()


class SyntheticImages(Dataset):
    """Random images and labels, the same on every run: for trying the set-up without data."""

    def __init__(self, size: int, image_size: int, num_classes: int):
        self.size, self.image_size, self.num_classes = size, image_size, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return image, int(torch.randint(self.num_classes, (1,), generator=generator))


def make_dataset(args: argparse.Namespace, world_size: int) -> Dataset:
    if args.data is None:
        return SyntheticImages(
            args.steps * args.batch_size * world_size, args.image_size, args.num_classes
        )
    transforms = torchvision.transforms
    return torchvision.datasets.ImageFolder(
        args.data,
        transforms.Compose(
            [
                transforms.RandomResizedCrop(args.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        ),
    )


def setup() -> tuple[torch.device, int, int]:
    """Joins the process group torchrun describes; returns (device, rank, world size)."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("start this script with torchrun (see its docstring)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"process {local_rank} has no GPU of its own (this machine has "
                f"{torch.cuda.device_count()}): start one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def main() -> None:
    args = parse_args()
    device, rank, world_size = setup()
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = torchvision.models.resnet50(num_classes=args.num_classes)
    model = fastres.convert(model, backend=args.backend, sync_bn=True)
    model = model.to(device, memory_format=torch.channels_last)
    ddp_model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )

    dataset = make_dataset(args, world_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    lr = args.lr * args.batch_size * world_size / 256
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    step, epoch, started = 0, 0, time.perf_counter()
    ddp_model.train()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(ddp_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0 and (step % 10 == 0 or step in (1, args.steps)):
                images_per_s = step * args.batch_size * world_size / (time.perf_counter() - started)
                print(
                    f"step {step}/{args.steps}  loss {loss.item():.4f}  "
                    f"{images_per_s:.1f} images/s over {world_size} processes",
                    flush=True,
                )
            if step == args.steps:
                break
        epoch += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
