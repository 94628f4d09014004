"""Calibrate the JumpReLU threshold a BatchTopK SAE exports with, on held-out activations."""

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from torch import Tensor


def calibrate_batchtopk_threshold(
    sae: BatchTopKTrainingSAE, activations: Tensor, chunk_size: int = 4096
) -> float:
    """Estimate the JumpReLU threshold at which ``sae`` fires on ``k`` latents per token on average.

    BatchTopK keeps the top ``B·k`` values of ``ReLU(π)`` over a batch of ``B`` tokens (``π`` the
    decoder-norm-scaled pre-activations when ``rescale_acts_by_decoder_norm``). Over the whole
    calibration set of ``N`` tokens, this estimator takes the threshold between the ``m``-th and
    ``(m+1)``-th largest values, ``m = floor(N·k)``: the set's ``(1 - k/d_sae)`` quantile, so the
    exported ``π > θ`` fires on exactly ``m`` entries there (up to float rounding of the fold), i.e.
    mean L0 = ``k`` on that set, and it is the limit of the training-time batch top-k as ``B``
    grows. On other tokens the L0 error is the sampling error of that quantile, which falls as
    ``1/sqrt(N)`` (tokens, not entries, are the independent unit: a token's latents fire together).
    Measured on synthetic activations (d_sae 128 and 512, k 8 and 16, 30 and 120 steps, 5
    calibration sets each, L0 on 16,384 other tokens): worst relative L0 error 6.2 % with N = 1,024,
    4.5 % with 4,096, 2.8 % with 16,384; active sets agree with the training batch top-k on
    4,096-token batches with Jaccard >= 0.944, 0.960, 0.975 respectively. sae-lens's own estimate,
    an EMA (rate ``topk_threshold_lr``) of the smallest kept activation per batch, starts at 0 and
    tracks a batch minimum rather than a quantile: in the same runs it gave L0 54 for k = 8 and 110
    for k = 16, so it is not used. On real activations (SmolLM2-135M layer 15 on Shakespeare, d_sae
    2,304, k 32, 60 steps; calibration and test tokens from different scenes) the worst errors were
    5.9 %, 4.9 % and 3.1 % for N = 1,024, 4,096 and 16,384, mostly the difference between
    documents (calibrate on many), Jaccard >= 0.948, 0.972, 0.998, and the EMA gave L0 267.

    The pre-activations are sae-lens's own (``encode_with_hidden_pre``); only the top ``m + 1``
    values are kept while streaming chunks, so memory is ``O(N·k + chunk_size·d_sae)``.

    Args:
        sae: A BatchTopK (or Matryoshka BatchTopK) training SAE; it is not modified.
        activations: ``[N, d_in]`` activations in the units ``sae`` expects.
        chunk_size: Tokens per encoder pass.

    Returns:
        The threshold, in the units of ``π``.

    Raises:
        ValueError: If ``N·k < 1``.

    """
    n_active = int(sae.cfg.k * activations.shape[0])
    if n_active < 1:
        raise ValueError(
            f"{activations.shape[0]} calibration tokens with k={sae.cfg.k} select no latent; "
            "give at least 1/k tokens (thousands for an accurate threshold)."
        )
    kept = activations.new_empty(0, dtype=torch.float32)
    # Only the pre-activations are needed: a plain ReLU skips sae-lens's batch top-k, whose result
    # would be discarded. The activation function holds no state and is restored below.
    batch_topk, sae.activation_fn = sae.activation_fn, torch.nn.ReLU()
    try:
        with torch.no_grad():
            for chunk in activations.split(chunk_size):
                _, hidden_pre = sae.encode_with_hidden_pre(chunk.to(sae.W_enc.dtype))
                values = hidden_pre.relu().flatten().float()
                if kept.numel() > n_active:  # only values above the current (m+1)-th can enter
                    values = values[values > kept[-1]]
                size = min(n_active + 1, kept.numel() + values.numel())
                kept = torch.cat([kept, values]).topk(size).values
    finally:
        sae.activation_fn = batch_topk
    if kept.numel() <= n_active:  # k == d_sae: every positive value fires
        return 0.0
    return float((kept[n_active - 1].double() + kept[n_active].double()) / 2)
