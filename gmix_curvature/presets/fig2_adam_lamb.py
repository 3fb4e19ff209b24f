"""Figure 2 (Section 5.1): ResNet-18 on CIFAR-100, batch 0.2K–5K, Adam and LAMB,
with and without GradientMix.

From the paper: linear LR scaling with η_base = 0.001 per 200 samples, 200 epochs with 20 of warmup
(Eq. 15, "polynomial LR scheduling with gradual warmup").
NOT in the paper, so chosen here: p_warmup = 1, p_decay = 2,
η_final = 0, β = (0.9, 0.999) and ε = 10⁻⁶ (Section 5.3's), weight decay 5·10⁻⁴, Gaussian weights with κ·B = 1
(γ̄ = 2), three seeds. ``GRID`` is the figure's layout: ``gmix sweep fig2_adam_lamb`` runs it.
"""

DESCRIPTION = "Fig. 2 grid: ResNet-18/CIFAR-100, batch 0.2K-5K x adam/lamb x (none, gaussian) x 3 seeds, 200 epochs"

PRESET = {
    "model": "resnet18",
    "data": "cifar100",
    "optimizer": "adam",
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "lr": 0.001,
    "lr_scaling": "linear",
    "base_batch": 200,
    "weight_decay": 5e-4,
    "schedule": "poly",
    "warmup_epochs": 20,
    "epochs": 200,
    "p_warmup": 1.0,
    "p_decay": 2.0,
    "lr_final": 0.0,
    "noise": "gaussian",
    "kappa_ratio": 1.0,
    "mixing": "sample",
    "batch_size": 200,
}

GRID = {
    "batch_size": [200, 500, 1000, 2000, 5000],
    "optimizer": ["adam", "lamb"],
    "noise": ["none", "gaussian"],
    "seed": [0, 1, 2],
}
