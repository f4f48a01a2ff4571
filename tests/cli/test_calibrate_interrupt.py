"""An interrupt during calibrate: the local workers stop after the chunk they are writing, the interrupt
reaches the caller, and the same call resumes to targets identical to an uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import zarr


class _InterruptingBar:
    """A progress bar whose first update is a Ctrl-C (as if SIGINT arrived after one chunk)."""

    def __init__(self, *a, **k):
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt


def test_interrupted_calibrate_keeps_done_chunks_and_resumes(tmp_path, toy_store, monkeypatch):
    from loca_pipe.pipeline import progress
    from loca_pipe.pipeline.targets import write_targets

    clean = tmp_path / "clean.zarr"
    write_targets(str(toy_store), str(clean), [0.9], 4.0)
    out = tmp_path / "t.zarr"
    with monkeypatch.context() as m:
        m.setattr(progress, "progress_bar", _InterruptingBar)
        with pytest.raises(KeyboardInterrupt):
            write_targets(str(toy_store), str(out), [0.9], 4.0, progress=True)
    done = zarr.open_group(str(out), mode="r")["teachers"]["teacher"]["done"][:]
    assert 1 <= done.sum() < len(done)  # stopped early, the chunk that finished is kept
    write_targets(str(toy_store), str(out), [0.9], 4.0)  # the same call again
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(clean), mode="r")
    for k in a["teachers"]["teacher"].array_keys():
        np.testing.assert_array_equal(a["teachers"]["teacher"][k][:], b["teachers"]["teacher"][k][:], err_msg=k)
