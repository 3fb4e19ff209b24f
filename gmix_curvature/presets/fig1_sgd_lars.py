"""Figure 1 (Section 5.1): ResNet-18 on CIFAR-10, batch 0.2K–5K, SGD with momentum and LARS,
with and without GradientMix.

From the paper: linear LR scaling with η_base = 0.1 per 200 samples, 200 epochs with 20 of warmup
(Eq. 15, "polynomial LR scheduling with gradual warmup"), LARS trust coefficient 10⁻³.
NOT in the paper, so chosen here: p_warmup = 1, p_decay = 2,
η_final = 0, momentum 0.9, weight decay 5·10⁻⁴, Gaussian weights with κ·B = 1
(γ̄ = 2), three seeds. ``GRID`` is the figure's layout: ``gmix sweep fig1_sgd_lars`` runs it.
"""

DESCRIPTION = "Fig. 1 grid: ResNet-18/CIFAR-10, batch 0.2K-5K x sgd/lars x (none, gaussian) x 3 seeds, 200 epochs"

PRESET = {
    "model": "resnet18",
    "data": "cifar10",
    "optimizer": "sgd",
    "momentum": 0.9,
    "trust_coefficient": 1e-3,
    "lr": 0.1,
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
    "optimizer": ["sgd", "lars"],
    "noise": ["none", "gaussian"],
    "seed": [0, 1, 2],
}
