"""What an SAE does to the language model, and what a run shows: evaluation, report, console.

- :class:`LMEvaluation`: CE loss recovered, KL score, L0 and explained variance of each SAE spliced
  into the language model on held-out tokens, logged during training (equal to sae-lens's
  ``run_evals`` on the export).
- :class:`HTMLReport`: one self-contained HTML file per run (curves, feature density,
  top-activating contexts).
- :class:`StepProgressBar`: a progress bar of optimisation steps with the SAE's figures.
- :func:`load_model_for_sae`: the model an export was trained on, as a ``HookedSAETransformer``.
"""

from lightning_sae.evaluation.callback import HTMLReport, LMEvaluation
from lightning_sae.evaluation.console import StepProgressBar
from lightning_sae.evaluation.lm import METRIC_NAMES, EvaluationSums, evaluation_sums
from lightning_sae.evaluation.models import load_model_for_sae
from lightning_sae.evaluation.report import render_report, top_activating_contexts

__all__ = [
    "METRIC_NAMES",
    "EvaluationSums",
    "HTMLReport",
    "LMEvaluation",
    "StepProgressBar",
    "evaluation_sums",
    "load_model_for_sae",
    "render_report",
    "top_activating_contexts",
]
