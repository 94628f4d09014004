"""One LightningModule per sae-lens architecture.

Each class only states its own hyper-parameters and how they map onto the sae-lens training config;
the math is the registered sae-lens ``TrainingSAE`` and the training loop is :class:`SAEModule`.
Hyper-parameter names follow sae-lens's config fields, so its documentation applies as written.

>>> from lightning_sae import BatchTopKSAE
>>> module = BatchTopKSAE(d_in=64, d_sae=512, k=16)
>>> module.sae.cfg.architecture()
'batchtopk'
"""

from itertools import pairwise
from typing import Any, ClassVar, Literal

from lightning_sae.modules.base import SAEModule


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")


def _check_k(k: float, d_sae: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= d_sae:
        raise ValueError(
            f"k must satisfy 0 < k <= d_sae ({d_sae}), got {k!r}: k is the number of active "
            "latents per token."
        )


class StandardSAE(SAEModule):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update).

    Loss = ‖x − x̂‖² + λ Σ f_i ‖W_dec,i‖; λ warms up over ``sparsity_warm_up_steps``.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l1_coefficient: λ, the sparsity penalty's weight (on normalised activations).
        lp_norm: The p of the penalty's p-norm (1 is L1).
        **kwargs: Training options of :class:`SAEModule` (``lr``, schedules, ...).

    """

    architecture = "standard"

    def __init__(
        self, d_in: int, d_sae: int, l1_coefficient: float = 5.0, lp_norm: float = 1.0, **kwargs
    ) -> None:
        _check_positive("l1_coefficient", l1_coefficient)
        _check_positive("lp_norm", lp_norm)
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Map λ, p and the warm-up onto sae-lens's ``StandardTrainingSAEConfig``."""
        hp = self.hparams
        return {
            "l1_coefficient": hp.l1_coefficient,
            "lp_norm": hp.lp_norm,
            "l1_warm_up_steps": hp.sparsity_warm_up_steps,
        }


class GatedSAE(SAEModule):
    """Gated SAE (Rajamanoharan et al. 2024): separate gate and magnitude paths.

    The gate decides *which* latents fire, the magnitude path *how much*; an L1 penalty acts on
    the gate, plus an auxiliary reconstruction through the gate.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l1_coefficient: Weight of the gate's (decoder-norm-weighted) L1 penalty.
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, l1_coefficient: float = 5.0, **kwargs) -> None:
        _check_positive("l1_coefficient", l1_coefficient)
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Map λ and the warm-up onto sae-lens's ``GatedTrainingSAEConfig``."""
        hp = self.hparams
        return {"l1_coefficient": hp.l1_coefficient, "l1_warm_up_steps": hp.sparsity_warm_up_steps}


class JumpReLUSAE(SAEModule):
    """JumpReLU SAE (Rajamanoharan et al. 2024) trained with an L0 penalty.

    Gradients reach the threshold through straight-through estimators; the threshold stays float32
    under any precision.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l0_coefficient: Weight of the L0 (or tanh/quadratic) sparsity penalty.
        jumprelu_bandwidth: Width ε of the rectangle kernel of the pseudo-derivatives.
        jumprelu_init_threshold: Initial threshold θ₀ of every latent.
        jumprelu_sparsity_loss_mode: ``step`` (DeepMind), ``tanh`` (Anthropic) or ``quadratic``.
        pre_act_loss_coefficient: Anthropic's pre-activation loss weight (``None`` disables it).
        target_l0: Target L0 of the ``quadratic`` mode (required by it, ignored otherwise).
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "jumprelu"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        l0_coefficient: float = 1.0,
        jumprelu_bandwidth: float = 0.05,
        jumprelu_init_threshold: float = 0.01,
        jumprelu_sparsity_loss_mode: Literal["step", "tanh", "quadratic"] = "step",
        pre_act_loss_coefficient: float | None = None,
        target_l0: float | None = None,
        **kwargs,
    ) -> None:
        _check_positive("l0_coefficient", l0_coefficient)
        _check_positive("jumprelu_bandwidth", jumprelu_bandwidth)
        _check_positive("jumprelu_init_threshold", jumprelu_init_threshold)
        if jumprelu_sparsity_loss_mode not in ("step", "tanh", "quadratic"):
            raise ValueError(
                "jumprelu_sparsity_loss_mode must be 'step', 'tanh' or 'quadratic', got "
                f"{jumprelu_sparsity_loss_mode!r}."
            )
        if jumprelu_sparsity_loss_mode == "quadratic" and target_l0 is None:
            raise ValueError("jumprelu_sparsity_loss_mode='quadratic' needs target_l0.")
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Map the JumpReLU options onto sae-lens's ``JumpReLUTrainingSAEConfig``."""
        hp = self.hparams
        return {
            "l0_coefficient": hp.l0_coefficient,
            "l0_warm_up_steps": hp.sparsity_warm_up_steps,
            "jumprelu_bandwidth": hp.jumprelu_bandwidth,
            "jumprelu_init_threshold": hp.jumprelu_init_threshold,
            "jumprelu_sparsity_loss_mode": hp.jumprelu_sparsity_loss_mode,
            "pre_act_loss_coefficient": hp.pre_act_loss_coefficient,
            "target_l0": hp.target_l0,
        }


class TopKSAE(SAEModule):
    """TopK SAE (Gao et al. 2024): exactly ``k`` latents per token, plus AuxK.

    AuxK makes dead latents (no firing in ``dead_window_tokens``) reconstruct the residual.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        k: Active latents per token.
        aux_loss_coefficient: Weight of the AuxK loss.
        rescale_acts_by_decoder_norm: Rank latents by ``hidden_pre * ‖W_dec,i‖`` (sae-lens's
            default; the norm is folded into the weights on export).
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "topk"
    #: Whether ``k`` must be a whole number (per-token top-k) or may be fractional (batch top-k).
    integer_k: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int = 32,
        aux_loss_coefficient: float = 1.0,
        rescale_acts_by_decoder_norm: bool = True,
        **kwargs,
    ) -> None:
        if self.integer_k and isinstance(k, float) and not k.is_integer():
            raise ValueError(f"TopKSAE needs an integer k, got {k!r}; BatchTopKSAE takes floats.")
        _check_k(k, d_sae)
        if aux_loss_coefficient < 0:
            raise ValueError(f"aux_loss_coefficient must be >= 0, got {aux_loss_coefficient!r}.")
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Map k and AuxK onto sae-lens's TopK training config."""
        hp = self.hparams
        return {
            "k": hp.k,
            "aux_loss_coefficient": hp.aux_loss_coefficient,
            "rescale_acts_by_decoder_norm": hp.rescale_acts_by_decoder_norm,
        }


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann, Leask, Nanda 2024): the top ``B·k`` activations of a batch.

    For a batch of ``B`` tokens L0 averages ``k`` but varies per token. Exports as a JumpReLU SAE.

    Under DDP the top-k is taken per rank (over that rank's batch), the cheap choice that needs no
    collective in the forward pass; ``R`` ranks of ``B`` tokens keep ``R·B·k`` activations as one
    process would, but not necessarily the same ones. The threshold EMA is averaged over ranks
    after every step, so it is identical everywhere.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        k: Mean active latents per token (may be fractional).
        aux_loss_coefficient: Weight of the AuxK loss.
        rescale_acts_by_decoder_norm: Rank latents by ``hidden_pre * ‖W_dec,i‖``.
        topk_threshold_lr: Rate of sae-lens's EMA of the smallest kept activation.
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "batchtopk"
    integer_k = False

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: float = 32,
        aux_loss_coefficient: float = 1.0,
        rescale_acts_by_decoder_norm: bool = True,
        topk_threshold_lr: float = 0.01,
        **kwargs,
    ) -> None:
        if not 0 < topk_threshold_lr <= 1:
            raise ValueError(f"topk_threshold_lr must be in (0, 1], got {topk_threshold_lr!r}.")
        super().__init__(
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            aux_loss_coefficient=aux_loss_coefficient,
            rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm,
            **kwargs,
        )

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Add the threshold EMA rate to the TopK fields."""
        return {**super().sae_config_kwargs(), "topk_threshold_lr": self.hparams.topk_threshold_lr}

    def synchronize_sae_state(self) -> None:
        """Average the threshold EMA (updated from each rank's own batch) over ranks."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size > 1:
            threshold = self.sae.topk_threshold
            self.sae.topk_threshold = self._all_reduce_sum(threshold) / world_size


def _default_matryoshka_widths(d_sae: int) -> list[int]:
    return sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

    BatchTopK plus the reconstruction losses of nested prefixes of the dictionary, which curbs
    feature absorption.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        k: Mean active latents per token.
        matryoshka_widths: Strictly increasing prefix widths ending at ``d_sae``; ``None`` uses
            ``[d_sae/8, d_sae/4, d_sae/2, d_sae]``.
        use_matryoshka_aux_loss: Dead latents reconstruct their own level's residual (slower).
        **kwargs: Other BatchTopK and :class:`SAEModule` options.

    """

    architecture = "matryoshka_batchtopk"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: float = 32,
        matryoshka_widths: list[int] | None = None,
        use_matryoshka_aux_loss: bool = False,
        **kwargs,
    ) -> None:
        if matryoshka_widths is not None:
            widths = list(matryoshka_widths)
            if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
                raise ValueError(
                    f"matryoshka_widths must be a non-empty list of positive ints, got {widths!r}."
                )
            if any(a >= b for a, b in pairwise(widths)):
                raise ValueError(f"matryoshka_widths must be strictly increasing, got {widths!r}.")
            if widths[-1] != d_sae:
                raise ValueError(
                    f"matryoshka_widths must end at d_sae ({d_sae}), got {widths!r}: the last "
                    "level is the whole dictionary."
                )
        super().__init__(d_in=d_in, d_sae=d_sae, k=k, **kwargs)

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Add the nested widths to the BatchTopK fields."""
        hp = self.hparams
        widths = hp.matryoshka_widths or _default_matryoshka_widths(hp.d_sae)
        return {
            **super().sae_config_kwargs(),
            "matryoshka_widths": list(widths),
            "use_matryoshka_aux_loss": hp.use_matryoshka_aux_loss,
        }
