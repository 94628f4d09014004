"""Selection kernels: exact batch top-k with its saturation check, and merges across shards."""

import pytest
import torch

from lightning_sae.saes.kernels import (
    Candidates,
    NestedSquaredErrors,
    RowNorms,
    SparseDecode,
    batch_topk_entries,
    entry_layout,
    merge_row_topk,
    row_candidates,
    row_topk,
    sampled_products,
    select_batch_topk,
    threshold_decode,
)

B, D = 16, 48


def reference_batch_topk(scores: torch.Tensor, total: int) -> torch.Tensor:
    """sae-lens's BatchTopK activation: top ``total`` of ``relu(scores)`` over the flat batch."""
    flat = scores.relu().flatten()
    top = flat.topk(total)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(scores)


def densify(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(scores)
    out[rows, cols] = scores[rows, cols].relu()
    return out


def test_saturated_rows_are_flagged_and_extended():
    torch.manual_seed(0)
    scores = torch.randn(B, D)
    scores[3] += 10.0  # row 3 holds more than m winners
    total, m = 2 * B, 4
    candidates = row_candidates(scores, m)
    position, cut_off, saturated = select_batch_topk(candidates, total)
    assert saturated[3]
    rows, cols = candidates.rows[position], candidates.cols[position]
    assert not torch.equal(densify(scores, rows, cols), reference_batch_topk(scores, total))
    assert cut_off < scores.relu().flatten().topk(total).values.min()  # winners were missing
    entries = batch_topk_entries(scores, total, m)
    assert torch.equal(
        densify(scores, entries.rows, entries.cols), reference_batch_topk(scores, total)
    )
    assert torch.equal(entries.crow, torch.searchsorted(entries.rows, torch.arange(B + 1)))


@pytest.mark.parametrize("seed", range(6))
def test_heavy_tailed_rows_need_one_extension(seed, monkeypatch):
    """Token norms spread over orders of magnitude (as in real residual streams): one row may
    hold most of the batch's winners, and one extension above the cut-off is exact."""
    from lightning_sae.saes import kernels

    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(2.0 * torch.randn(64, 1, generator=generator))
    scores = torch.randn(64, 256, generator=generator) * scales
    total, m = 8 * 64, 16
    calls = []
    select = kernels.select_batch_topk
    monkeypatch.setattr(kernels, "select_batch_topk", lambda *a: calls.append(1) or select(*a))
    entries = batch_topk_entries(scores, total, m)
    assert len(calls) == 2  # the first selection missed winners; the second is final
    assert torch.equal(
        densify(scores, entries.rows, entries.cols), reference_batch_topk(scores, total)
    )


def test_saturated_row_keeps_its_winner_at_the_cut_off():
    """The cut-off may be a saturated row's own smallest candidate: re-listed with every entry at
    or above the cut-off (not only above it), the row keeps that winner."""
    torch.manual_seed(0)
    scores = 0.5 * torch.rand(4, 16)
    scores[0] = torch.arange(16.0, 0.0, -1.0)
    total, m = 2, 2
    _, cut_off, saturated = select_batch_topk(row_candidates(scores, m), total)
    assert cut_off == 15.0 and saturated[0]
    entries = batch_topk_entries(scores, total, m)
    assert torch.equal(
        densify(scores, entries.rows, entries.cols), reference_batch_topk(scores, total)
    )


@pytest.mark.parametrize("block", [None, 3 * 256 + 5], ids=["one-block", "blocks-of-3-rows"])
@pytest.mark.parametrize(
    ("hint_factor", "uses_hint"),
    [(0.9, True), (1.2, False), (0.01, False)],
    ids=["just-below", "too-high", "too-low"],
)
def test_cut_off_hint_is_used_only_when_it_proves_the_result(
    hint_factor, uses_hint, block, monkeypatch
):
    """At least ``total`` (and at most 8·total) entries at or above the hint: one top-k among
    them; too few (hint above the cut-off) or too many: the per-row candidates, exact either way.
    The comparison runs in blocks of rows (the last one partial here; "too-low" stops early)."""
    from lightning_sae.saes import kernels

    if block is not None:
        monkeypatch.setattr(kernels, "HINT_BLOCK", block)
    torch.manual_seed(3)
    scores = torch.randn(64, 256) * torch.exp(torch.randn(64, 1))
    total = 4 * 64
    cut_off = scores.relu().flatten().topk(total).values.min()
    calls = []
    per_row = kernels.row_candidates
    monkeypatch.setattr(kernels, "row_candidates", lambda *a: calls.append(1) or per_row(*a))
    entries = batch_topk_entries(scores, total, 8, cut_off_hint=cut_off * hint_factor)
    assert (not calls) == uses_hint
    assert torch.equal(
        densify(scores, entries.rows, entries.cols), reference_batch_topk(scores, total)
    )
    assert torch.equal(entries.crow, torch.searchsorted(entries.rows, torch.arange(64 + 1)))
    assert torch.equal(entries.values, scores[entries.rows, entries.cols])


@pytest.mark.parametrize("offset", [0, 100])
def test_dead_row_topk_in_reused_blocks_is_each_rows_top_k(offset, monkeypatch):
    """Blocks of 3 rows (the last one partial) into one reused buffer: each row's top-k among
    the dead columns, as a top-k over all of them gives, columns shifted by ``offset``."""
    from lightning_sae.saes import kernels

    torch.manual_seed(4)
    scores, dead, k = torch.randn(10, 40), torch.rand(40) < 0.5, 4
    n_dead = int(dead.sum())
    monkeypatch.setattr(kernels, "DEAD_TOPK_BLOCK", 3 * n_dead + 1)
    rows, cols, values, found = kernels.dead_row_topk(scores, dead, k, column_offset=offset)
    assert found == n_dead
    assert torch.equal(rows, torch.arange(10).repeat_interleave(k).to(rows.dtype))
    dead_cols = dead.nonzero().flatten()
    expected, position = scores[:, dead_cols].topk(k, dim=-1)
    got = values.view(10, k).sort(dim=-1, descending=True).values
    assert torch.equal(got, expected)
    expected_cols = (dead_cols[position] + offset).sort(dim=-1).values
    assert torch.equal(cols.view(10, k).sort(dim=-1).values.long(), expected_cols)
    assert torch.equal(values, scores[rows.long(), cols.long() - offset])


def test_saturated_row_with_a_non_positive_cut_off_lists_its_positives():
    """Fewer positives than ``total``, most in one row: that row's positives are all listed."""
    scores = torch.full((B, D), -1.0)
    scores[2, : D // 2] = torch.linspace(1.0, 2.0, D // 2)
    scores[5, 0] = 3.0
    total, m = 4 * B, 4
    _, cut_off, saturated = select_batch_topk(row_candidates(scores, m), total)
    assert cut_off <= 0 and saturated[2]
    entries = batch_topk_entries(scores, total, m)
    winners = densify(scores, entries.rows, entries.cols)
    assert torch.equal(winners, reference_batch_topk(scores, total))
    assert (winners > 0).sum() == D // 2 + 1


def test_fewer_positives_than_total_is_exact_without_extension():
    """Once the cut-off is <= 0, a row's unlisted entries are <= 0 and cannot matter."""
    torch.manual_seed(1)
    scores = torch.randn(B, D) - 3.0  # a handful of positives
    total, m = 4 * B, 4
    _, cut_off, saturated = select_batch_topk(row_candidates(scores, m), total)
    assert cut_off <= 0
    assert not saturated.any()
    entries = batch_topk_entries(scores, total, m)
    assert torch.equal(
        densify(scores, entries.rows, entries.cols), reference_batch_topk(scores, total)
    )


def test_sharded_candidates_merge_to_the_unsharded_result():
    torch.manual_seed(2)
    scores = torch.randn(B, D)
    shards = [(0, 20), (20, 48)]
    # Per-row top-k: each shard's top-k, gathered, then merged.
    local = [row_topk(scores[:, a:b], 5, column_offset=a) for a, b in shards]
    values, cols = merge_row_topk(
        torch.cat([v for v, _ in local], dim=1), torch.cat([c for _, c in local], dim=1), 5
    )
    expected_values, expected_cols = row_topk(scores, 5)
    assert torch.equal(cols.sort(dim=1).values, expected_cols.sort(dim=1).values)
    assert torch.equal(values.sort(dim=1).values, expected_values.sort(dim=1).values)
    # Batch top-k: each shard's row candidates, gathered (floors stacked per shard), selected.
    parts = [row_candidates(scores[:, a:b], 8, column_offset=a) for a, b in shards]
    gathered = Candidates(
        *(torch.cat([getattr(p, f) for p in parts]) for f in Candidates._fields[:3]),
        torch.stack([p.floors for p in parts]),
    )
    total = 3 * B
    position, _, saturated = select_batch_topk(gathered, total)
    assert saturated.shape == (2, B) and not saturated.any()
    got = densify(scores, gathered.rows[position], gathered.cols[position])
    assert torch.equal(got, reference_batch_topk(scores, total))


def _decode_layout(n_bags: int = 6, d_sae: int = 10, per_bag: int = 3):
    """``per_bag`` distinct latents per bag, unsorted within bags (as AuxK lists them)."""
    torch.manual_seed(2)
    cols = torch.stack([torch.randperm(d_sae)[:per_bag] for _ in range(n_bags)]).flatten()
    bags = torch.arange(n_bags).repeat_interleave(per_bag)
    return entry_layout(bags, cols, bags, n_bags, d_sae)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sampled_products_are_the_entries_dot_products(dtype):
    """CPU float32/float64 take ``sampled_addmm``, bfloat16 ``embedding_bag``'s backward kernel."""
    layout = _decode_layout()
    grad = torch.randn(6, 5, dtype=dtype)
    W_dec = torch.randn(10, 5, dtype=dtype)
    expected = (grad[layout.bags].double() * W_dec[layout.cols].double()).sum(-1)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(
        sampled_products(grad, W_dec, layout).double(), expected, rtol=tolerance, atol=tolerance
    )


def test_sparse_decode_gradients_are_exact():
    layout = _decode_layout()
    weights = torch.randn(layout.cols.shape[0], dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, W: SparseDecode.apply(w, W, layout), (weights, W_dec))


def test_row_norms_gradient_is_exact_with_a_zero_row():
    W = torch.randn(6, 5, dtype=torch.float64)
    W[2] = 0.0  # autograd's norm gives a zero gradient there too
    W.requires_grad_()
    torch.testing.assert_close(RowNorms.apply(W), W.norm(dim=-1))
    assert torch.autograd.gradcheck(
        RowNorms.apply, (torch.randn(6, 5, dtype=torch.float64, requires_grad=True),)
    )
    weights = torch.randn(6, dtype=torch.float64)
    (ours,) = torch.autograd.grad((RowNorms.apply(W) * weights).sum(), W)
    (theirs,) = torch.autograd.grad((W.norm(dim=-1) * weights).sum(), W)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("aux_levels", [[], [2], [0, 1, 2]], ids=["no aux", "aux", "aux per level"])
def test_nested_squared_errors_are_autograds(aux_levels):
    """Values and gradients of the fused reconstruction errors equal plain autograd's.

    float64: values and gradients (against autograd's, with sae-lens's detached AuxK residual) to
    rtol 1e-12; without AuxK also by ``gradcheck``.
    """
    batch, levels, width = 5, 3, 4
    decoded = torch.randn(batch * (levels + len(aux_levels)), width, dtype=torch.float64)
    b_dec = torch.randn(width, dtype=torch.float64)
    x = torch.randn(batch, width, dtype=torch.float64)

    def reference(decoded: torch.Tensor, b_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recons = decoded[: batch * levels].view(batch, levels, width).cumsum(dim=1) + b_dec
        errors = [(recons[:, level] - x).pow(2).sum(dim=-1).mean() for level in range(levels)]
        for group, level in enumerate(aux_levels):
            aux = decoded[batch * (levels + group) : batch * (levels + group + 1)]
            residual = (x - recons[:, level]).detach()
            errors.append((aux - residual).pow(2).sum(dim=-1).mean())
        return recons[:, -1], torch.stack(errors)

    def ours(decoded: torch.Tensor, b_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return NestedSquaredErrors.apply(decoded, b_dec, x, levels, aux_levels)

    inputs = (decoded.requires_grad_(), b_dec.requires_grad_())
    for actual, expected in zip(ours(*inputs), reference(*inputs), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    if not aux_levels:  # AuxK's residual is detached: its gradient is not the numerical one
        assert torch.autograd.gradcheck(ours, inputs)
    weights = torch.randn(levels + len(aux_levels), dtype=torch.float64)
    out_weights = torch.randn(batch, width, dtype=torch.float64)
    grads = [
        torch.autograd.grad(((out * out_weights).sum() + errors @ weights), inputs)
        for out, errors in (ours(*inputs), reference(*inputs))
    ]
    for actual, expected in zip(*grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(torch.bfloat16, 0.6, 1.5), (torch.float16, 4.5, 12.0)],
    ids=["bf16", "fp16"],
)
def test_threshold_decode_keeps_the_entries_at_their_threshold(dtype, low, high, monkeypatch):
    """Thresholds where ``θ − ε`` rounds to ``θ`` (sae-lens's ε = 0.001): the backward's kernel
    still holds ``π = θ``, so the sparse decode gives those entries the dense decode's gradient
    (bf16/fp16 rounding apart: rtol 2e-2, atol 2e-2 on gradients of order 3)."""
    from lightning_sae.saes import kernels

    calls = []
    sparse_decode = kernels.SparseDecode.apply
    monkeypatch.setattr(
        kernels.SparseDecode, "apply", lambda *a: calls.append(1) or sparse_decode(*a)
    )
    torch.manual_seed(0)
    batch, d_in, d_sae, bandwidth = 64, 8, 32, 0.001
    threshold = torch.linspace(low, high, d_sae).to(dtype)
    assert torch.equal(threshold - bandwidth, threshold)  # the case: θ − ε rounds to θ
    hidden_pre = (0.1 * torch.randn(batch, d_sae)).to(dtype)  # far below θ
    pick = torch.rand(batch, d_sae)
    at = pick < 0.03
    hidden_pre[at] = threshold.expand_as(hidden_pre)[at]  # exactly at θ: inside the kernel
    above = (pick > 0.97).to(dtype)
    hidden_pre += above * (threshold + 0.5)
    W_dec = torch.randn(d_sae, d_in, dtype=dtype, requires_grad=True)
    b_dec = torch.zeros(d_in, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, d_in, dtype=dtype)
    acts = (hidden_pre * (hidden_pre > threshold)).requires_grad_()
    grads = []
    for decode in (threshold_decode, lambda a, _pre, _theta, _eps, W, b: a @ W + b):
        acts.grad = None
        (decode(acts, hidden_pre, threshold, bandwidth, W_dec, b_dec) * grad_out).sum().backward()
        grads.append(acts.grad.clone())
    assert calls  # the sparse decode ran
    # What JumpReLUWithL0's backward reads: active entries and the kernel, in π's dtype.
    read = (hidden_pre > threshold) | (((hidden_pre - threshold) / bandwidth).abs() < 0.5)
    assert read[at].all() and at.any()
    sparse, dense = grads
    torch.testing.assert_close(sparse[read], dense[read], rtol=2e-2, atol=2e-2)
