"""Table 1 of the paper (Section 2.2): the curvature Tr(G(θ)) (Eq. 5) of what large-batch SGD finds, with
and without GradientMix (Eq. 4), measured with uncertainty — and what could explain a difference (issues 10, 16).

One call, :func:`run_table1`, runs the whole pipeline of a :class:`Table1Preset`:

1. **κ** (Eq. 12): given, or chosen per noise kind by :func:`select_kappa` — a small sweep of r = κ·B trained on
   the ``fit`` split and scored on ``val``, never on ``test`` (the rule: the highest mean validation accuracy,
   ties to the lower validation loss, then to the smaller r);
2. **training**: the averaging baseline (``noise="none"``), Gaussian and Rademacher GradientMix at the same
   large batch with identical hyperparameters, and a small-batch reference, ``seeds`` runs each, through
   :func:`gmix_curvature.train.train` (each keeps its checkpoint, so ``gmix trace`` can re-measure it, and
   records Tr(G) and the training loss along training in ``metrics.jsonl``, kind ``"trace"``); every row of one
   seed shares the initialisation and the data order;
3. **measurement** (:func:`measure_run`, the model in eval mode): on the measure split (the test split) the
   accuracy, exact Tr(G) and |log Tr(G)|, the empirical-Fisher trace, the Hessian trace (Hutchinson) and the
   scale-invariant sharpness Σ_l ‖θ_l‖² Tr(G_ll); on the training split the training loss and the top
   eigenvalues λ_max of G and of the Hessian, beside the optimizer's stability threshold
   (:func:`stability_threshold`) at the peak and at the final learning rate; along training, Tr(G) at one
   training loss that every run reached (:func:`matched_loss_trace`) and the largest ratio of λ_max(G) to the
   threshold at that step's learning rate;
4. **summary**: mean ± std over seeds and Welch's t-test against the baseline for every quantity
   (:func:`summarise`); the rows compared **paired by seed** (:func:`paired_comparisons`: paired t, 95 %
   interval, Cohen's d_z, Holm over the metrics, the difference detectable with 80 % power); the **verdict**
   on the paper's claims (:func:`judge_claims`: holds / does not hold / not resolvable at this power); printed
   beside the paper's numbers (:meth:`Table1Result.format_table`), written as JSON, CSV and figures
   (:func:`write_table1`).

One module per job: :mod:`~gmix_curvature.table1.presets` (a registry, one file per preset: ``tiny``, ``paper``,
``micro``, ``mnist1d``; the next benchmark is a new file there), :mod:`~gmix_curvature.table1.methods` (rows,
metrics, the paper's numbers), :mod:`~gmix_curvature.table1.runs`, :mod:`~gmix_curvature.table1.measure`,
:mod:`~gmix_curvature.table1.stats`, :mod:`~gmix_curvature.table1.summary`, :mod:`~gmix_curvature.table1.verdict`,
:mod:`~gmix_curvature.table1.records`, :mod:`~gmix_curvature.table1.tables`, :mod:`~gmix_curvature.table1.report`
and :mod:`~gmix_curvature.table1.plots`. Under ``torchrun`` every rank trains and measures (the estimators shard
the data and all-reduce); rank 0 writes.
"""

from __future__ import annotations

from gmix_curvature.table1.measure import matched_loss_trace, measure_run, stability_threshold, table1_data
from gmix_curvature.table1.methods import PAPER_TABLE1, TABLE1_METHODS, TABLE1_METRICS, Table1Method, Table1Metric
from gmix_curvature.table1.plots import plot_table1, plot_trace_vs_loss
from gmix_curvature.table1.presets import TABLE1_PRESETS, Table1Preset, table1_preset
from gmix_curvature.table1.records import KappaSelection, RunRecord, Table1Result, Table1Row, Table1Samples
from gmix_curvature.table1.report import load_table1, write_table1
from gmix_curvature.table1.runs import cpu_threads, run_table1, select_kappa
from gmix_curvature.table1.stats import (
    PairedDifference,
    holm,
    mean_std,
    min_detectable_difference,
    paired_difference,
    paired_t_power,
    welch_p_value,
)
from gmix_curvature.table1.summary import COMPARISONS, PAIRED_METRICS, PairedMetric, paired_comparisons, summarise
from gmix_curvature.table1.verdict import PAPER_CLAIMS, Claim, Verdict, judge, judge_claims

__all__ = [
    # rows, metrics, presets
    "Table1Method",
    "Table1Metric",
    "Table1Preset",
    "TABLE1_METHODS",
    "TABLE1_PRESETS",
    "TABLE1_METRICS",
    "PAPER_TABLE1",
    "table1_preset",
    # running
    "run_table1",
    "select_kappa",
    "cpu_threads",
    # measuring
    "stability_threshold",
    "measure_run",
    "matched_loss_trace",
    "table1_data",
    # statistics
    "welch_p_value",
    "mean_std",
    "paired_difference",
    "PairedDifference",
    "holm",
    "paired_t_power",
    "min_detectable_difference",
    "summarise",
    "paired_comparisons",
    "PairedMetric",
    "PAIRED_METRICS",
    "COMPARISONS",
    # verdict
    "Claim",
    "Verdict",
    "PAPER_CLAIMS",
    "judge",
    "judge_claims",
    # records
    "KappaSelection",
    "RunRecord",
    "Table1Row",
    "Table1Samples",
    "Table1Result",
    # output
    "write_table1",
    "load_table1",
    "plot_table1",
    "plot_trace_vs_loss",
]
