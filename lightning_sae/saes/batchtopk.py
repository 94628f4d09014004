"""BatchTopK SAE training with an exact, cheap batch top-k and the TopK family's sparse pass.

sae-lens takes a top-``B·k`` over all ``B·d_sae`` activations of the batch (one ``topk`` over the
flattened matrix, ~10 times a per-row one). When at least ``B·k`` (and at most 8·``B·k``) entries
reach the previous batch's cut-off lowered by 10%, one top-k among them is exact. Otherwise we take
each token's top ``2·k`` candidates, select the ``B·k`` largest among those, and prove the result
exact: a token whose smallest candidate still made the cut (and is positive) may hide more winners,
so it lists every entry at or above that cut-off and the selection runs once more (see
:func:`lightning_sae.saes.kernels.batch_topk_entries`).

The threshold EMA (``topk_threshold``, float64) follows sae-lens's update exactly — the smallest
positive kept activation, ``θ ← (1 − lr)·θ + lr·min`` — without a host read: a batch without a
positive activation leaves it unchanged, as in sae-lens.

>>> from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
>>> sae = FastBatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
>>> sae.cfg.get_inference_config_class().architecture()
'jumprelu'
"""

import math
from typing import ClassVar

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.sae import TrainStepOutput
from torch import Tensor
from typing_extensions import override

from lightning_sae.saes.kernels import Entries, batch_topk_entries
from lightning_sae.saes.topk import SparseTopKTraining


class FastBatchTopKTrainingSAE(SparseTopKTraining, BatchTopKTrainingSAE):
    """sae-lens ``BatchTopKTrainingSAE`` whose training pass is sparse; exports as ``jumprelu``."""

    #: Buffers the module averages over DDP ranks after every training pass.
    rank_averaged_state: ClassVar[tuple[str, ...]] = ("topk_threshold",)
    #: First-round candidates per token, as a multiple of ``k``.
    candidates_per_k: ClassVar[int] = 2
    #: The hint for the next batch's cut-off: this batch's, lowered by this factor.
    cut_off_hint_margin: ClassVar[float] = 0.9
    cut_off_hint: Tensor

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A speed hint only (the selection is exact without it): never saved, never exported.
        self.register_buffer(
            "cut_off_hint", torch.zeros((), device=self.W_dec.device), persistent=False
        )

    @override
    def select_entries(self, scores: Tensor) -> Entries:
        """Select the top ``int(k·B)`` entries of ``relu(scores)`` over the whole batch.

        The previous batch's cut-off, lowered by ``cut_off_hint_margin``, is the selection's
        hint (:func:`~lightning_sae.saes.kernels.batch_topk_entries`).
        """
        total = int(self.cfg.k * scores.shape[0])
        entries = batch_topk_entries(
            scores,
            total,
            self.candidates_per_k * math.ceil(self.cfg.k),
            self.cut_off_hint.to(scores.dtype) * self.cut_off_hint_margin,
        )
        if entries.values.numel():
            self.cut_off_hint.copy_(entries.values.detach().amin())
        return entries

    @override
    @torch.no_grad()
    def finish_sparse_pass(self, output: TrainStepOutput) -> None:
        """sae-lens's EMA of the smallest positive kept activation, with no host read."""
        values = output.feature_acts.values()
        positive = torch.where(values > 0, values, torch.inf)
        smallest = torch.cat([positive, positive.new_full((1,), torch.inf)]).amin()
        lr = self.cfg.topk_threshold_lr
        threshold = self.topk_threshold
        updated = (1 - lr) * threshold + lr * smallest.to(threshold.dtype)
        threshold.copy_(torch.where(smallest.isfinite(), updated, threshold))
        output.metrics["topk_threshold"] = threshold
