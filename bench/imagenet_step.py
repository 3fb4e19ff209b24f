"""Where a step of the Table 3 preset spends its time on one GPU: decoding a micro-batch of ImageFolder images
(threads) vs the ResNet-50 forward and backward on it. Run on a CUDA machine from the repository root:

    python bench/imagenet_step.py DATA_DIR [--micro 512] [--reps 3]

DATA_DIR holds ``train/<class>/<image>`` (e.g. written by tests/large_data.write_imagefolder).
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
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
