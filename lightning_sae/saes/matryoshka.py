"""Matryoshka BatchTopK SAE training on the TopK family's sparse pass.

The nested reconstructions of sae-lens's ``MatryoshkaBatchTopKTrainingSAE`` (one per prefix width
of the dictionary) come from one ``embedding_bag`` with one bag per (token, level) — each active
latent is decoded once — and a cumulative sum over the levels. ``use_matryoshka_aux_loss`` gives
each level its own AuxK group, reconstructing that level's residual, as sae-lens does.

>>> from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
>>> cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, matryoshka_widths=[8, 32])
>>> FastMatryoshkaBatchTopKTrainingSAE(cfg).level_widths()
[8, 32]
"""

from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE
from typing_extensions import override

from lightning_sae.saes.batchtopk import FastBatchTopKTrainingSAE


class FastMatryoshkaBatchTopKTrainingSAE(FastBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE):
    """sae-lens ``MatryoshkaBatchTopKTrainingSAE`` whose training pass is sparse."""

    @override
    def level_widths(self) -> list[int]:
        """sae-lens's ``matryoshka_widths`` (validated by it to end at ``d_sae``)."""
        return list(self.cfg.matryoshka_widths)

    @override
    def aux_groups(self) -> list[tuple[int, int, int]]:
        """One AuxK group per level with ``use_matryoshka_aux_loss``, else the whole SAE."""
        if not self.cfg.use_matryoshka_aux_loss:
            return super().aux_groups()
        widths = self.level_widths()
        starts = [0, *widths[:-1]]
        return [
            (start, end, level)
            for level, (start, end) in enumerate(zip(starts, widths, strict=True))
        ]
