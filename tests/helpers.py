"""Helpers the test folders share (``from tests.helpers import …``; make test runs pytest from the repo root)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


def write_teacher(store: Any, writer: Any, z: Any, labels: Any, top_k: int, temperatures: Iterable[float], *,
                   chunks: Iterable[int] | None = None, full: bool = True) -> bool:
    """Write a teacher's row chunks from its logits ``z`` (R, C) as cache-logits would: the shared rows (sample id
    = row, view 0), the summaries, and the full logits unless ``full`` is False; ``chunks``: which (default: all
    pending). Returns ``writer.finalize()``."""
    from loca_pipe.pipeline.caching import summarize_logits

    z, y = torch.as_tensor(z), torch.as_tensor(labels)
    for c in writer.pending_chunks() if chunks is None else chunks:
        sl = store.info.chunk_slice(c)
        store.write_rows(c, np.arange(sl.start, sl.stop), y[sl].numpy(), np.zeros(sl.stop - sl.start))
        arrays = {k: v.numpy() for k, v in summarize_logits(z[sl], y[sl], top_k, tuple(temperatures)).items()}
        if full:
            arrays["logits"] = z[sl].numpy()
        writer.write_chunk(c, arrays)
    return writer.finalize()


def small_token_store(folder: Path, model: torch.nn.Module, tok: Any, enc: Any) -> str:
    """The token store the streaming and HF-student tests read: k = 4, τ ∈ {1, 2}, 6 sampled ids, 32-row chunks."""
    from loca_pipe.pipeline.lm import cache

    path = folder / "s.zarr"
    cache.cache_teacher(str(path), "t", model, enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        top_k=4, temperatures=(1.0, 2.0), dataset={"name": "x", "split": "train", "fingerprint": "f"},
                        provenance={}, chunk_rows=32, batch_size=8, sample_draws=6)
    return str(path)


def kill_after_done_chunks(proc: Any, done_dir: Path, n: int = 2, timeout: float = 120) -> None:
    """SIGKILL the caching subprocess ``proc`` once ``done_dir`` (a teacher's ``done/c`` folder) holds ``n`` chunk
    flags: a crash mid-run, after some chunks are whole. Fails if the run ends first."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= n:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the slow run ended before the kill: {proc.communicate()[1].decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def zarr_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """Every array of a store (the store group's and each teacher's), by its path inside the store: what two
    stores must hold bit for bit when they are said to be identical."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {k: v[:] for k, v in root.members(max_depth=None) if isinstance(v, zarr.Array)}
