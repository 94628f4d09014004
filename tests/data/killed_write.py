"""Write a small activation store; with KILL_AT, SIGKILL this process mid-write.

``python killed_write.py STORE [KILL_AT]``: the chunk source kills the process (``kill -9``: no
cleanup runs) when chunk ``KILL_AT`` is asked for. ``tests/data/test_store.py`` runs it killed in a
subprocess, and imports :func:`write` to write the same store uninterrupted and to resume the
killed one.
"""

import os
import signal
import sys
from collections.abc import Iterator

import torch

from lightning_sae.data.store import write_store

N_CHUNKS, CHUNK_TOKENS, D_IN = 12, 100, 8
#: 10-token blocks, 5 blocks per chunk file, 4 chunk files per 200-token mixing buffer.
OPTIONS = {"block_tokens": 10, "chunk_bytes": 5 * 10 * (D_IN + 1) * 4, "shuffle_buffer_tokens": 200}
METADATA = {"model_name": "synthetic", "context_size": 10}


def chunk(index: int) -> dict[str, torch.Tensor]:
    """Chunk ``index`` of the source: token ``t`` has ``acts[t, 0] == t``, and id ``t``."""
    tokens = torch.arange(index * CHUNK_TOKENS, (index + 1) * CHUNK_TOKENS)
    acts = torch.randn(CHUNK_TOKENS, D_IN, generator=torch.Generator().manual_seed(index))
    acts[:, 0] = tokens.float()
    return {"blocks.0.hook_resid_post": acts, "token_ids": tokens}


def write(store: str, kill_at: int | None = None, starts: list[int] | None = None) -> str:
    """Write the store; ``starts`` collects the token offsets the source is asked to start at."""

    def chunks(start: int) -> Iterator[dict[str, torch.Tensor]]:
        if starts is not None:
            starts.append(start)
        first, offset = divmod(start, CHUNK_TOKENS)
        for index in range(first, N_CHUNKS):
            if index == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield {k: v[offset:] for k, v in chunk(index).items()}
            offset = 0

    holdout = {"blocks.0.hook_resid_post": chunk(N_CHUNKS)["blocks.0.hook_resid_post"]}
    return write_store(store, chunks, holdout, METADATA, **OPTIONS)


if __name__ == "__main__":
    write(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
