"""The one thread-pinning helper for torch's intra-op CPU threads (set, or set for a block and restore)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def pin_threads(n: int) -> None:
    """Use ``n`` intra-op threads from now on (a no-op when already so: setting it is not free)."""
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int, enabled: bool = True) -> Iterator[None]:
    """Run the block's torch CPU ops on ``n`` intra-op threads, then restore the previous count."""
    old = torch.get_num_threads()
    if not enabled or old == n:
        yield
        return
    pin_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def one_thread(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Run the block's torch CPU ops on one intra-op thread (restores the previous count)."""
    return torch_threads(1, enabled)
