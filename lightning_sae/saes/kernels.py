"""Sparse kernels of the training hot path, shared by our training SAE classes.

Only torch ops that exist on CPU and CUDA. The sparse passes work on *entries*: ``rows`` (token
index) and ``cols`` (latent index) of the few non-zero latents. After one dense encoder product
(``scores``, no autograd graph), everything else touches the entries only:

* :class:`SampledEncoder` returns the pre-activations at the entries; its backward builds
  ``W_enc``'s gradient from the entries alone (one ``embedding_bag`` over the inputs, one bag per
  latent) — never a dense ``[B, d_sae]`` gradient;
* :class:`SparseDecode` is an ``embedding_bag`` over ``W_dec`` (one bag per output row); its
  backward gives the entries' gradients (sampled products) and ``W_dec``'s (one bag per latent);
* :class:`EntryLayout` holds both orders of the entries (by output row, by latent), built once;
* selection: :func:`topk_entries` (per token), :func:`batch_topk_entries` (exact batch top-k:
  the entries above a cut-off hint, :func:`flat_entries_at_least`, or :func:`row_candidates` →
  :func:`select_batch_topk` → :func:`candidates_above_cut_off` where the exactness check fails),
  :func:`dead_row_topk` (AuxK), :func:`positive_entries` (ReLU);
* :class:`DenseEncoder`: the dense encoder product for the Standard/Gated dense paths, whose
  backward skips the input gradient;
* :func:`threshold_band`: the entries a JumpReLU backward reads (the sparse JumpReLU pass's
  entries); :func:`threshold_decode`: the dense JumpReLU pass's decoder, sparse over them.

Sharding: a rank holding latents ``[offset, offset + d_local)`` calls :func:`row_topk` or
:func:`row_candidates` with ``column_offset=offset``; the candidates of all ranks (values, rows,
global cols, and for batch top-k the per-row ``floors`` stacked ``[ranks, B]``) are all-gathered
and merged with :func:`merge_row_topk` or :func:`select_batch_topk` unchanged.
"""

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Candidates(NamedTuple):
    """Per-row candidates for an exact batch top-k.

    ``values``/``rows``/``cols`` (``[n]``) list candidate entries. ``floors`` holds, per candidate
    group (a row, or a row of one shard: any shape), the smallest listed value of that group, or
    ``-inf`` where the group lists all of its entries; every unlisted entry of a group is at most
    its floor.
    """

    values: Tensor
    rows: Tensor
    cols: Tensor
    floors: Tensor


class Entries(NamedTuple):
    """Sparse entries, sorted by row, then column.

    ``rows``, ``cols``, their ``values`` in the matrix they were selected from, and the CSR row
    pointer ``crow`` ``[B + 1]``.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    crow: Tensor


def row_offsets(sorted_ids: Tensor, n: int) -> Tensor:
    """CSR pointer ``[n + 1]`` of ids sorted ascending (static shape: no host synchronisation).

    The pointer has the ids' integer dtype (int32 or int64).
    """
    ids = torch.arange(n + 1, dtype=sorted_ids.dtype, device=sorted_ids.device)
    return torch.searchsorted(sorted_ids, ids, out_int32=sorted_ids.dtype == torch.int32)


def sort_entries(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Entries:
    """Sort entries by ``(row, col)`` and add their CSR row pointer."""
    order = (rows * n_cols + cols).argsort()
    rows = rows[order]
    return Entries(rows, cols[order], values[order], row_offsets(rows, n_rows))


def row_topk(scores: Tensor, k: int, column_offset: int = 0) -> tuple[Tensor, Tensor]:
    """Per-row top-``k`` of ``scores`` ``[B, d]``: values and global column indices, ``[B, k]``.

    ``column_offset`` turns a shard's local columns into global latent indices.
    """
    values, cols = scores.topk(k, dim=-1, sorted=False)
    return values, cols + column_offset if column_offset else cols


def merge_row_topk(values: Tensor, cols: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row top-``k`` of candidates ``[B, n]`` gathered from shards.

    Exact: each shard's own top-``k`` holds all of its possible winners.
    """
    values, position = values.topk(k, dim=-1, sorted=False)
    return values, cols.gather(-1, position)


def row_candidates(scores: Tensor, m: int, column_offset: int = 0) -> Candidates:
    """Each row's top-``m`` entries of ``scores`` ``[B, d]`` as batch top-k candidates."""
    batch, width = scores.shape
    values, cols = row_topk(scores, min(m, width), column_offset)
    # Where every entry is listed, nothing can be missing: the floor is -inf.
    floors = values.new_full((batch,), -torch.inf) if m >= width else values.amin(dim=-1)
    rows = torch.arange(batch, device=scores.device).repeat_interleave(values.shape[-1])
    return Candidates(values.flatten(), rows, cols.flatten(), floors)


def select_batch_topk(candidates: Candidates, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``total`` candidates (by value) and which candidate groups may hide more winners.

    Returns the winners' positions in ``candidates`` (``[total]``), the cut-off (the smallest
    winning value) and a boolean ``saturated`` shaped like ``floors``.

    Exactness: an unlisted entry ``e`` of a group is ``<= floor``. Where ``floor < cut-off``,
    ``total`` listed values exceed ``e``, so ``e`` is not among the top ``total``; where
    ``floor <= 0``, ``relu(e) = 0`` and ``e`` can only tie with other zero activations, which
    change nothing. So the result equals the top-``total`` of ``relu`` over the whole matrix
    (up to ties) unless some group has ``floor >= cut-off`` and ``floor > 0``: ``saturated``.
    """
    winners, position = candidates.values.topk(total, sorted=False)
    cut_off = winners.min()
    floors = candidates.floors
    return position, cut_off, (floors >= cut_off) & (floors > 0)


def extend_candidates(
    candidates: Candidates, scores: Tensor, saturated_rows: Tensor, m: int
) -> Candidates:
    """Replace the candidates of rows ``saturated_rows`` (indices) by their top-``m`` entries."""
    return _replace_rows(candidates, saturated_rows, row_candidates(scores[saturated_rows], m))


def candidates_above_cut_off(
    candidates: Candidates, scores: Tensor, saturated_rows: Tensor, cut_off: Tensor
) -> Candidates:
    """Replace the candidates of rows ``saturated_rows`` by all their entries ``>= cut_off``.

    ``cut_off`` is a selection's smallest winning value. Listing more candidates only raises
    it, so no entry below it can win, and the rows need no further extension: their new floor
    lies just below it. Every winner of that selection stays listed, so at least as many
    candidates remain as it chose.
    """
    rows_scores = scores[saturated_rows]
    floor = torch.nextafter(cut_off, cut_off.new_tensor(-torch.inf))
    rows, cols = (rows_scores > floor).nonzero().unbind(dim=1)
    floors = floor.expand(saturated_rows.shape[0])
    return _replace_rows(
        candidates, saturated_rows, Candidates(rows_scores[rows, cols], rows, cols, floors)
    )


def _replace_rows(candidates: Candidates, replaced_rows: Tensor, extra: Candidates) -> Candidates:
    """``candidates`` with the rows ``replaced_rows`` listed by ``extra`` (rows local to it)."""
    keep = torch.ones_like(candidates.floors, dtype=torch.bool)
    keep[replaced_rows] = False
    listed = keep[candidates.rows]
    floors = candidates.floors.clone()
    floors[replaced_rows] = extra.floors
    return Candidates(
        torch.cat([candidates.values[listed], extra.values]),
        torch.cat([candidates.rows[listed], replaced_rows[extra.rows]]),
        torch.cat([candidates.cols[listed], extra.cols]),
        floors,
    )


#: Most entries at or above a cut-off hint, as a multiple of ``total``, that
#: :func:`batch_topk_entries` selects among (beyond it the per-row candidates are cheaper).
HINT_MAX_CANDIDATES = 8
#: Scores compared with a cut-off at once by :func:`flat_entries_at_least` (on CPU; 16 times
#: as many on other devices, where each block's ``nonzero`` waits for the device).
HINT_BLOCK = 2**20


def flat_entries_at_least(scores: Tensor, floor: Tensor, limit: int) -> Tensor | None:
    """Flat positions (ascending) of the entries of ``scores`` ``[B, d]`` that are ``>= floor``.

    None as soon as more than ``limit`` are found. The comparison runs over blocks of rows into
    one boolean block, reused: a ``[B, d]`` mask would add a quarter of a float32 ``scores`` to
    the step's peak memory, and a block that stays in cache is compared and scanned faster.
    """
    batch, width = scores.shape
    block = HINT_BLOCK if scores.device.type == "cpu" else 16 * HINT_BLOCK
    block_rows = min(batch, max(1, block // width))
    mask = torch.empty(block_rows * width, dtype=torch.bool, device=scores.device)
    found, count = [], 0
    for start in range(0, batch, block_rows):
        rows = scores[start : start + block_rows].view(-1)
        above = torch.ge(rows, floor, out=mask[: rows.shape[0]])
        positions = above.nonzero().flatten()
        count += positions.shape[0]  # host-side: ``nonzero`` knows its size
        if count > limit:
            return None
        found.append(positions.add_(start * width))
    return torch.cat(found)


def batch_topk_entries(
    scores: Tensor, total: int, m: int, cut_off_hint: Tensor | None = None
) -> Entries:
    """Exact top-``total`` entries of ``relu(scores)`` over the whole ``[B, d]`` matrix, sorted.

    With a ``cut_off_hint`` (the previous batch's cut-off, a little lowered), the entries
    at or above it are taken first (:func:`flat_entries_at_least`): when there are at least
    ``total`` of them (and at most ``HINT_MAX_CANDIDATES`` times as many), every winner is among
    them, and one top-k over them is exact — one comparison pass over the matrix instead of a
    per-row top-k. Otherwise:

    Per-row top-``m`` candidates, then a global selection among them; rows whose candidates may
    hide winners (see :func:`select_batch_topk`) are re-listed with every entry at or above that
    selection's cut-off (:func:`candidates_above_cut_off`), and the selection runs once more.
    Real activations need this: a few tokens of huge norm hold hundreds of a batch's winners.

    The hint's count is read on the host per block of rows (``nonzero`` knows its size), the
    exactness test of the candidates one boolean per round: free on CPU, a synchronisation each
    on CUDA (the alternative, a top-k over all ``B·d`` values, costs ~10 per-row ones).
    """
    batch, width = scores.shape
    if total == 0:  # k·B < 1: nothing fires, as in sae-lens
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return Entries(empty, empty, scores.new_zeros(0), row_offsets(empty, batch))
    if cut_off_hint is not None:  # exact for any hint once `total` entries reach it
        flat = flat_entries_at_least(scores, cut_off_hint, HINT_MAX_CANDIDATES * total)
        if flat is not None and flat.shape[0] >= total:
            values = scores.view(-1).index_select(0, flat)
            position = values.topk(total, sorted=False).indices.sort().values
            winners = flat.index_select(0, position)  # ascending: by row, then column
            return flat_entries(scores, winners, values.index_select(0, position))
    m = min(max(m, -(-total // batch)), width)  # at least `total` candidates in all
    candidates = row_candidates(scores, m)
    position, cut_off, saturated = select_batch_topk(candidates, total)
    if bool(saturated.any()):
        saturated_rows = saturated.nonzero().flatten()
        candidates = candidates_above_cut_off(candidates, scores, saturated_rows, cut_off)
        position, _, _ = select_batch_topk(candidates, total)
    return sort_entries(
        candidates.rows[position],
        candidates.cols[position],
        candidates.values[position],
        batch,
        width,
    )


def topk_entries(scores: Tensor, k: int) -> Entries:
    """Per-row top-``k`` entries of ``scores`` ``[B, d]``, sorted (``k`` per row)."""
    batch = scores.shape[0]
    values, cols = row_topk(scores, k)
    cols, order = cols.sort(dim=-1)
    values = values.gather(-1, order)
    device = scores.device
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    crow = torch.arange(0, batch * k + 1, k, device=device)
    return Entries(rows, cols.flatten(), values.flatten(), crow)


#: Scores gathered at once by :func:`dead_row_topk` (1/32 of ``[4096, 8192]``).
DEAD_TOPK_BLOCK = 2**20


def dead_row_topk(
    scores: Tensor, dead: Tensor, k: int, column_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per-row top-``min(k, n_dead)`` of ``scores`` ``[B, d]`` among the columns ``dead`` ``[d]``.

    Returns ``rows``, ``cols`` (plus ``column_offset``; both int32 where they fit, as
    :func:`entry_layout` keeps them), ``values`` and ``n_dead``. Reads the
    number of dead latents on the host (as sae-lens does): the work then scales with the dead
    latents, not with ``d``. The dead columns are gathered ``DEAD_TOPK_BLOCK`` scores at a time
    into one block, reused: a ``[B, n_dead]`` copy would add a quarter of ``scores`` at 25% dead
    latents to the step's peak memory, and a new block per round leaves freed blocks behind that
    glibc's allocator keeps resident without reusing them.
    """
    dead_cols = dead.nonzero().flatten()
    n_dead = dead_cols.shape[0]
    if n_dead == 0:
        empty = dead_cols.new_zeros(0)
        return empty, empty, scores.new_zeros(0), 0
    batch, k = scores.shape[0], min(k, n_dead)
    values = scores.new_empty(batch, k)
    position = dead_cols.new_empty(batch, k)
    block = min(batch, max(1, DEAD_TOPK_BLOCK // n_dead))
    dead_scores = scores.new_empty(block, n_dead)
    for start in range(0, batch, block):
        rows = slice(start, start + block)
        chunk = scores[rows]
        gathered = torch.index_select(chunk, 1, dead_cols, out=dead_scores[: chunk.shape[0]])
        torch.topk(gathered, k, dim=-1, sorted=False, out=(values[rows], position[rows]))
    fits = max(batch, column_offset + scores.shape[1]) < 2**31
    dtype = torch.int32 if fits else torch.int64
    rows = torch.arange(batch, dtype=dtype, device=scores.device).repeat_interleave(k)
    dead_cols = dead_cols.to(dtype) + column_offset
    return rows, dead_cols[position.flatten()], values.flatten(), n_dead


@dataclass
class EntryLayout:
    """Entries of a sparse step in two orders: as listed (by decode bag) and by latent.

    ``rows``: token of each entry (a row of the encoder's input); ``cols``: its latent;
    ``bags``: its decoder output row (non-decreasing), with pointer ``bag_offsets``;
    ``by_col``: the permutation sorting entries by latent, with pointer ``col_offsets``.
    Both weight gradients are ``embedding_bag`` sums over the entries in latent order. The
    latent order is sorted on first use, in the backward pass: the forward pass (which holds the
    dense encoder product) never holds the sort's buffers.
    """

    rows: Tensor
    cols: Tensor
    bags: Tensor
    bag_offsets: Tensor
    n_cols: int

    @cached_property
    def _latent_order(self) -> tuple[Tensor, Tensor]:
        """``by_col`` and ``col_offsets``: a stable sort of ``cols``."""
        sorted_cols, by_col = self.cols.sort(stable=True)
        return by_col.to(self.cols.dtype), row_offsets(sorted_cols, self.n_cols)

    @property
    def by_col(self) -> Tensor:
        """The permutation that sorts the entries by latent (stable)."""
        return self._latent_order[0]

    @property
    def col_offsets(self) -> Tensor:
        """Pointer ``[n_cols + 1]`` of the entries in latent order."""
        return self._latent_order[1]


def entry_layout(
    rows: Tensor | Sequence[Tensor],
    cols: Tensor | Sequence[Tensor],
    bags: Tensor | Sequence[Tensor],
    n_bags: int,
    n_cols: int,
) -> EntryLayout:
    """Build an :class:`EntryLayout` (``bags`` must be non-decreasing).

    ``rows``, ``cols`` and ``bags`` may each come in pieces (concatenated in order, straight
    into the layout's dtype: no int64 concatenation first). Its indices are int32 where they
    fit: half the memory of int64 (AuxK lists ``d_in / 2`` entries per token), and a stable sort
    of 32-bit keys is ~1.3 times faster on CPU.
    """
    n = sum(piece.shape[0] for piece in _pieces(cols))
    dtype = torch.int32 if max(n, n_bags, n_cols) < 2**31 else torch.int64
    rows, cols, bags = (_concatenated(pieces, n, dtype) for pieces in (rows, cols, bags))
    return EntryLayout(rows, cols, bags, row_offsets(bags, n_bags), n_cols)


def _pieces(pieces: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [pieces] if isinstance(pieces, Tensor) else list(pieces)


def _concatenated(pieces: Tensor | Sequence[Tensor], n: int, dtype: torch.dtype) -> Tensor:
    """Concatenate the ``n`` indices of ``pieces`` into one ``dtype`` tensor."""
    pieces = _pieces(pieces)
    if len(pieces) == 1:
        return pieces[0].to(dtype)
    return torch.cat(pieces, out=pieces[0].new_empty(n, dtype=dtype))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype that sums of ``dtype`` values accumulate in (at least float32)."""
    return torch.promote_types(dtype, torch.float32)


def _latent_sums(
    layout: EntryLayout, source_rows: Tensor, source: Tensor, weights: Tensor
) -> Tensor:
    """Sum ``weights[e] · source[source_rows[e]]`` over the entries ``e`` of each latent.

    ``[d_sae, d]``: ``CSRᵀ @ source`` with one ``embedding_bag`` bag per latent.
    """
    order = layout.by_col
    return F.embedding_bag(
        source_rows.index_select(0, order),
        source,
        layout.col_offsets,
        mode="sum",
        per_sample_weights=weights.index_select(0, order),
        include_last_offset=True,
    )


class SampledEncoder(torch.autograd.Function):
    """Pre-activations ``((x − b_dec) @ W_enc + b_enc) · scale`` at sparse entries, differentiable.

    The forward values come precomputed (selected from the dense, graph-free encoder product).
    Backward touches the entries only: ``W_enc``'s gradient is ``CSRᵀ @ x`` (an ``embedding_bag``
    of input rows, one bag per latent), ``b_enc``'s an ``index_add_``, ``b_dec``'s
    ``−W_enc @ grad_b_enc`` (the inputs need no gradient), ``scale``'s (the decoder norm of
    ``rescale_acts_by_decoder_norm``) ``Σ grad · value / scale``. The two ``index_add_`` sums
    accumulate in :func:`accumulator_dtype`, as a dense ``sum`` does (summed in bf16, ``b_enc``'s
    gradient was 1.6 times less accurate than sae-lens's).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        values: Tensor,
        x_centered: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor | None,
        scale: Tensor | None,
        layout: EntryLayout,
    ) -> Tensor:
        """Return ``values`` (already computed) and keep what the backward needs."""
        ctx.save_for_backward(values, x_centered, W_enc, scale)
        ctx.layout = layout
        ctx.has_b_dec = b_dec is not None
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Gradients of ``W_enc``, ``b_enc``, ``b_dec`` and ``scale`` from the entries alone."""
        values, x_centered, W_enc, scale = ctx.saved_tensors
        layout: EntryLayout = ctx.layout
        cols = layout.cols
        d_sae = W_enc.shape[1]
        scale_at = scale.index_select(0, cols) if scale is not None else None
        grad_pre = grad * scale_at if scale_at is not None else grad
        total = accumulator_dtype(grad.dtype)
        grad_b_enc = grad.new_zeros(d_sae, dtype=total).index_add_(0, cols, grad_pre.to(total))
        grad_b_enc = grad_b_enc.to(grad.dtype)
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = _latent_sums(layout, layout.rows, x_centered, grad_pre).T
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[4]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[5]:
            per_entry = (grad * values / scale_at).to(total)
            grad_scale = grad.new_zeros(d_sae, dtype=total).index_add_(0, cols, per_entry)
            grad_scale = grad_scale.to(grad.dtype)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, grad_scale, None


def sampled_products(grad: Tensor, W_dec: Tensor, layout: EntryLayout) -> Tensor:
    """``grad[bags[e]] · W_dec[cols[e]]`` for every entry ``e``: the entries' decode gradients.

    A sampled matrix product over the entries' ``[n_bags, d_sae]`` CSR pattern: on CPU in float32
    and float64 ``torch.sparse.sampled_addmm`` (1.6–1.8 times faster than the per-entry loop of
    ``embedding_bag``'s backward, measured on 1.2M entries of width 512), elsewhere that
    backward kernel, given each entry's bag.
    """
    grad = grad.contiguous()
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64):
        n_bags, d_sae = layout.bag_offsets.shape[0] - 1, W_dec.shape[0]
        with warnings.catch_warnings():  # torch warns once per process that CSR is "beta"
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                layout.bag_offsets,
                layout.cols,
                grad.new_zeros(layout.cols.shape[0]),
                (n_bags, d_sae),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, grad, W_dec.T, beta=0.0).values()
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad, W_dec, layout.cols, layout.bag_offsets, layout.bags, 0
    )


class SparseDecode(torch.autograd.Function):
    """``out[bag] = Σ_{entries e in bag} weights[e] · W_dec[cols[e]]``: an ``embedding_bag``.

    Backward: the entries' gradients are sampled products ``grad[bag] · W_dec[col]``
    (:func:`sampled_products`); ``W_dec``'s is a sum per latent in latent order
    (:class:`EntryLayout`), several times faster on CPU than ``embedding_bag``'s own weight
    backward.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, W_dec: Tensor, layout: EntryLayout) -> Tensor:  # type: ignore[override]
        """Decode (``embedding_bag`` without an autograd graph of its own)."""
        ctx.layout = layout
        ctx.save_for_backward(weights, W_dec)
        return F.embedding_bag(
            layout.cols,
            W_dec.detach(),
            layout.bag_offsets,
            mode="sum",
            per_sample_weights=weights.detach(),
            include_last_offset=True,
        )

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Gradients of the entries' weights and of ``W_dec``."""
        weights, W_dec = ctx.saved_tensors
        layout: EntryLayout = ctx.layout
        grad_weights = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_weights = sampled_products(grad, W_dec.detach(), layout)
        if ctx.needs_input_grad[1]:
            grad_W_dec = _latent_sums(layout, layout.bags, grad, weights)
        return grad_weights, grad_W_dec, None


class NestedSquaredErrors(torch.autograd.Function):
    """Reconstruction errors of the TopK family from the decoded bags, saving nothing new.

    ``decoded`` ``[B·L + G·B, d_in]`` (a :class:`SparseDecode` output): bag ``row·L + l`` holds
    level ``l``'s part of token ``row``'s reconstruction, bag ``B·L + g·B + row`` AuxK group
    ``g``'s reconstruction. Reconstruction ``l`` is ``b_dec + Σ_{j ≤ l} part_j``. Returns the last
    reconstruction (``sae_out``) and ``errors`` ``[L + G]``: the mean over tokens of
    ``‖recon_l − x‖²``, then of ``‖aux_g − (x − recon_{aux_levels[g]})‖²`` (the residual detached,
    as in sae-lens's AuxK). Autograd's own ops would keep each level's reconstruction and each
    difference for the backward pass (several ``[B, d_in]`` tensors per term); here the backward
    recomputes them from ``decoded``, which lives on anyway.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, decoded: Tensor, b_dec: Tensor, x: Tensor, n_levels: int, aux_levels: list[int]
    ) -> tuple[Tensor, Tensor]:
        """Return ``sae_out`` and the errors (see the class docstring)."""
        ctx.save_for_backward(decoded, b_dec, x)
        ctx.n_levels, ctx.aux_levels = n_levels, aux_levels
        errors = decoded.new_empty(n_levels + len(aux_levels))
        diff, error = torch.empty_like(x), None  # reused by every level and AuxK group
        for level, recon, _ in _reconstructions(decoded, b_dec, x, n_levels, lambda _: diff):
            sae_out = recon  # the same tensor at every level: the last reconstruction at the end
            errors[level] = diff.flatten().dot(diff.flatten())
            for group in _groups_at(aux_levels, level):
                error = torch.add(_aux_rows(decoded, x, n_levels, group), diff, out=error)
                errors[n_levels + group] = error.flatten().dot(error.flatten())
        return sae_out, errors.div_(x.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_errors: Tensor | None):  # type: ignore[override]
        """Gradients of ``decoded`` (every bag) and ``b_dec``."""
        decoded, b_dec, x = ctx.saved_tensors
        n_levels, batch = ctx.n_levels, x.shape[0]
        if grad_errors is None:
            grad_errors = decoded.new_zeros(n_levels + len(ctx.aux_levels))
        scales = grad_errors * (2.0 / batch)
        grad = torch.empty_like(decoded)
        parts = grad[: batch * n_levels].view(batch, n_levels, -1)
        # Each level's difference is written straight into its part of the gradient.
        differences = _reconstructions(decoded, b_dec, x, n_levels, lambda level: parts[:, level])
        for level, _, diff in differences:
            for group in _groups_at(ctx.aux_levels, level):
                aux_grad = _aux_rows(grad, x, n_levels, group)
                torch.add(_aux_rows(decoded, x, n_levels, group), diff, out=aux_grad)
                aux_grad.mul_(scales[n_levels + group])
            diff.mul_(scales[level])
        if grad_out is not None:
            parts[:, -1] += grad_out
        for level in reversed(range(n_levels - 1)):  # part j is in every reconstruction l >= j
            parts[:, level] += parts[:, level + 1]
        return grad, parts[:, 0].sum(dim=0), None, None, None


def _reconstructions(
    decoded: Tensor,
    b_dec: Tensor,
    x: Tensor,
    n_levels: int,
    diff_out: Callable[[int], Tensor],
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(l, recon_l, recon_l − x)`` per level.

    ``recon`` is one tensor, updated in place; each difference is written into ``diff_out(l)``.
    """
    batch = x.shape[0]
    parts = decoded[: batch * n_levels].view(batch, n_levels, -1)
    recon = parts[:, 0] + b_dec
    for level in range(n_levels):
        if level:
            recon += parts[:, level]
        yield level, recon, torch.sub(recon, x, out=diff_out(level))


def _groups_at(aux_levels: list[int], level: int) -> list[int]:
    """AuxK groups reconstructing the residual of ``level``."""
    return [group for group, aux_level in enumerate(aux_levels) if aux_level == level]


def _aux_rows(decoded: Tensor, x: Tensor, n_levels: int, group: int) -> Tensor:
    """AuxK group ``group``'s bags of ``decoded`` ``[B, d_in]``."""
    batch = x.shape[0]
    start = batch * (n_levels + group)
    return decoded[start : start + batch]


class RowNorms(torch.autograd.Function):
    """``W.norm(dim=-1)`` whose backward is one pass, ``W · (grad / norm)`` (zero rows: zero).

    Autograd's own norm backward makes four passes over ``W``; for the decoder norm of
    ``rescale_acts_by_decoder_norm`` that costs a fifth of an encoder product at small ``d_sae``.
    """

    @staticmethod
    def forward(ctx, W: Tensor) -> Tensor:  # type: ignore[override]
        """Return the norm of every row of ``W``."""
        norm = torch.linalg.vector_norm(W, dim=-1)
        ctx.save_for_backward(W, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        """``W``'s gradient: each row scaled by ``grad / norm`` (0 where the norm is 0)."""
        W, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, 0.0)
        return W * scale.unsqueeze(-1)


class DenseEncoder(torch.autograd.Function):
    """``(x − b_dec) @ W_enc + b_enc`` whose backward skips the input gradient ``grad @ W_encᵀ``.

    The inputs need no gradient, so ``b_dec``'s is ``−W_enc @ Σ_rows grad`` (a matrix-vector
    product) instead of a second ``[B, d_sae] @ [d_sae, d_in]`` product. ``b_enc`` may be None.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor | None
    ) -> Tensor:
        """Return the encoder product (plus ``b_enc``)."""
        ctx.save_for_backward(x_centered, W_enc)
        ctx.has_b_dec = b_dec is not None
        out = x_centered @ W_enc
        return out if b_enc is None else out.add_(b_enc)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """Gradients of ``W_enc``, ``b_enc`` and ``b_dec`` (none for the inputs)."""
        x_centered, W_enc = ctx.saved_tensors
        grad_W_enc = x_centered.T @ grad if ctx.needs_input_grad[1] else None
        grad_sum = grad.sum(dim=0)
        grad_b_enc = grad_sum if ctx.needs_input_grad[2] else None
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ grad_sum)
        return None, grad_W_enc, grad_b_enc, grad_b_dec


#: Largest fraction of a JumpReLU step's entries in its gradient band for which
#: :func:`threshold_decode` decodes sparsely (crossover of the decode alone, measured with
#: ``benchmarks/bench_step.py`` before its JumpReLU rows timed the whole sparse pass).
THRESHOLD_DECODE_DENSITY_LIMIT = 0.1


def threshold_band(hidden_pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Mark the entries of JumpReLU pre-activations ``[B, d_sae]`` that its backward reads.

    JumpReLU's backward reads ``feature_acts``' gradient only where a latent is active
    (``π > θ``) or within the threshold's kernel (``|π − θ| < ε/2``, computed in ``π``'s dtype):
    all of them lie in the band ``π > min(θ − ε, θ⁻)`` (``θ⁻`` the next value below ``θ``).

    ``θ⁻``: in bf16/fp16, ``θ − ε`` rounds to ``θ`` once ``ε`` is under half ``θ``'s spacing
    (bf16 from ``θ = 0.5``, fp16 from ``θ = 4`` at sae-lens's ``ε = 0.001``), yet the kernel
    still holds ``π = θ``. Every other kernel entry lies above the rounded ``θ − ε``.
    """
    below = torch.nextafter(threshold, threshold.new_tensor(-torch.inf))
    return hidden_pre > torch.minimum(threshold - bandwidth, below)


def threshold_decode(
    feature_acts: Tensor,
    hidden_pre: Tensor,
    threshold: Tensor,
    bandwidth: float,
    W_dec: Tensor,
    b_dec: Tensor,
) -> Tensor:
    """``feature_acts @ W_dec + b_dec`` of JumpReLU latents ``[B, d_sae]``; sparse when that pays.

    Where at most ``THRESHOLD_DECODE_DENSITY_LIMIT`` of the entries lie in the
    :func:`threshold_band`, the decode is a :class:`SparseDecode` over those entries: ``W_dec``'s
    and ``b_dec``'s gradients and the band's entries' gradients are the dense decode's; the
    others get 0, which JumpReLU's backward multiplies by 0 anyway. Otherwise, or for latents of
    another dtype than ``W_dec``, the decode is dense. The density is read on the host (free on
    CPU; on CUDA one synchronisation).
    """
    with torch.no_grad():
        band = threshold_band(hidden_pre, threshold, bandwidth)
        sparse = (
            feature_acts.dtype == W_dec.dtype
            and int(torch.count_nonzero(band)) <= THRESHOLD_DECODE_DENSITY_LIMIT * band.numel()
        )
        if sparse:
            rows, cols = band.nonzero().unbind(dim=1)
            batch, d_sae = band.shape
            layout = entry_layout(rows, cols, rows, batch, d_sae)
    if not sparse:
        return feature_acts @ W_dec + b_dec
    return SparseDecode.apply(feature_acts[rows, cols], W_dec, layout) + b_dec


def flat_entries(scores: Tensor, flat: Tensor, values: Tensor | None = None) -> Entries:
    """Entries of ``scores`` ``[B, d]`` at ascending flat positions ``flat``.

    ``values`` (``scores`` at ``flat``) when already gathered. One ``index_select`` on the flat
    view: a two-index gather costs ~4 times more on CPU.
    """
    batch, width = scores.shape
    if values is None:
        values = scores.reshape(-1).index_select(0, flat)
    rows = flat.div(width, rounding_mode="floor")
    return Entries(rows, flat - rows * width, values, row_offsets(rows, batch))


def positive_entries(pre: Tensor) -> Entries:
    """Entries where ``pre`` ``[B, d]`` is positive, sorted by row, then column."""
    return flat_entries(pre, (pre > 0).view(-1).nonzero().squeeze(1))


def runs_sae_lens_pass(sae: torch.nn.Module, sae_in: Tensor) -> bool:
    """Whether ``sae`` must take sae-lens's own training pass on ``sae_in`` instead of ours.

    Our passes take ``[tokens, d_in]`` inputs and skip sae-lens's hook points and its run-time
    input normalisations: other input shapes, an SAE with a hook attached, or
    ``normalize_activations`` ``constant_norm_rescale``/``layer_norm`` train through sae-lens.
    """
    if sae_in.ndim != 2 or sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        return True
    return any(hook._forward_hooks or hook._backward_hooks for hook in sae.hook_dict.values())


def sparse_csr(entries: Entries, values: Tensor, n_cols: int) -> Tensor:
    """Return a ``[B, n_cols]`` CSR tensor of ``values`` at ``entries`` (explicit zeros kept)."""
    batch = entries.crow.shape[0] - 1
    with warnings.catch_warnings():  # torch warns once per process that CSR is "beta"
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            entries.crow, entries.cols, values, (batch, n_cols), check_invariants=False
        )
