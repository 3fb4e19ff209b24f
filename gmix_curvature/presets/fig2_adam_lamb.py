"""Figure 2 (Section 5.1): ResNet-18 on CIFAR-100, batch 0.2K–5K, Adam and LAMB,
with and without GradientMix.

From the paper: linear LR scaling with η_base = 0.001 per 200 samples, 200 epochs with 20 of warmup
(Eq. 15, "polynomial LR scheduling with gradual warmup").
NOT in the paper, so chosen here: p_warmup = 1, p_decay = 2,
η_final = 0, β = (0.9, 0.999) and ε = 10⁻⁶ (Section 5.3's), weight decay 5·10⁻⁴, Gaussian weights with κ·B = 1
(γ̄ = 2), three seeds: the Figure 1 preset with CIFAR-100.
``GRID`` is the figure's layout: ``gmix sweep fig2_adam_lamb`` runs it.
"""

from gmix_curvature.presets.fig1_adam_lamb import GRID as _GRID
from gmix_curvature.presets.fig1_adam_lamb import PRESET as _FIG1

DESCRIPTION = "Fig. 2 grid: ResNet-18/CIFAR-100, batch 0.2K-5K x adam/lamb x (none, gaussian) x 3 seeds, 200 epochs"


PRESET = {**_FIG1, "data": "cifar100"}

GRID = dict(_GRID)
