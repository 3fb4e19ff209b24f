"""The κ dose-response on the embedded digits (issue 16, items 3–4): ``gmix sweep dose_digits --out DIR``.

Training as the Table 1 ``tiny`` preset (digits CNN, batch 512, SGD momentum 0.9, 0.1 per 200 samples scaled
linearly, Eq. 15 with 6 warmup epochs, p_warmup 1, p_decay 2, final LR 0, 60 epochs); the grid of
:func:`gmix_curvature.dose_response.dose_grid`: r = κ·B ∈ {0, 0.5, 1, 2, 3, 4} for Gaussian and Rademacher
weights at weight decay 5·10⁻⁴, and the route check at weight decay 0 for r ∈ {0, 1, 2, 4}, 6 seeds (108 runs);
one CPU thread per cell, so that the results do not depend on the core count or ``--jobs``.
"""

from gmix_curvature.dose_response import dose_grid
from gmix_curvature.table1.presets.tiny import TINY_TRAIN

DESCRIPTION = "dose-response grid: digits CNN, batch 512, r = 0-4 x gaussian/rademacher x wd 5e-4/0, 6 seeds"

# the training of Table 1's tiny preset (digits CNN, SGD, poly schedule, 60 epochs) at its large batch
PRESET = {
    **{k: v for k, v in TINY_TRAIN.items() if k not in ("train_split", "eval_split")},
    "batch_size": 512,
    "trace_samples": 256,
}

GRID = dose_grid(seeds=6, control_ratios=(0.0, 1.0, 2.0, 4.0))
CELL = "gmix_curvature.dose_response:train_and_measure"
REPORT = "gmix_curvature.dose_response:write_dose_response"
THREADS = 1
