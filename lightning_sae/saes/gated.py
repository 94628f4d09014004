"""Gated SAE training: one shared encoder product, dense or sparse decoders by gate density.

sae-lens's ``GatedTrainingSAE`` computes ``x @ W_enc`` for the gate, ``x @ (W_enc·exp(r_mag))``
for the magnitudes and again ``x @ W_enc`` for its auxiliary loss; here one product ``P`` serves
all three (``gate = P + b_gate``, ``magnitude = P·exp(r_mag) + b_mag``: the same math, other
rounding), and its backward skips the input gradient. When at most ``sparse_density_limit`` of
the gates are open, both decoders (the SAE's and the auxiliary one through ``relu(gate)``), the
penalty and every gradient run on the open gates only, in one ``embedding_bag``; else they are
dense. The density is read on the host (free on CPU; on CUDA one synchronisation).
``feature_acts`` is then a CSR tensor; ``hidden_pre`` (the magnitude pre-activations) is returned
without gradient, and the inputs ``sae_in`` receive none.

>>> from sae_lens.saes.gated_sae import GatedTrainingSAEConfig
>>> sae = FastGatedTrainingSAE(GatedTrainingSAEConfig(d_in=8, d_sae=32))
>>> sae.cfg.architecture()
'gated'
"""

from typing import ClassVar

import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from typing_extensions import override

from lightning_sae.saes.kernels import (
    DenseEncoder,
    SampledEncoder,
    SparseDecode,
    entry_layout,
    positive_entries,
    runs_sae_lens_pass,
    sparse_csr,
)
from lightning_sae.saes.standard import active_fraction


class FastGatedTrainingSAE(GatedTrainingSAE):
    """sae-lens ``GatedTrainingSAE`` with one encoder product and sparse decoders when sparse."""

    #: Largest fraction of open gates for which the sparse pass is used (measured crossover,
    #: ``benchmarks/bench_step.py``).
    sparse_density_limit: ClassVar[float] = 0.075

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training pass, dense or sparse by the fraction of open gates."""
        if runs_sae_lens_pass(self, step_input.sae_in):
            return super().training_forward_pass(step_input)
        with torch.autocast(step_input.sae_in.device.type, enabled=False):
            return self._fast_pass(step_input)

    def _fast_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        cfg = self.cfg
        sae_in = step_input.sae_in
        x = sae_in.detach().to(self.dtype)
        batch = x.shape[0]
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        x_centered = x - self.b_dec.detach() if b_dec is not None else x
        scale = self.r_mag.exp()
        norm = self.W_dec.norm(dim=1)
        coefficient = step_input.coefficients["l1"]
        product = DenseEncoder.apply(x_centered, self.W_enc, None, b_dec)
        gate = product + self.b_gate
        if active_fraction(gate) <= self.sparse_density_limit:
            with torch.no_grad():
                entries = positive_entries(gate)
                rows, cols = entries.rows, entries.cols
                # Each open gate twice: bags [0, B) decode the SAE, [B, 2B) the auxiliary path.
                layout = entry_layout(
                    rows.repeat(2),
                    cols.repeat(2),
                    torch.cat([rows, rows + batch]),
                    2 * batch,
                    cfg.d_sae,
                )
                # The product is not needed any more: it becomes the magnitude pre-activations.
                hidden_pre = product.detach().mul_(scale).add_(self.b_mag)
            pre = SampledEncoder.apply(
                entries.values.repeat(2), x_centered, self.W_enc, self.b_gate, b_dec, None, layout
            )
            n = cols.shape[0]
            gate_acts = pre[:n]
            magnitude = (pre[n:] - self.b_gate[cols]) * scale[cols] + self.b_mag[cols]
            acts = magnitude.relu()
            decoded = SparseDecode.apply(torch.cat([acts, gate_acts]), self.W_dec, layout)
            sae_out = decoded[:batch] + self.b_dec
            via_gate = decoded[batch:] + self.b_dec
            l1_loss = coefficient * (gate_acts * norm[cols]).sum() / batch
            feature_acts = sparse_csr(entries, acts.detach(), cfg.d_sae)
        else:
            hidden_pre = torch.addcmul(self.b_mag, product, scale)
            acts = torch.where(gate > 0, hidden_pre.relu(), 0.0)
            gate_acts = gate.relu()
            sae_out = acts @ self.W_dec + self.b_dec
            via_gate = gate_acts @ self.W_dec + self.b_dec
            l1_loss = coefficient * (gate_acts @ norm).mean()
            feature_acts = acts.detach()
            hidden_pre = hidden_pre.detach()
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        aux_loss = (via_gate - sae_in).pow(2).sum(dim=-1).mean()
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=mse_loss + l1_loss + aux_loss,
            losses={
                "mse_loss": mse_loss,
                "l1_loss": l1_loss,
                "auxiliary_reconstruction_loss": aux_loss,
            },
        )
