"""Stores on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1, random port.

cache-logits writes ``s3://…``, ``info`` / readers / analyze / train-student read it; results equal the same
work on a local folder. Only loopback traffic; credentials are dummies.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from loca_pipe.pipeline.distributed import WriterLease
from loca_pipe.pipeline.errors import StoreConflictError, StoreError
from loca_pipe.pipeline.store import LogitStore
from loca_pipe.stages.cache_logits import run

from .test_faults import arrays, assert_same, toy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("loca-test")
    return "s3://loca-test"


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "s.zarr"
    run(toy(path))
    return path


def test_cache_info_and_read_on_s3_equal_local(bucket, local_ref, tmp_path, reliability):
    url = f"{bucket}/s.zarr"
    run(toy(url))
    assert_same(arrays(url), arrays(local_ref))
    lease = WriterLease(url, "teacher")
    assert lease.location == "s3://loca-test/s.zarr/rows_done/writer-teacher.lease" and lease.read() is None
    run(toy(url))  # a re-run over S3 is a no-op
    from loca_pipe.cli.main import app

    res = CliRunner().invoke(app, ["info", url, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{"):])
    assert d["path"] == url and d["teachers"]["teacher"]["complete"] is True and d["num_rows"] == 40
    view = LogitStore.open(url).teacher("teacher")
    want = LogitStore.open(str(local_ref)).teacher("teacher")
    np.testing.assert_array_equal(view.probs(4.0, rows=[3, 31]), want.probs(4.0, rows=[3, 31]))

    # a second job on the same teacher: the lease object is created with a conditional put (If-None-Match)
    import os

    os.environ["LOCA_JOB_ID"] = "job-a"
    try:
        assert WriterLease(url, "teacher").acquire()["job"] == "job-a"
        os.environ["LOCA_JOB_ID"] = "job-b"
        with pytest.raises(StoreConflictError, match=r"being written by another job \(job job-a.*delete the lease "
                                                     r"file 's3://loca-test/s\.zarr/rows_done/writer-teacher\.lease'") as err:
            run(toy(url, overwrite=True))
        os.environ["LOCA_JOB_ID"] = "job-a"
        WriterLease(url, "teacher").release()
    finally:
        os.environ.pop("LOCA_JOB_ID", None)
    reliability("two-writers-s3", "a second job starts writing a teacher of an s3:// store another job holds",
                str(err.value).replace("job job-a", "job <other-job>"),
                "the holder's lease object and every chunk (conditional put: the second create gets HTTP 412)")


def test_missing_bucket_is_a_store_error(bucket, reliability):
    with pytest.raises(StoreError, match=r"no logit store at 's3://no-such-bucket/s\.zarr'") as err:
        LogitStore.open("s3://no-such-bucket/s.zarr")
    reliability("missing-bucket", "a reader given an s3:// URL whose bucket does not exist", str(err.value),
                "nothing is read or written")


def test_memory_url_store(local_ref):
    run(toy("memory://h7/s.zarr"))
    assert_same(arrays("memory://h7/s.zarr"), arrays(local_ref))


def test_analyze_and_train_student_read_s3(bucket, local_ref, tmp_path):
    url = f"{bucket}/s.zarr"
    if not LogitStore.open(url).teachers if _exists(url) else True:
        run(toy(url))
    from loca_pipe.stages.analyze import AnalyzeParams, run as analyze

    common = dict(tau=4.0, alpha=(0.95,), figures=False, samples=False)
    a_s3 = analyze(AnalyzeParams(store=url, out=str(tmp_path / "a_s3"), **common))
    a_local = analyze(AnalyzeParams(store=str(local_ref), out=str(tmp_path / "a_local"), **common))
    # every metric equal; only "teacher" (the provenance record, with its creation time) differs
    t_s3, t_local = a_s3["teachers"]["teacher"], a_local["teachers"]["teacher"]
    assert {k for k in t_s3 if t_s3[k] != t_local.get(k)} <= {"teacher"}, \
        {k: (t_s3[k], t_local.get(k)) for k in t_s3 if t_s3[k] != t_local.get(k)}

    # calibrate reads the S3 store (targets written locally): the same target arrays as from the local store
    import zarr

    from loca_pipe.stages.calibrate import CalibrateParams
    from loca_pipe.stages.calibrate import run as calibrate

    for src, out in ((url, tmp_path / "t_s3.zarr"), (str(local_ref), tmp_path / "t_local.zarr")):
        calibrate(CalibrateParams(store=src, out=str(out), alpha=(0.9,), tau=4.0, metrics=str(out) + ".json"))
    g_s3 = zarr.open_group(str(tmp_path / "t_s3.zarr"), mode="r")["teachers"]["teacher"]
    g_local = zarr.open_group(str(tmp_path / "t_local.zarr"), mode="r")["teachers"]["teacher"]
    assert sorted(g_s3.array_keys()) == sorted(g_local.array_keys()) and len(list(g_s3.array_keys())) >= 2
    for k in g_local.array_keys():
        np.testing.assert_array_equal(g_s3[k][...], g_local[k][...], err_msg=k)

    from loca_pipe.stages.train_student import TrainStudentParams
    from loca_pipe.stages.train_student import run as train

    kw = dict(teacher="teacher", dataset="toy_cache_module:dataset", student="mlp_small", epochs=1, batch_size=8,
              lr=0.05, device="cpu", progress=False, threads=1, method="loca", alpha=0.9, eval_split="test")
    m_s3 = train(TrainStudentParams(store=url, out_dir=str(tmp_path / "s3runs"), **kw))
    m_local = train(TrainStudentParams(store=str(local_ref), out_dir=str(tmp_path / "localruns"), **kw))
    for k in ("train_loss", "train_top1", "test_top1", "test_top5"):
        assert m_s3[k] == m_local[k], k


def _exists(url: str) -> bool:
    try:
        LogitStore.open(url)
        return True
    except StoreError:
        return False
