"""Helpers of the command-line tests: the installed console script, a toy store, a read-only folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES_TESTS = REPO / "tests" / "stages"
if str(STAGES_TESTS) not in sys.path:  # toy_cache_module (module:callable data set and teachers)
    sys.path.insert(0, str(STAGES_TESTS))


def console_script() -> str:
    """The installed `loca-pipe`: next to the running python (make test runs the venv's), else on PATH."""
    here = Path(sys.executable).parent / "loca-pipe"
    if here.is_file():
        return str(here)
    found = shutil.which("loca-pipe")
    if found is None:
        pytest.fail("the `loca-pipe` console script is not installed next to this python or on PATH; run `make setup`")
    return found


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STAGES_TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
         "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCA_JOB_ID"):
        e.pop(k, None)
    e.update(extra)
    return e


def run_cli(args: list[str], cwd: Path | str | None = None, timeout: float = 300, **extra_env: str):
    """Run the console script in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([console_script(), *map(str, args)], cwd=cwd, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def toy_args(store: Path | str, *more: str) -> list[str]:
    """cache-logits options of the toy teacher/data set (40 rows, chunks of 8 → 5 chunks)."""
    return ["cache-logits", "--teacher", "toy_cache_module:teacher", "--dataset", "toy_cache_module:dataset",
            "--store", str(store), "--top-k", "3", "--temperatures", "1,4", "--chunk-rows", "8", "--batch-size", "3",
            "--device", "cpu", "--num-workers", "0", *more]


def toy_params(store: Path | str, **kw):
    from loca_pipe.stages.cache_logits import CacheParams

    base = dict(teacher="toy_cache_module:teacher", dataset="toy_cache_module:dataset", store=str(store), top_k=3,
                temperatures=(1.0, 4.0), chunk_rows=8, batch_size=3, device="cpu", num_workers=0, progress=False)
    base.update(kw)
    return CacheParams(**base)


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory) -> Path:
    """A complete toy logit store (one teacher 'teacher'), made in-process; tests must not modify it."""
    from loca_pipe.stages.cache_logits import run

    path = tmp_path_factory.mktemp("toy") / "s.zarr"
    run(toy_params(path))
    return path


@pytest.fixture(scope="module")
def readonly_dir(tmp_path_factory):
    """A folder nobody can write into: a read-only tmpfs when running as root (root ignores file modes),
    else a folder with mode 0555."""
    path = tmp_path_factory.mktemp("ro") / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
