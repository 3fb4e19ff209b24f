"""Figure 3 (Section 5.2): Transformer-base on Multi30k (German→English) with Adam and LAMB, across batch sizes.

From the paper (following Lin et al. 2020): linear LR scaling, gradual warmup then inverse square root
(Vaswani et al. 2017), 4000 warmup steps at the base batch 64 "linearly decayed by the batch size"
(:func:`~gmix_curvature.optim.scaled_warmup_steps`, the same warmup *samples* at every batch size),
validation accuracy (token level). NOT in the paper, so chosen here: η_base = 10⁻⁴ per 64 sentences,
β = (0.9, 0.98) and ε = 10⁻⁹ (Vaswani et al.), label smoothing 0.1, no weight decay, 100 epochs,
Gaussian weights with κ·B = 1, the batch sizes of ``GRID`` (the text names 2K and 5K), three seeds.
"""

from gmix_curvature.optim.schedules import scaled_warmup_steps

DESCRIPTION = "Fig. 3 grid: Transformer-base/Multi30k, batch 64-5K x adam/lamb x (none, gaussian) x 3 seeds"

PRESET = {
    "model": "transformer",
    "data": "multi30k",
    "eval_split": "val",
    "optimizer": "adam",
    "betas": (0.9, 0.98),
    "eps": 1e-9,
    "lr": 1e-4,
    "lr_scaling": "linear",
    "base_batch": 64,
    "weight_decay": 0.0,
    "schedule": "rsqrt",
    "batch_size": 64,
    "warmup_steps": scaled_warmup_steps(64),
    "epochs": 100,
    "label_smoothing": 0.1,
    "noise": "gaussian",
    "kappa_ratio": 1.0,
    "mixing": "sample",
}

GRID = {
    "batch_size": [{"batch_size": b, "warmup_steps": scaled_warmup_steps(b)} for b in (64, 512, 1024, 2048, 5120)],
    "optimizer": ["adam", "lamb"],
    "noise": ["none", "gaussian"],
    "seed": [0, 1, 2],
}
