"""Standard (ReLU + L1) SAE training: one encoder product, then dense or sparse by density.

sae-lens's ``StandardTrainingSAE`` math (decoder-norm-weighted ``lp_norm`` penalty). The encoder
product's backward skips the input gradient (:class:`~lightning_sae.saes.kernels.DenseEncoder`).
When at most ``sparse_density_limit`` of the latents fire (and ``lp_norm`` is 1), the decoder,
the penalty and every gradient run on the active entries only, as in the TopK family; else the
decoder is dense. The density is read on the host (free on CPU; on CUDA one synchronisation).

``feature_acts`` is dense on the dense path and a CSR tensor on the sparse one; ``hidden_pre`` is
returned without gradient, and the inputs ``sae_in`` receive none.

>>> from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
>>> sae = FastStandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=32))
>>> sae.cfg.architecture()
'standard'
"""

from typing import ClassVar

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardTrainingSAE
from torch import Tensor
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


def active_fraction(pre: Tensor) -> float:
    """Fraction of positive entries of ``pre`` (read on the host)."""
    return int(torch.count_nonzero(pre > 0)) / pre.numel()  # a bool sum widens to int64


class FastStandardTrainingSAE(StandardTrainingSAE):
    """sae-lens ``StandardTrainingSAE`` with a fused pass and a sparse one for sparse latents."""

    #: Largest fraction of active latents for which the sparse pass is used (measured crossover
    #: ~0.18 at d_sae 8192 and ~0.1 at 32768, ``benchmarks/bench_step.py``).
    sparse_density_limit: ClassVar[float] = 0.1

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training pass, dense or sparse by the fraction of active latents."""
        if runs_sae_lens_pass(self, step_input.sae_in):
            return super().training_forward_pass(step_input)
        with torch.autocast(step_input.sae_in.device.type, enabled=False):
            return self._fast_pass(step_input)

    def _fast_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        cfg = self.cfg
        sae_in = step_input.sae_in
        x = sae_in.detach().to(self.dtype)
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        x_centered = x - self.b_dec.detach() if b_dec is not None else x
        hidden_pre = DenseEncoder.apply(x_centered, self.W_enc, self.b_enc, b_dec)
        coefficient = step_input.coefficients["l1"]
        norm = self.W_dec.norm(dim=1)
        batch = x.shape[0]
        sparse = cfg.lp_norm == 1 and active_fraction(hidden_pre) <= self.sparse_density_limit
        if sparse:
            with torch.no_grad():
                entries = positive_entries(hidden_pre)
                layout = entry_layout(entries.rows, entries.cols, entries.rows, batch, cfg.d_sae)
            acts = SampledEncoder.apply(
                entries.values, x_centered, self.W_enc, self.b_enc, b_dec, None, layout
            )
            sae_out = SparseDecode.apply(acts, self.W_dec, layout) + self.b_dec
            l1_loss = coefficient * (acts * norm[entries.cols]).sum() / batch
            feature_acts = sparse_csr(entries, acts.detach(), cfg.d_sae)
        else:
            acts = hidden_pre.relu()
            sae_out = acts @ self.W_dec + self.b_dec
            if cfg.lp_norm == 1:
                l1_loss = coefficient * (acts @ norm).mean()
            else:
                sparsity = (acts * norm).norm(p=cfg.lp_norm, dim=-1)
                l1_loss = (coefficient * sparsity).mean()
            feature_acts = acts.detach()
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre.detach(),
            loss=mse_loss + l1_loss,
            losses={"mse_loss": mse_loss, "l1_loss": l1_loss},
        )
