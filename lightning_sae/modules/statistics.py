"""What an SAE's training run measures about itself: dead latents, metrics, feature density.

One pass over the latents per step (:func:`~lightning_sae.metrics.active_counts`) feeds all of
it. The counts are summed over DDP ranks every step, so the dead-latent counters and the density
window are identical on every rank, need no collective to read, and resume exactly from a
checkpoint. Reconstruction metrics and L0 are torchmetrics that sync when computed.

"Dead" has one definition: a latent that fired on no token, on any rank, in the last
``dead_window_tokens`` tokens. It feeds AuxK and the logged ``dead_latent_rate``.
"""

import time

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_sae.distributed import all_reduce_sum, world_size
from lightning_sae.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    NormalizedMSE,
    active_counts,
)


def keep_metrics_float64(module: nn.Module) -> None:
    """Cast every torchmetrics state under ``module`` back to float64.

    A plain ``.to(bf16)`` (``precision="bf16-true"``) casts metric states and their defaults too,
    and sums of millions of bf16 terms are wrong.
    """
    for child in module.modules():
        if isinstance(child, Metric):
            child.set_dtype(torch.float64)


def evaluation_metrics(d_in: int, prefix: str) -> MetricCollection:
    """L0, explained variance and normalised MSE under ``prefix`` (``val/``, ``test/``)."""
    return MetricCollection(
        {"l0": L0(), "explained_variance": ExplainedVariance(d_in), "nmse": NormalizedMSE(d_in)},
        prefix=prefix,
    )


class TrainingStatistics(nn.Module):
    """Dead-latent counters, the logged training metrics and the feature-density window.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        dead_window_tokens: Window, in tokens over all ranks, of the dead-latent definition and of
            the feature density written to ``sparsity.safetensors``.

    """

    tokens_since_fired: Tensor
    feature_density: Tensor

    def __init__(self, d_in: int, d_sae: int, dead_window_tokens: int) -> None:
        super().__init__()
        self.dead_window_tokens = dead_window_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        #: Density of the last closed window: what the exporter writes.
        self.register_buffer("feature_density", torch.zeros(d_sae, dtype=torch.float64))
        # Updated with counts already summed over ranks: no sync when computed, and the same
        # (checkpointed) state on every rank.
        self.window = FeatureDensity(d_sae, sync_on_compute=False)
        self.window.persistent(True)
        self.reconstruction = MetricCollection(
            {"explained_variance": ExplainedVariance(d_in), "nmse": NormalizedMSE(d_in)},
            prefix="train/",
        )
        self.l0 = L0()
        #: Ranks that see the same batch (latent-parallel: the latent group's size); counts summed
        #: over ranks are divided by it. The reconstruction metrics are ratios of sums, unchanged.
        self.replicas = 1
        self.density_published = False
        self._last_logged_step = -1
        self._last_log_time: float | None = None
        self._tokens_since_log = 0

    @property
    def dead_latent_mask(self) -> Tensor:
        """Latents that fired on no token in the last ``dead_window_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_window_tokens

    @torch.no_grad()
    def update(self, sae_in: Tensor, sae_out: Tensor, feature_acts: Tensor) -> None:
        """Count one training batch: dead-latent counters, window, metrics.

        ``feature_acts`` may be dense or a sparse CSR tensor. Every rank calls this every step.
        """
        local = active_counts(feature_acts)
        replicas = self.replicas
        # [d_sae + 1]: per-latent firings, then tokens
        counts = all_reduce_sum(local) // replicas if world_size() > replicas else local
        self.tokens_since_fired.add_(counts[-1]).masked_fill_(counts[:-1] > 0, 0)
        self.window.update(active_counts=counts)
        self.l0.update(active_counts=local)
        self.reconstruction.update(sae_in, sae_out)
        self._tokens_since_log += sae_in.shape[0] * world_size() // replicas

    def inputs_finite(self) -> Tensor:
        """Whether every batch since the metrics' last logging step was finite (0-dim, on device).

        Reads the reconstruction metrics' float64 sum of squared inputs, which NaN or inf in any
        batch makes non-finite until the next reset (float32, bf16 and fp16 squares cannot
        overflow float64): the check costs no pass over the batch of its own.
        """
        return torch.isfinite(self.reconstruction["explained_variance"].sum_squared_x)

    def reset_logged_metrics(self) -> None:
        """Start the logged metrics' next window (reconstruction metrics and L0)."""
        self.reconstruction.reset()
        self.l0.reset()

    def values_to_log(self, step: int, log_every_n_steps: int) -> dict[str, Tensor]:
        """Metrics of the steps since the last logging step, on logging steps (else ``{}``).

        A collective under DDP: every rank calls it on every step. Under gradient accumulation
        the same ``step`` repeats; the metrics are computed once per step.
        """
        if (step + 1) % log_every_n_steps != 0 or step == self._last_logged_step:
            return {}
        self._last_logged_step = step
        values = {**self.reconstruction.compute(), "train/l0": self.l0.compute()}
        self.reset_logged_metrics()
        values["train/dead_latent_rate"] = self.dead_latent_mask.double().mean()
        now = time.perf_counter()
        if self._last_log_time is not None:
            elapsed = max(now - self._last_log_time, 1e-9)
            values["train/tokens_per_sec"] = torch.tensor(self._tokens_since_log / elapsed)
        self._last_log_time, self._tokens_since_log = now, 0
        return {name: value.float() for name, value in values.items()}

    def close_full_window(self) -> Tensor | None:
        """Publish the density window if it holds ``dead_window_tokens`` tokens (a host sync).

        Called on logging steps, so a window closes at the first logging step at or after its
        last token; its token count is summed over ranks, so every rank closes it together.
        """
        return self.publish_density() if self.window_tokens >= self.dead_window_tokens else None

    @property
    def window_tokens(self) -> int:
        """Tokens, over all ranks, in the open density window (reads the device)."""
        return int(self.window.tokens)

    def publish_density(self, close: bool = True) -> Tensor:
        """Copy the window's density to :attr:`feature_density` and return it.

        With ``close`` a new window starts. Without, the open window goes on accumulating (the
        end of a fit publishes it for the exporter, and a run resumed from a checkpoint taken
        after that fit continues the same window).
        """
        density = self.window.compute()
        if close:
            self.window.reset()
        self.feature_density.copy_(density)
        self.density_published = True
        return density
