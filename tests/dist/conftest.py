"""Shared pieces of the scale-out / reliability tests.

``reliability`` (fixture): a test that tries a fault or a bad input records one row — what was tried, what
the user sees (the error message, normalised: temporary paths, ports, pids, hosts and times replaced), what
was kept. Each row is compared with ``tests/dist/reliability.json`` (the committed record docs/reliability.md
is rendered from) by :func:`check_row` as the test records it, so a fault test fails on its own when its row
drifts, whatever else runs; ``python -m tests.dist.make_reliability_doc`` (``LOCA_RELIABILITY_OUT`` set)
re-runs the tests and rewrites both instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES_TESTS = REPO / "tests" / "stages"
RECORD = HERE / "reliability.json"
SESSION_ROWS: dict[str, dict[str, str]] = {}
HINT = "run `python -m tests.dist.make_reliability_doc` and commit docs/reliability.md + tests/dist/reliability.json"


def check_row(key: str, row: dict[str, str], record: dict[str, dict[str, str]] | None = None) -> None:
    """A row a fault test just recorded must be the committed record's row (AssertionError with the fix)."""
    record = json.loads(RECORD.read_text()) if record is None else record
    assert key in record, f"new fault row {key!r}; {HINT}"
    assert record[key] == row, f"row {key!r} changed: {row} vs {record[key]}; {HINT}"


def normalise(text: str) -> str:
    text = str(text)
    text = re.sub(r"/[^\s'\"]*/pytest-of-[^/]+/pytest-\d+/[^/\s'\"]+", "<tmp>", text)
    text = text.replace(socket.gethostname(), "<host>")
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text)
    text = re.sub(r"pid \d+", "pid <pid>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "<time>", text)
    text = re.sub(r"torchrun:<host>:\d+:\d*", "torchrun:<host>:<agent>:<port>", text)
    text = re.sub(r"<host>:\d+", "<host>:<pid>", text)
    text = re.sub(r"job test-job-[0-9a-f]+", "job <other-job>", text)
    return text


@pytest.fixture
def reliability(request):
    """record(key, tried, seen, kept): one row of the fault / bad-input table."""

    def record(key: str, tried: str, seen: str, kept: str) -> None:
        row = {"tried": tried, "seen": normalise(seen), "kept": kept,
               "test": f"{Path(request.node.fspath).name}::{request.node.originalname}"}
        SESSION_ROWS[key] = row
        if not os.environ.get("LOCA_RELIABILITY_OUT"):  # regenerating: rows may change
            check_row(key, row)

    return record


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("LOCA_RELIABILITY_OUT")
    if out and SESSION_ROWS:
        old = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        old.update(SESSION_ROWS)
        Path(out).write_text(json.dumps(dict(sorted(old.items())), indent=1, ensure_ascii=False) + "\n")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: the toy modules importable, one torch thread, no proxies."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STAGES_TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "LOCA_JOB_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "loca_pipe.cli.main", *args]


if str(STAGES_TESTS) not in sys.path:  # the toy data sets / teachers of the stage tests (module:callable)
    sys.path.insert(0, str(STAGES_TESTS))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, random port; yields its endpoint URL.

    Dummy credentials and AWS_ENDPOINT_URL are set for this process (s3fs / botocore read them) and passed
    to children; only loopback traffic.
    """
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in CLI output

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "NO_PROXY", "no_proxy")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
