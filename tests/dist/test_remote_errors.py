"""Remote stores that cannot be used (issue #20): a missing credential, a missing bucket, no network, a permission
error — each one `error:` line naming the URL and the fix, exit 1, no traceback. The first three run the
installed `loca-pipe` against a real S3-compatible server on loopback (moto, as test_object_store.py does);
the permission error comes from an fsspec file system that denies everything (moto does not enforce policies)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).with_name("loca-pipe")) if Path(sys.executable).with_name("loca-pipe").is_file() \
    else shutil.which("loca-pipe")
TOY = ["cache-logits", "--teacher", "toy_cache_module:teacher", "--dataset", "toy_cache_module:dataset", "--top-k", "3",
       "--chunk-rows", "8", "--device", "cpu", "--num-workers", "0", "--no-progress"]
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                  "AWS_CONFIG_FILE": "/nonexistent", "AWS_PROFILE": ""}


def _one_line(args: list[str], **env: str) -> str:
    e = subprocess_env(**{"AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1", **env})
    for k, v in env.items():
        if v == "":
            e.pop(k, None)
    r = subprocess.run([EXE, *args], env=e, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-3000:])
    return lines[0]


def test_missing_credentials(s3_server):
    line = _one_line(["info", "s3://loca-test/x.zarr"], **NO_CREDENTIALS)
    assert "'s3://loca-test/x.zarr': no credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line


def test_missing_bucket(s3_server):
    line = _one_line([*TOY, "--store", "s3://no-such-bucket/s.zarr"])
    assert "'s3://no-such-bucket/s.zarr': the bucket does not exist; create the bucket or fix the URL" in line


def test_no_network():
    line = _one_line(["info", "s3://loca-test/x.zarr"], AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                     AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL="http://127.0.0.1:9")  # nothing listens there
    assert ("'s3://loca-test/x.zarr': the object store cannot be reached; check the network and the endpoint "
            "(AWS_ENDPOINT_URL") in line


def test_permission_denied(capsys):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Denied(MemoryFileSystem):
        protocol = "denied"
        root_marker = ""

        def _deny(self, *a, **k):
            raise PermissionError("Access Denied")

        ls = info = cat_file = _cat_file = open = _open = exists = mkdir = makedirs = pipe_file = _deny

    fsspec.register_implementation("denied", Denied, clobber=True)
    from loca_pipe.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["info", "denied://bucket/x.zarr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: ") and "'denied://bucket/x.zarr'" in err[0], err
    assert "permission denied; check that these credentials may read and write the bucket" in err[0], err


def test_a_local_permission_error_is_not_called_remote():
    from loca_pipe.cli.main import _remote_line

    local = PermissionError(13, "Permission denied", "/ro/x.json")
    assert _remote_line(local, ["analyze", "s3://b/x.zarr", "--out", "/ro"]) is None
    assert _remote_line(ValueError("bug"), ["info", "s3://b/x.zarr"]) is None  # a bug keeps its traceback
    refused = ConnectionRefusedError(111, "Connection refused")  # a dask scheduler is not a store
    assert _remote_line(refused, ["analyze", "s.zarr", "--scheduler", "tcp://127.0.0.1:8786"]) is None
    remote = PermissionError("Access Denied")
    assert "'s3://b/x.zarr': permission denied" in _remote_line(remote, ["info", "s3://b/x.zarr"])
