"""What an SAE does to the language model: splice it in at its hook and compare next-token losses.

The definitions are sae-lens's ``run_evals`` (``get_recons_loss`` and
``get_sparsity_and_variance_metrics``), which a test checks this module against on the exported
SAE, the same model and the same tokens:

- **CE loss** (clean, with the SAE, zero-ablated): mean next-token cross-entropy over every
  position whose *input* token is not special (BOS/EOS/PAD/SEP); the SAE replaces the activation
  at non-special positions only, zero-ablation zeroes every position.
- **Delta LM loss** = CE with SAE − CE clean; **CE loss recovered** = (CE zero − CE SAE) /
  (CE zero − CE clean) (sae-lens's ``ce_loss_score``).
- **KL divergence** KL(p_clean ‖ p_new) per non-special position, with the SAE and zero-ablated;
  **KL score** = (KL zero − KL SAE) / KL zero.
- **L0** (mean active latents per token) and **explained variance** 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²
  over the non-special tokens' activations.

Everything is accumulated as float64 sums (:class:`EvaluationSums`), so batches and DDP ranks
combine exactly: split the token rows over ranks, :meth:`EvaluationSums.all_reduce`, then read
:meth:`EvaluationSums.metrics`. Each SAE is spliced in alone (one extra forward per hook per
batch); the zero-ablated forward does not depend on the SAE, so a caller evaluating the same rows
again can skip it (``zero_ablation=False``) and reuse the first sums
(:meth:`EvaluationSums.with_zero_ablation_of`).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookedRootModule

from lightning_sae.data.models import HookedModel
from lightning_sae.distributed import all_reduce_sum
from lightning_sae.metrics import active_counts

#: Scalar sums kept per hook, in this order, before the ``d_in`` sum of activations.
_FIELDS = (
    "n_ce",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "n_kl",
    "kl_sae",
    "kl_zero",
    "n_tokens",
    "l0",
    "squared_error",
    "squared_norm",
)
_F64 = torch.float64
#: Metric names, as logged (``eval/<name>``).
METRIC_NAMES = (
    "ce_loss_clean",
    "ce_loss_with_sae",
    "ce_loss_zero_ablated",
    "delta_lm_loss",
    "ce_loss_recovered",
    "kl_div_with_sae",
    "kl_div_zero_ablated",
    "kl_score",
    "l0",
    "explained_variance",
)


@dataclass
class EvaluationSums:
    """Float64 sums over evaluated tokens, per hook: ``{hook: [len(_FIELDS) + d_in]}``."""

    sums: dict[str, Tensor]

    def field(self, hook: str, name: str) -> float:
        """One scalar sum of ``hook``."""
        return float(self.sums[hook][_FIELDS.index(name)])

    def all_reduce(self) -> "EvaluationSums":
        """Sum over DDP ranks (one collective for every hook; identity in one process)."""
        hooks = list(self.sums)
        flat = all_reduce_sum(torch.cat([self.sums[hook] for hook in hooks]))
        sizes = [self.sums[hook].numel() for hook in hooks]
        return EvaluationSums(dict(zip(hooks, flat.split(sizes), strict=True)))

    def with_zero_ablation_of(self, other: "EvaluationSums") -> "EvaluationSums":
        """Return these sums with the zero-ablation sums of ``other`` (the same rows)."""
        index = [_FIELDS.index("ce_zero"), _FIELDS.index("kl_zero")]
        sums = {hook: value.clone() for hook, value in self.sums.items()}
        for hook, value in sums.items():
            value[index] = other.sums[hook][index]
        return EvaluationSums(sums)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Return ``{hook: {metric: value}}`` (:data:`METRIC_NAMES`); NaN if nothing was seen."""
        return {hook: self._hook_metrics(hook) for hook in self.sums}

    def _hook_metrics(self, hook: str) -> dict[str, float]:
        value = self.sums[hook]
        s = dict(zip(_FIELDS, value[: len(_FIELDS)].tolist(), strict=True))
        sum_x = value[len(_FIELDS) :]
        nan = float("nan")

        def ratio(a: float, b: float) -> float:
            return a / b if b else nan

        clean, sae = ratio(s["ce_clean"], s["n_ce"]), ratio(s["ce_sae"], s["n_ce"])
        zero = ratio(s["ce_zero"], s["n_ce"])
        kl_sae, kl_zero = ratio(s["kl_sae"], s["n_kl"]), ratio(s["kl_zero"], s["n_kl"])
        n = s["n_tokens"]
        # sae-lens's ExplainedVarianceCalculator: 1 - E‖x - x̂‖² / (E‖x‖² - ‖E x‖²).
        variance = ratio(s["squared_norm"], n) - float((sum_x / n).square().sum()) if n else nan
        return {
            "ce_loss_clean": clean,
            "ce_loss_with_sae": sae,
            "ce_loss_zero_ablated": zero,
            "delta_lm_loss": sae - clean,
            "ce_loss_recovered": ratio(zero - sae, zero - clean),
            "kl_div_with_sae": kl_sae,
            "kl_div_zero_ablated": kl_zero,
            "kl_score": ratio(kl_zero - kl_sae, kl_zero),
            "l0": ratio(s["l0"], n),
            "explained_variance": 1.0 - ratio(ratio(s["squared_error"], n), variance),
        }


@torch.no_grad()
def evaluation_sums(
    hooked: HookedModel,
    saes: Mapping[str, nn.Module],
    tokens: Tensor,
    batch_rows: int = 4,
    zero_ablation: bool = True,
) -> EvaluationSums:
    """Splice each SAE into the model at its hook on ``tokens`` and sum what the metrics need.

    Args:
        hooked: The language model; ``saes``'s keys are among its hooks. Positions of its
            tokenizer's special tokens are excluded (and never replaced).
        saes: ``{hook_name: SAE}``, modules with ``encode``/``decode`` on the hook's activations
            in raw units (per-head hooks flattened to ``heads * d_head``): an SAE module, or an
            sae-lens ``SAE``.
        tokens: Token ids ``[rows, context]`` (this rank's share; may be empty).
        batch_rows: Rows per forward pass (bounds the ``[rows, context, vocab]`` logits).
        zero_ablation: Also run the zero-ablated forward of every hook.

    """
    model, device = hooked.model, hooked.device
    hooks = list(saes)
    sums = {h: torch.zeros(len(_FIELDS) + hooked.d_in[h], dtype=_F64, device=device) for h in hooks}
    special = torch.tensor(hooked.special_token_ids(), dtype=torch.long, device=device)
    # No forward at all on an empty share (a DDP rank with no row): Hugging Face models refuse
    # an empty batch, and the rank must still reach the all-reduce.
    for start in range(0, tokens.shape[0], batch_rows):
        rows = tokens[start : start + batch_rows].to(device)
        keep = ~torch.isin(rows, special)
        clean = F.log_softmax(model(rows, return_type="logits").float(), dim=-1)
        ce_clean = _masked_sum(_next_token_loss(clean, rows), keep[:, :-1])
        for hook in hooks:
            splice = _Splice(saes[hook], keep)
            with_sae = _log_probs(model, rows, [(hook, splice)])
            values = {
                "n_ce": keep[:, :-1].sum(),
                "ce_clean": ce_clean,
                "ce_sae": _masked_sum(_next_token_loss(with_sae, rows), keep[:, :-1]),
                "n_kl": keep.sum(),
                "kl_sae": _masked_sum(_kl(clean, with_sae), keep),
                **splice.statistics,
            }
            if zero_ablation:
                zeroed = _log_probs(model, rows, [(hook, _zero)])
                values["ce_zero"] = _masked_sum(_next_token_loss(zeroed, rows), keep[:, :-1])
                values["kl_zero"] = _masked_sum(_kl(clean, zeroed), keep)
            scalars = torch.stack(
                [
                    torch.as_tensor(values.get(name, 0.0), dtype=_F64, device=device)
                    for name in _FIELDS
                ]
            )
            sums[hook] += torch.cat([scalars, splice.sum_x])
    return EvaluationSums(sums)


class _Splice:
    """Forward hook replacing the activation by the SAE's reconstruction at non-special positions.

    It also keeps the sums of the SAE on those activations (L0, squared error and norm, the sum
    of the activations): they are the clean activations, as upstream of the hook nothing changed.
    """

    def __init__(self, sae: nn.Module, keep: Tensor) -> None:
        self.sae, self.keep = sae, keep

    def __call__(self, activations: Tensor, hook: Any) -> Tensor:
        flat = activations.flatten(2)
        x = flat[self.keep]
        parameter = next(self.sae.parameters())
        feature_acts = self.sae.encode(x.to(parameter.device, parameter.dtype))
        x_hat = self.sae.decode(feature_acts).to(x.device, x.dtype)
        x64, error = x.to(_F64), (x - x_hat).to(_F64)
        self.statistics = {
            "n_tokens": x.shape[0],
            "l0": active_counts(feature_acts)[:-1].sum(),
            "squared_error": error.square().sum(),
            "squared_norm": x64.square().sum(),
        }
        self.sum_x = x64.sum(0)
        out = flat.clone()
        out[self.keep] = x_hat
        return out.reshape(activations.shape)


def _zero(activations: Tensor, hook: Any) -> Tensor:
    return torch.zeros_like(activations)


def _log_probs(model: HookedRootModule, rows: Tensor, fwd_hooks: list[tuple[str, Any]]) -> Tensor:
    logits = model.run_with_hooks(rows, return_type="logits", fwd_hooks=fwd_hooks)
    return F.log_softmax(logits.float(), dim=-1)


def _next_token_loss(log_probs: Tensor, rows: Tensor) -> Tensor:
    """Cross-entropy ``[rows, context - 1]`` of each next token (as transformer-lens's loss)."""
    return -log_probs[:, :-1].gather(-1, rows[:, 1:, None]).squeeze(-1)


def _kl(clean: Tensor, new: Tensor) -> Tensor:
    """KL(p_clean ‖ p_new) per position ``[rows, context]``, from log-probabilities."""
    return F.kl_div(new, clean, reduction="none", log_target=True).sum(-1)


def _masked_sum(values: Tensor, keep: Tensor) -> Tensor:
    return values.to(_F64)[keep].sum()
