"""Table 2, Adam column ("standard hyperparameters with 90 epochs"): ResNet-50 on ImageNet at batch 32,768.

From Section 5.3: β = (0.9, 0.999), ε = 10⁻⁶, Eq. 15 with 20 warmup epochs of 90. NOT in the paper, so
chosen here and to be tuned: the peak learning rate (10⁻³ per 200 samples, linearly scaled — Section
5.1's Adam rate — i.e. 0.164 at 32K), the weight decay (10⁻⁴, L2 as in torch's Adam), p_warmup = 1,
p_decay = 2, η_final = 0, label smoothing 0.1 and γ₀ left as built.
"""

DESCRIPTION = "Table 2 Adam: ResNet-50/ImageNet, batch 32K, 90 epochs (20 warmup), β=(0.9, 0.999), ε=1e-6"

PRESET = {
    "model": "resnet50",
    "data": "imagenet",
    "eval_split": "val",
    "optimizer": "adam",
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "batch_size": 32768,
    "epochs": 90,
    "schedule": "poly",
    "warmup_epochs": 20,
    "p_warmup": 1.0,
    "p_decay": 2.0,
    "lr": 1e-3,
    "lr_scaling": "linear",
    "base_batch": 200,
    "lr_final": 0.0,
    "weight_decay": 1e-4,
    "label_smoothing": 0.1,
}
