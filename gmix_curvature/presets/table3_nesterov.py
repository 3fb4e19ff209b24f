"""Table 3 (Appendix A), Nesterov column: ResNet-50 on ImageNet at batch 32,768 for 2,512 steps (64 epochs).

Every number is the table's. BatchNorm momentum 0.9 is TensorFlow's convention (running ← 0.9·running +
0.1·batch); torch's ``momentum`` weighs the new batch, so it is 1 − 0.9 = 0.1 here. The peak learning rate
is given for 32K itself, so no linear scaling; Eq. 15 starts from η_init = 0.
"""

DESCRIPTION = "Table 3 Nesterov: ResNet-50/ImageNet, batch 32K, 2512 steps, Eq. 15 (706 warmup), γ₀ = 0.4138"

PRESET = {
    "model": "resnet50",
    "data": "imagenet",
    "eval_split": "val",
    "optimizer": "nesterov",
    "batch_size": 32768,
    "steps": 2512,
    "schedule": "poly",
    "warmup_steps": 706,
    "p_warmup": 2.0,
    "p_decay": 2.0,
    "lr": 7.05,
    "lr_scaling": "none",
    "lr_init": 0.0,
    "lr_final": 6e-6,
    "momentum": 0.97603,
    "weight_decay": 5.8e-5,
    "label_smoothing": 0.15,
    "bn_gamma0": 0.4138,
    "bn_momentum": 0.1,  # Table 3's 0.9 in TensorFlow's convention
    "bn_eps": 1e-5,
}
