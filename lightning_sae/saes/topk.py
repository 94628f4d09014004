"""TopK SAE training with a sparse decoder and sparse gradients (sae-lens ``topk`` semantics).

:class:`SparseTopKTraining` is the training pass shared by the TopK family (TopK, BatchTopK,
Matryoshka BatchTopK); each class states only how it selects its latents, its nested levels and
its AuxK groups. The pass computes one dense encoder product without an autograd graph, selects
the active entries on it, and from there on touches the entries only (see
:mod:`lightning_sae.saes.kernels`): the decoder is an ``embedding_bag``, ``W_enc``'s gradient a
sum over the entries, AuxK's ``k_aux`` entries per token ride in the same two kernels.

It returns ``feature_acts`` as a sparse CSR tensor ``[B, d_sae]`` (explicit zeros where a
selected latent's activation is ``relu(·) = 0``; count with
:func:`lightning_sae.metrics.active_counts`) and ``hidden_pre`` as sae-lens does (dense, the
rescaled pre-activations), without gradient. The inputs ``sae_in`` receive no gradient.

The pass is exact sae-lens math — same loss terms, outputs and gradients up to float rounding
(``tests/saes/test_topk.py``) — including AuxK (``k_aux = d_in // 2``, scaled by
``min(n_dead / k_aux, 1)``) and ``rescale_acts_by_decoder_norm``. The only host read is AuxK's
number of dead latents (sae-lens reads it too): AuxK's work then scales with the dead latents.

>>> from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
>>> sae = FastTopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
>>> sae.cfg.architecture()
'topk'
"""

from typing import NamedTuple

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE
from torch import Tensor
from typing_extensions import override

from lightning_sae.saes.kernels import (
    Entries,
    NestedSquaredErrors,
    RowNorms,
    SampledEncoder,
    SparseDecode,
    dead_row_topk,
    entry_layout,
    runs_sae_lens_pass,
    sparse_csr,
    topk_entries,
)


class AuxEntries(NamedTuple):
    """One AuxK group: entries, loss scale and the level whose residual it reconstructs.

    ``min(k_aux, n_dead)`` entries per token; the scale is ``min(n_dead / k_aux, 1)``.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    scale: float
    level: int


class SparseTopKTraining:
    """Mixin: the sparse training pass of the TopK family, placed before a sae-lens TopK class.

    Subclasses define :meth:`select_entries` and may override :meth:`level_widths` (nested
    reconstructions, Matryoshka), :meth:`aux_groups` (AuxK per level) and
    :meth:`finish_sparse_pass`.
    """

    def select_entries(self, scores: Tensor) -> Entries:
        """Return the active entries of ``scores`` ``[B, d_sae]`` (sorted by row, then column)."""
        raise NotImplementedError

    def level_widths(self) -> list[int]:
        """Widths of the nested reconstructions; the last is ``d_sae`` (the SAE's output)."""
        return [self.cfg.d_sae]

    def aux_groups(self) -> list[tuple[int, int, int]]:
        """Return the AuxK groups ``(start, end, level)``.

        Dead latents of ``[start, end)`` reconstruct the residual of reconstruction ``level``.
        sae-lens's TopK: one group, the whole SAE against the SAE's output.
        """
        return [(0, self.cfg.d_sae, len(self.level_widths()) - 1)]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training pass, computed on the active entries only."""
        if runs_sae_lens_pass(self, step_input.sae_in):
            return super().training_forward_pass(step_input)  # type: ignore[misc]
        with torch.autocast(step_input.sae_in.device.type, enabled=False):
            output = self._sparse_training_pass(step_input)
        self.finish_sparse_pass(output)
        return output

    def finish_sparse_pass(self, output: TrainStepOutput) -> None:
        """Update training state from a finished sparse pass (BatchTopK's threshold EMA)."""

    def _sparse_training_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        cfg = self.cfg
        sae_in = step_input.sae_in
        x = sae_in.detach().to(self.dtype)
        batch, d_sae = x.shape[0], cfg.d_sae
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        x_centered = x - self.b_dec.detach() if b_dec is not None else x
        norm = RowNorms.apply(self.W_dec) if cfg.rescale_acts_by_decoder_norm else None

        with torch.no_grad():
            scores = torch.addmm(self.b_enc, x_centered, self.W_enc)
            if norm is not None:
                scores.mul_(norm)
            entries = self.select_entries(scores)
            widths = self.level_widths()
            n_levels = len(widths)
            bags = entries.rows
            if n_levels > 1:  # one bag per (token, level): entries are sorted by column
                bounds = torch.tensor(widths[:-1], device=x.device)
                bags = bags * n_levels + torch.bucketize(entries.cols, bounds, right=True)
            aux = self._aux_entries(scores, step_input.dead_neuron_mask)
            n_bags = batch * n_levels
            layout = entry_layout(
                [entries.rows, *(group.rows for group in aux)],
                [entries.cols, *(group.cols for group in aux)],
                [bags, *(group.rows + n_bags + index * batch for index, group in enumerate(aux))],
                n_bags + len(aux) * batch,
                d_sae,
            )

        values = torch.cat([entries.values, *(group.values for group in aux)])
        aux_scales = [group.scale for group in aux]
        aux_levels = [group.level for group in aux]
        # The layout and ``values`` hold the AuxK entries now: free the groups' own copies (AuxK
        # has ``d_in / 2`` entries per token, several times the ``k`` active ones).
        del aux
        pre = SampledEncoder.apply(values, x_centered, self.W_enc, self.b_enc, b_dec, norm, layout)
        n_main = entries.cols.shape[0]
        acts = pre[:n_main].relu()
        # sae-lens decodes feature_acts * (1 / ‖W_dec‖) (aux: its pre-activations, no ReLU).
        weights = torch.cat([acts, pre[n_main:]])
        if norm is not None:
            weights = weights * (1 / norm).index_select(0, layout.cols)
        decoded = SparseDecode.apply(weights, self.W_dec, layout)
        # sae-lens's mse_loss_fn (per-token squared-error sums, averaged) on each reconstruction.
        sae_out, errors = NestedSquaredErrors.apply(decoded, self.b_dec, x, n_levels, aux_levels)
        mse_loss = errors[n_levels - 1]
        # AuxK: dead latents reconstruct the detached residual of their level (without b_dec).
        aux_loss = errors.new_tensor(0.0)
        if aux_scales:
            scales = errors.new_tensor(aux_scales)
            aux_loss = self.cfg.aux_loss_coefficient * (scales * errors[n_levels:]).sum()
        losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss}
        loss = mse_loss + aux_loss
        for level, width in enumerate(widths[:-1]):
            losses[f"inner_mse_loss_{width}"] = errors[level]
            loss = loss + errors[level]
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=sparse_csr(entries, acts.detach(), d_sae),
            hidden_pre=scores,
            loss=loss,
            losses=losses,
        )

    def _aux_entries(self, scores: Tensor, dead: Tensor | None) -> list[AuxEntries]:
        """Select the entries of each AuxK group that has dead latents (none without a mask)."""
        if dead is None:
            return []
        k_aux = self.cfg.d_in // 2
        groups = []
        for start, end, level in self.aux_groups():
            rows, cols, values, n_dead = dead_row_topk(
                scores[:, start:end], dead[start:end], k_aux, column_offset=start
            )
            if n_dead:
                groups.append(AuxEntries(rows, cols, values, min(n_dead / k_aux, 1.0), level))
        return groups


class FastTopKTrainingSAE(SparseTopKTraining, TopKTrainingSAE):
    """sae-lens ``TopKTrainingSAE`` whose training pass is sparse (exactly ``k`` per token)."""

    @override
    def select_entries(self, scores: Tensor) -> Entries:
        """Per-token top-``k`` (``relu`` applies after selection, as in sae-lens)."""
        return topk_entries(scores, self.cfg.k)
