"""The TopK family: ``TopKSAE``, ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE``.

>>> from lightning_sae import BatchTopKSAE
>>> BatchTopKSAE(d_in=64, d_sae=512, k=16).sae.cfg.architecture()
'batchtopk'
"""

from collections.abc import Mapping
from itertools import pairwise
from typing import Any, ClassVar

from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.validation import check_k
from lightning_sae.saes.batchtopk import FastBatchTopKTrainingSAE
from lightning_sae.saes.matryoshka import FastMatryoshkaBatchTopKTrainingSAE
from lightning_sae.saes.topk import FastTopKTrainingSAE


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
    training_sae_class = FastTopKTrainingSAE
    sae_config_fields: ClassVar[dict[str, str]] = {
        **SAEModule.sae_config_fields,
        "k": "k",
        "aux_loss_coefficient": "aux_loss_coefficient",
        "rescale_acts_by_decoder_norm": "rescale_acts_by_decoder_norm",
    }
    #: Whether ``k`` must be a whole number (per-token top-k) or may be fractional (batch top-k).
    integer_k: ClassVar[bool] = True
    structural_hparams = (*SAEModule.structural_hparams, "k", "rescale_acts_by_decoder_norm")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int = 32,
        aux_loss_coefficient: float = 1.0,
        rescale_acts_by_decoder_norm: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Add: ``0 < k <= d_sae``, a non-negative AuxK weight."""
        super().validate_hparams(hp)
        check_k(hp["k"], hp["d_sae"], cls.integer_k)
        if hp["aux_loss_coefficient"] < 0:
            raise ValueError(
                f"aux_loss_coefficient must be >= 0, got {hp['aux_loss_coefficient']!r}."
            )


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
    training_sae_class = FastBatchTopKTrainingSAE
    sae_config_fields: ClassVar[dict[str, str]] = {
        **TopKSAE.sae_config_fields,
        "topk_threshold_lr": "topk_threshold_lr",
    }
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
        super().__init__(
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            aux_loss_coefficient=aux_loss_coefficient,
            rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm,
            **kwargs,
        )

    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Add: the threshold EMA rate is in (0, 1]."""
        super().validate_hparams(hp)
        if not 0 < hp["topk_threshold_lr"] <= 1:
            raise ValueError(
                f"topk_threshold_lr must be in (0, 1], got {hp['topk_threshold_lr']!r}."
            )


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
    training_sae_class = FastMatryoshkaBatchTopKTrainingSAE
    structural_hparams = (*BatchTopKSAE.structural_hparams, "matryoshka_widths")
    sae_config_fields: ClassVar[dict[str, str]] = {
        **BatchTopKSAE.sae_config_fields,
        "matryoshka_widths": "matryoshka_widths",
        "use_matryoshka_aux_loss": "use_matryoshka_aux_loss",
    }

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: float = 32,
        matryoshka_widths: list[int] | None = None,
        use_matryoshka_aux_loss: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(d_in=d_in, d_sae=d_sae, k=k, **kwargs)

    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Add: widths are positive, strictly increasing and end at ``d_sae``."""
        super().validate_hparams(hp)
        if hp["matryoshka_widths"] is None:
            return
        widths, d_sae = list(hp["matryoshka_widths"]), hp["d_sae"]
        if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(
                f"matryoshka_widths must be a non-empty list of positive ints, got {widths!r}."
            )
        if any(a >= b for a, b in pairwise(widths)):
            raise ValueError(f"matryoshka_widths must be strictly increasing, got {widths!r}.")
        if widths[-1] != d_sae:
            raise ValueError(
                f"matryoshka_widths must end at d_sae ({d_sae}), got {widths!r}: the last level "
                "is the whole dictionary."
            )

    @classmethod
    def sae_config_kwargs(cls, hp: Mapping[str, Any]) -> dict[str, Any]:
        """Fill the default nested widths."""
        kwargs = super().sae_config_kwargs(hp)
        kwargs["matryoshka_widths"] = list(
            hp["matryoshka_widths"] or _default_matryoshka_widths(hp["d_sae"])
        )
        return kwargs
