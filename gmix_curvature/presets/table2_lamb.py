"""Table 2, LAMB column ("standard hyperparameters with 90 epochs"): ResNet-50 on ImageNet at batch 32,768.

From Section 5.3: β = (0.9, 0.999), ε = 10⁻⁶ (You et al. 2019), Eq. 15 with 20 warmup epochs of 90.
NOT in the paper, so chosen here and to be tuned: the peak learning rate (10⁻³ per 200 samples, linearly
scaled — Section 5.1's LAMB rate — i.e. 0.164 at 32K), the weight decay (0.01, inside LAMB's trust-ratio
update as in You et al. 2019), p_warmup = 1, p_decay = 2, η_final = 0 and label smoothing 0.1.
"""

from gmix_curvature.presets.table2_adam import PRESET as _ADAM

DESCRIPTION = "Table 2 LAMB: ResNet-50/ImageNet, batch 32K, 90 epochs (20 warmup), β=(0.9, 0.999), ε=1e-6"


# The same standard settings as the Adam column; LAMB's own optimizer and weight decay.
PRESET = {**_ADAM, "optimizer": "lamb", "weight_decay": 0.01}
