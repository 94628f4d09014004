"""Write an activation store with ``ActivationDataModule.write_cache``; optionally SIGKILL mid-way.

``python cache_write.py STORE OUT [KILL_AT]``: a tiny random HookedTransformer (seeded: the same
weights in every process) on random token ids; the model's ``activations`` calls are counted and
written to ``OUT/calls.json``, and call ``KILL_AT`` kills this process (``kill -9``: no cleanup
runs). ``tests/data/test_cache.py`` runs it killed, then again to resume, and once uninterrupted.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lightning_sae import ActivationDataModule

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
#: 16-token blocks, 4 per chunk file (64 tokens); 256-token model chunks and mixing buffers.
OPTIONS = {"block_tokens": 16, "chunk_bytes": 4 * 16 * (2 * 16 * 4 + 4), "holdout_tokens": 64}


def datamodule() -> ActivationDataModule:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_mlp=32, d_vocab=100,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    tokens = torch.randint(0, 100, (64, 40), generator=torch.Generator().manual_seed(0))
    return ActivationDataModule(
        model=HookedTransformer(cfg).eval(), hook_names=HOOKS, dataset=tokens, context_size=16,
        batch_size=64, prepend_bos=False, holdout_documents=8, shuffle_buffer_tokens=256,
    )  # fmt: skip


def main(store: str, out: Path, kill_at: int | None) -> None:
    torch.set_num_threads(1)
    dm = datamodule()
    hooked = dm.source.hooked_model
    forward, calls = hooked.activations, []

    def counted(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(rows.shape[0])
        (out / "calls.json").write_text(json.dumps(len(calls)))
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(rows)

    hooked.activations = counted
    dm.write_cache(store, n_tokens=1024, **OPTIONS)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
