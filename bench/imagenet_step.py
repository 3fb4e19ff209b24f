"""Where a step of the Table 3 preset spends its time on one GPU: decoding a micro-batch of ImageFolder images
(threads) vs the ResNet-50 forward and backward on it. Run on a CUDA machine from the repository root:

    python bench/imagenet_step.py DATA_DIR [--micro 512] [--reps 3] [--engine-batch 8192]

DATA_DIR holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (e.g. written by
tests/large_data.write_imagefolder). With ``--engine-batch B`` it also times one step of the training engine at
logical batch B in micro-batches of ``--micro``, with and without decoding the next micro-batch in the
background (``ImageFolderDataset.prefetch``), alternating, after a warm-up step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gmix_curvature.data_large import load_imagenet
from gmix_curvature.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--micro", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engine-batch", type=int, default=0)
    args = ap.parse_args()
    ds = load_imagenet("train", args.data_dir)
    g = torch.Generator().manual_seed(0)
    model = build_model("resnet50", num_classes=ds.num_classes, input_shape=ds.input_shape).cuda()
    idx = torch.randint(0, len(ds), (args.micro,), generator=g)
    for rep in range(args.reps):
        t = time.perf_counter()
        x, y = ds.get_batch(idx, g, train=True)
        t_dec = time.perf_counter() - t
        torch.cuda.synchronize()
        t = time.perf_counter()
        x, y = x.cuda(non_blocking=True), y.cuda()
        F.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        t_gpu = time.perf_counter() - t
        print(f"rep {rep}: decode {args.micro} images ({ds.workers} threads) {t_dec:.2f} s, "
              f"forward+backward {t_gpu:.2f} s; per 32,768-sample step: {(t_dec + t_gpu) * 32768 / args.micro:.0f} s",
              flush=True)  # fmt: skip
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    if args.engine_batch:
        engine_steps(args, ds)


def engine_steps(args: argparse.Namespace, train_ds) -> None:
    from gmix_curvature.data_large import ImageFolderDataset
    from gmix_curvature.train import TrainConfig, train

    val = load_imagenet("val", args.data_dir)
    base = dict(model="resnet50", data="imagenet", optimizer="sgd", lr=0.1, noise="gaussian", kappa_ratio=1.0,
                micro_batch_size=args.micro, steps=1, progress=False, device="cuda")  # fmt: skip
    train(TrainConfig(**base, batch_size=args.micro), datasets=(train_ds, val))  # warm-up
    for prefetch in (False, True, False, True):
        ImageFolderDataset.prefetch = prefetch
        torch.cuda.synchronize()
        t = time.perf_counter()
        train(TrainConfig(**base, batch_size=args.engine_batch), datasets=(train_ds, val))
        torch.cuda.synchronize()
        print(f"engine step at batch {args.engine_batch}, prefetch {prefetch}: {time.perf_counter() - t:.1f} s",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
