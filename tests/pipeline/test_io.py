"""pipeline/io.py (atomic writes, versions) and the one sidecar contract (models.read_sidecar)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loca_pipe.pipeline import io as lio
from loca_pipe.pipeline.errors import ModelError
from loca_pipe.pipeline.models import read_sidecar, sidecar_path

STAGES_TESTS = Path(__file__).resolve().parents[1] / "stages"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writers_round_trip_create_folders_and_leave_no_temporaries(tmp_path):
    d = tmp_path / "a" / "b"
    assert lio.atomic_write_bytes(d / "x.bin", b"\x00\x01") == d / "x.bin"
    assert (d / "x.bin").read_bytes() == b"\x00\x01"
    lio.atomic_write_text(d / "x.txt", "héllo\n")
    assert (d / "x.txt").read_text(encoding="utf-8") == "héllo\n"
    lio.write_json(d / "x.json", {"b": 1, "a": [1.5]})
    assert (d / "x.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    lio.write_json(d / "y.json", {"b": np.float32(0.5), "a": 1}, sort_keys=False)
    assert list(json.loads((d / "y.json").read_text())) == ["b", "a"]
    # numpy / torch values keep their JSON kind (an int64 stays an integer, a bool_ a boolean); paths are strings
    lio.write_json(d / "z.json", {"i": np.int64(3), "t": np.bool_(True), "v": np.arange(3), "f": np.float32(0.25),
                                  "x": torch.tensor(2.5), "p": d})
    assert json.loads((d / "z.json").read_text()) == {"i": 3, "t": True, "v": [0, 1, 2], "f": 0.25, "x": 2.5,
                                                     "p": str(d)}
    assert '"i": 3,' in (d / "z.json").read_text() and '"t": true' in (d / "z.json").read_text()
    with pytest.raises(TypeError, match="is not JSON serialisable"):
        lio.write_json(d / "w.json", {"o": object()})
    state = {"w": torch.arange(6.0).view(2, 3)}
    lio.atomic_save(state, d / "m.pt")
    assert torch.equal(torch.load(d / "m.pt")["w"], state["w"])
    assert _leftovers(d) == []


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        lio.atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    f = tmp_path / "m.json"
    lio.write_json(f, {"v": 1})

    def boom(fh):
        fh.write(b'{"v": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        lio.atomic_write(f, boom)
    assert json.loads(f.read_text()) == {"v": 1} and _leftovers(tmp_path) == []

    def no_rename(src, dst):
        raise OSError("crash before the rename")

    monkeypatch.setattr(lio.os, "replace", no_rename)
    with pytest.raises(OSError, match="before the rename"):
        lio.write_json(f, {"v": 3})
    assert json.loads(f.read_text()) == {"v": 1} and _leftovers(tmp_path) == []


def test_versions_names_the_packages_the_numbers_depend_on():
    import loca_pipe

    v = lio.versions()
    assert v["loca_pipe"] == loca_pipe.__version__ and v["torch"] == torch.__version__
    assert {"zarr", "numpy", "torchvision"} <= set(v)
    from loca_pipe.pipeline import store

    assert store.versions is lio.versions  # one definition


def test_read_sidecar_one_contract(tmp_path):
    ck = tmp_path / "t.pt"
    with pytest.raises(ModelError, match=r"has no sidecar '.*t\.pt\.json'; pass the architecture"):
        read_sidecar(ck)
    assert read_sidecar(ck, missing_ok=True) == {}  # only when the caller asks for an optional sidecar
    (tmp_path / "t.json").write_text('{"arch": "cnn"}')  # the stem spelling is not a sidecar
    assert read_sidecar(ck, missing_ok=True) == {}
    sidecar_path(ck).write_text("{not json")
    for ok in (False, True):
        with pytest.raises(ModelError, match="is not valid JSON .*fix or delete it"):
            read_sidecar(ck, missing_ok=ok)
    sidecar_path(ck).write_text("[1, 2]")
    with pytest.raises(ModelError, match="must hold a JSON object; got list"):
        read_sidecar(ck, missing_ok=True)


@pytest.mark.skipif(shutil.which("loca-pipe", path=str(Path(sys.executable).parent)) is None,
                    reason="console script not installed")
def test_cli_names_a_sidecar_that_is_not_an_object(tmp_path):
    ck = tmp_path / "lin.pt"
    torch.save({}, ck)
    sidecar_path(ck).write_text("[1]")
    exe = str(Path(sys.executable).parent / "loca-pipe")
    env = {**os.environ, "PYTHONPATH": f"{STAGES_TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([exe, "cache-logits", "--checkpoint", str(ck), "--dataset", "toy_cache_module:dataset",
                          "--store", str(tmp_path / "s.zarr"), "--device", "cpu", "--no-progress"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "must hold a JSON object; got list" in lines[0] and "Traceback" not in out.stderr
