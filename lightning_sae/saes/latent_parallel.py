"""Latent-parallel training pass of TopK and BatchTopK: each rank holds a slice of the latents.

Rank ``r`` of a latent group of ``N`` ranks holds latents ``[r·d, (r + 1)·d)`` with
``d = d_sae / N``: ``W_enc``'s columns, ``b_enc`` and ``W_dec``'s rows, as ``DTensor`` shards
(``b_dec`` is replicated). Every rank of the group trains on the same batch. One step:

1. each rank computes its scores ``[B, d]`` (no ``[B, d_sae]`` matrix anywhere) and its own
   candidates — TopK: each token's top ``k``; BatchTopK: each token's top ``2k`` with the
   exactness floors of :func:`~lightning_sae.saes.kernels.select_batch_topk`;
2. the candidates are all-gathered and every rank selects the same global winners
   (:func:`~lightning_sae.saes.kernels.merge_row_topk`, ``select_batch_topk``; a BatchTopK
   token whose shard may hide winners gets 4× more candidates from that shard and the
   selection repeats, so the result is the exact batch top-k); AuxK gathers each token's top
   ``k_aux`` dead latents the same way;
3. each rank decodes its own winners and the reconstructions (main and AuxK) are summed over
   the group: the only collective on ``[B, d_in]`` tensors.

Gradients are exact: a latent's gradient only involves its own entries; ``b_dec``'s encoder
part is summed over the group in the backward pass (its reconstruction part is already the
same everywhere). ``feature_acts`` is the full ``[B, d_sae]`` sparse CSR tensor of all winners,
identical on every rank of the group, so the statistics and metrics need no change.
"""

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_sae.saes.batchtopk import FastBatchTopKTrainingSAE
from lightning_sae.saes.kernels import (
    Candidates,
    SampledEncoder,
    SparseDecode,
    dead_row_topk,
    entry_layout,
    extend_candidates,
    merge_row_topk,
    row_candidates,
    row_topk,
    select_batch_topk,
    sort_entries,
    sparse_csr,
)
from lightning_sae.saes.topk import AuxEntries, SparseTopKTraining


class _SumGradients(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ``group`` (a replicated input)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        """Return ``tensor`` unchanged."""
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Sum the partial gradients of the group's ranks."""
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOutputs(torch.autograd.Function):
    """Sum partial outputs over ``group``; the backward is the identity.

    Every rank computes its loss from the same sum, so each partial's gradient is the sum's.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        """Return the sum of ``tensor`` over the group."""
        out = tensor.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Pass the gradient through."""
        return grad, None


def _all_gather(tensor: Tensor, group: ProcessGroup) -> list[Tensor]:
    """All-gather tensors whose first dimension may differ between ranks (padded, then cut)."""
    size = dist.get_world_size(group)
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.empty_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = int(torch.cat(lengths).max())
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return [part[: int(n)] for part, n in zip(parts, lengths, strict=True)]


def gather_candidates(local: Candidates, width: int, group: ProcessGroup) -> Candidates:
    """All candidates of the group, columns made global (rank ``r`` holds ``[r·width, …)``).

    Values, rows and columns travel as one float64 tensor (exact for float32 values and for
    indices below 2^53): two collectives, plus one for the floors ``[ranks, B]``.
    """
    packed = torch.stack([local.values.double(), local.rows.double(), local.cols.double()], 1)
    parts = _all_gather(packed, group)
    cols = torch.cat([part[:, 2].long() + rank * width for rank, part in enumerate(parts)])
    merged = torch.cat(parts)
    floors = [torch.empty_like(local.floors) for _ in parts]
    dist.all_gather(floors, local.floors.contiguous(), group=group)
    return Candidates(
        merged[:, 0].to(local.values.dtype), merged[:, 1].long(), cols, torch.stack(floors)
    )


def gather_row_topk(
    values: Tensor, cols: Tensor, k: int, group: ProcessGroup
) -> tuple[Tensor, Tensor]:
    """Per-row top-``k`` over the group of every rank's candidates ``[B, w]`` (global ``cols``).

    Every rank passes the same ``w`` (pad with ``-inf``); exact when the ranks list at least
    ``k`` real candidates per row in all. One collective (values and columns as float64).
    """
    packed = torch.stack([values.double(), cols.double()], dim=-1)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed.contiguous(), group=group)
    merged = torch.cat(parts, dim=1)
    return merge_row_topk(merged[..., 0].to(values.dtype), merged[..., 1].long(), k)


class LatentParallelTraining:
    """Mixin placed before a TopK-family training class whose latents are sharded.

    :func:`lightning_sae.parallel.shard_latents` sets :attr:`latent_group` and turns the SAE's
    ``W_enc``, ``b_enc``, ``W_dec`` (sharded by latent) and ``b_dec`` (replicated) into
    ``DTensor`` parameters.
    """

    #: The ranks that share the latents (all train on the same batch).
    latent_group: ProcessGroup

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """Run the TopK family's sparse pass over this rank's latents, selecting globally."""
        with torch.autocast(step_input.sae_in.device.type, enabled=False):
            output = self._latent_parallel_pass(step_input)
        self.finish_sparse_pass(output)  # type: ignore[attr-defined]
        return output

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse: inference needs the whole SAE (gather it first)."""
        raise RuntimeError(
            "This SAE's latents are sharded over ranks (latent-parallel training): encode/decode "
            "need the whole SAE. Call lightning_sae.parallel.gathered_module(module) on every "
            "rank (rank 0 gets the copy), or load the gathered checkpoint in one process."
        )

    decode = encode

    def _latent_parallel_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae: Any = self
        cfg, group = sae.cfg, self.latent_group
        W_enc, b_enc, W_dec = (_local(t) for t in (sae.W_enc, sae.b_enc, sae.W_dec))
        b_dec = _local(sae.b_dec)
        d_local = W_enc.shape[1]
        offset = dist.get_rank(group) * d_local
        sae_in = step_input.sae_in
        x = sae_in.detach().to(W_enc.dtype)
        batch = x.shape[0]
        b_dec_encoder = _SumGradients.apply(b_dec, group) if cfg.apply_b_dec_to_input else None
        x_centered = x - b_dec.detach() if cfg.apply_b_dec_to_input else x
        norm = W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None

        with torch.no_grad():
            scores = torch.addmm(b_enc, x_centered, W_enc)
            if norm is not None:
                scores.mul_(norm)
            rows, cols, values = self._global_winners(scores, offset)
            entries = sort_entries(rows, cols, values, batch, cfg.d_sae)
            aux = self._global_aux(scores, offset, step_input.dead_neuron_mask)
            # This rank's entries: its winners (bags = tokens), then AuxK's (bags B … 2B − 1).
            groups = [(entries.rows, entries.cols, entries.values)]
            groups += [(g.rows, g.cols, g.values) for g in aux]
            own = [_own(cols, offset, d_local) for _, cols, _ in groups]
            layout = entry_layout(
                torch.cat([rows[mask] for (rows, _, _), mask in zip(groups, own, strict=True)]),
                torch.cat([cols[mask] for (_, cols, _), mask in zip(groups, own, strict=True)])
                - offset,
                torch.cat(
                    [
                        rows[mask] + index * batch
                        for index, ((rows, _, _), mask) in enumerate(zip(groups, own, strict=True))
                    ]
                ),
                batch * len(groups),
                d_local,
            )
            own_values = torch.cat([v[mask] for (_, _, v), mask in zip(groups, own, strict=True)])
            n_main = int(own[0].sum())

        pre = SampledEncoder.apply(
            own_values, x_centered, W_enc, b_enc, b_dec_encoder, norm, layout
        )
        weights = torch.cat([pre[:n_main].relu(), pre[n_main:]])
        if norm is not None:
            weights = weights * (1 / norm)[layout.cols]
        decoded = _SumOutputs.apply(SparseDecode.apply(weights, W_dec, layout), group)

        sae_out = decoded[:batch] + b_dec
        mse_loss = sae.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        aux_loss = sae_out.new_tensor(0.0)
        if aux:  # sae-lens's AuxK: dead latents reconstruct the detached residual (no b_dec)
            residual = (sae_in - sae_out).detach()
            error = (decoded[batch:] - residual).pow(2).sum(dim=-1).mean()
            aux_loss = cfg.aux_loss_coefficient * aux[0].scale * error
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=sparse_csr(entries, entries.values.relu(), cfg.d_sae),
            hidden_pre=scores,  # this rank's latents only
            loss=mse_loss + aux_loss,
            losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss},
        )

    def _global_winners(self, scores: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rows, global columns and values of the group's winners (TopK: per-token top-k)."""
        k = self.cfg.k  # type: ignore[attr-defined]
        # A shard narrower than k lists all of its latents (the group still lists k or more).
        local = row_topk(scores, min(k, scores.shape[1]), offset)
        values, cols = gather_row_topk(*local, k, self.latent_group)
        rows = torch.arange(scores.shape[0], device=scores.device).repeat_interleave(k)
        return rows, cols.flatten(), values.flatten()

    def _global_aux(self, scores: Tensor, offset: int, dead: Tensor | None) -> list[AuxEntries]:
        """AuxK: each token's top ``k_aux`` dead latents over the group (global columns)."""
        if dead is None:
            return []
        d_local = scores.shape[1]
        k_aux = self.cfg.d_in // 2  # type: ignore[attr-defined]
        rows, cols, values, n_local = dead_row_topk(scores, dead[offset : offset + d_local], k_aux)
        n_dead = int(_sum_over(torch.tensor(n_local, device=scores.device), self.latent_group))
        if n_dead == 0:
            return []
        batch, k = scores.shape[0], min(k_aux, n_dead)
        pad = k_aux - values.shape[0] // batch  # ranks list min(k_aux, own dead) per token
        values = F.pad(values.view(batch, -1), (0, pad), value=-torch.inf)
        cols = F.pad((cols + offset).view(batch, -1), (0, pad))
        values, cols = gather_row_topk(values, cols, k, self.latent_group)
        rows = torch.arange(batch, device=scores.device).repeat_interleave(k)
        return [AuxEntries(rows, cols.flatten(), values.flatten(), min(n_dead / k_aux, 1.0), 0)]


class LatentParallelBatchTopK(LatentParallelTraining):
    """BatchTopK's selection over shards: the exact top ``B·k`` of the whole batch."""

    def _global_winners(self, scores: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Exact batch top-k over the group's candidates (more candidates where not proven)."""
        sae: Any = self
        batch, d_local = scores.shape
        total = int(sae.cfg.k * batch)
        if total == 0:
            empty = torch.zeros(0, dtype=torch.long, device=scores.device)
            return empty, empty, scores.new_zeros(0)
        m = sae.candidates_per_k * math.ceil(sae.cfg.k)
        m = min(max(m, -(-total // (batch * dist.get_world_size(self.latent_group)))), d_local)
        local = row_candidates(scores, m)  # local columns; made global when gathered
        rank = offset // d_local
        while True:
            merged = gather_candidates(local, d_local, self.latent_group)
            position, _, saturated = select_batch_topk(merged, total)
            if m >= d_local or not bool(saturated.any()):
                break
            m = min(4 * m, d_local)
            own = saturated[rank].nonzero().flatten()
            if own.numel():
                local = extend_candidates(local, scores, own, m)
        return merged.rows[position], merged.cols[position], merged.values[position]


@functools.cache
def latent_parallel_class(cls: type) -> type:
    """Return the latent-parallel version of a TopK or BatchTopK training class (cached)."""
    nested = getattr(cls, "level_widths", None) is not SparseTopKTraining.level_widths
    if not issubclass(cls, SparseTopKTraining) or nested:
        raise TypeError(
            f"Latent-parallel training supports TopK and BatchTopK SAEs, not {cls.__name__}: "
            "train it with FSDP2 instead (ModelParallelStrategy with tensor_parallel_size=1)."
        )
    mixin = (
        LatentParallelBatchTopK
        if issubclass(cls, FastBatchTopKTrainingSAE)
        else LatentParallelTraining
    )
    return type(f"LatentParallel{cls.__name__}", (mixin, cls), {"__module__": __name__})


def _local(tensor: Tensor) -> Tensor:
    """Return the rank's part of a ``DTensor`` (differentiable), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _own(cols: Tensor, offset: int, width: int) -> Tensor:
    """Mask of the global columns ``cols`` this rank holds."""
    return (cols >= offset) & (cols < offset + width)


def _sum_over(tensor: Tensor, group: ProcessGroup) -> Tensor:
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out
