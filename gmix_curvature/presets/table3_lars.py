"""Table 3 (Appendix A), LARS column: ResNet-50 on ImageNet at batch 32,768 for 2,512 steps (64 epochs).

Every number is the table's; LARS is You et al. (2017) with the learning rate inside the momentum
(:mod:`gmix_curvature.optim.lars`), biases and BatchNorm parameters without decay or trust ratio.
BatchNorm momentum 0.9 (TensorFlow's convention) is torch's 0.1.
"""

DESCRIPTION = "Table 3 LARS: ResNet-50/ImageNet, batch 32K, 2512 steps, Eq. 15 (706 warmup), trust 1e-3, γ₀ = 0"

PRESET = {
    "model": "resnet50",
    "data": "imagenet",
    "eval_split": "val",
    "optimizer": "lars",
    "trust_coefficient": 1e-3,
    "eps": 0.0,
    "batch_size": 32768,
    "steps": 2512,
    "schedule": "poly",
    "warmup_steps": 706,
    "p_warmup": 1.0,
    "p_decay": 2.0,
    "lr": 29.0,
    "lr_scaling": "none",
    "lr_init": 0.0,
    "lr_final": 1e-4,
    "momentum": 0.929,
    "weight_decay": 1e-4,
    "label_smoothing": 0.1,
    "bn_gamma0": 0.0,
    "bn_momentum": 0.1,  # Table 3's 0.9 in TensorFlow's convention
    "bn_eps": 1e-5,
}
