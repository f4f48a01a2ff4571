"""Stage one: store vs live teacher, resume after SIGKILL, bad inputs, user modules, teachers, views, CLI."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from loca_pipe.pipeline import augment, data, models
from loca_pipe.pipeline.errors import (
    ConfigError,
    DataError,
    IncompleteStoreError,
    ModelError,
    NumericsError,
    StoreConflictError,
    StoreError,
)
from loca_pipe.pipeline.store import LogitStore
from loca_pipe.stages.cache_logits import CacheParams, load_params, run
from tests.helpers import kill_after_done_chunks

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FMNIST_ROOT = str(REPO / "data" / "fashion-mnist")
TAUS = (1.0, 4.0)
TEACHER_ARRAYS = ("logits", "topk_logits", "topk_ids", "lse", "label_logit", "done")
ROW_ARRAYS = ("sample_id", "label", "view", "rows_done")


@pytest.fixture(autouse=True)
def _toy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def toy(tmp_path: Path, **kw) -> CacheParams:
    base = dict(teacher="toy_cache_module:teacher", dataset="toy_cache_module:dataset", store=str(tmp_path / "s.zarr"),
                top_k=3, temperatures=TAUS, chunk_rows=8, batch_size=3, device="cpu", num_workers=0, progress=False)
    base.update(kw)
    return CacheParams(**base)


def live_batches(model, images: torch.Tensor, chunk_rows: int, batch_size: int) -> torch.Tensor:
    """Independent replay of the stage's batching: batches of ``batch_size`` starting at every chunk start."""
    outs = []
    with torch.inference_mode():
        for c0 in range(0, len(images), chunk_rows):
            for b in range(c0, min(len(images), c0 + chunk_rows), batch_size):
                outs.append(model(images[b:min(b + batch_size, c0 + chunk_rows, len(images))]))
    return torch.cat(outs).float()


def check_against_live(view, z: torch.Tensor, labels: np.ndarray, k: int):
    """Store arrays vs logits z (R, C) computed live: full exact, top-k, lse at each τ, label logit."""
    np.testing.assert_array_equal(view["logits"][:], z.numpy())
    ref_ids = torch.topk(z.double(), k, dim=1).indices.numpy()
    np.testing.assert_array_equal(view["topk_ids"][:], ref_ids)
    np.testing.assert_array_equal(view["topk_logits"][:], np.take_along_axis(z.numpy(), ref_ids, 1))
    for t, tau in enumerate(view.temperatures):
        ref = torch.logsumexp(z.double() / tau, dim=1).numpy()
        np.testing.assert_allclose(view["lse"][:, t], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(view["label_logit"][:], z.numpy()[np.arange(len(labels)), labels])
    np.testing.assert_array_equal(view["label"][:], labels)


# ---------------------------------------------------------------------------------------------------
# Real data: Fashion-MNIST rows, a real checkpoint with its sidecar, and the documented zarr-only reader


@pytest.fixture(scope="module")
def fmnist_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fm")
    torch.manual_seed(3)
    model = models.build_model("cnn_small", 10, in_channels=1, image_size=28)
    ckpt = tmp / "teacher.pt"
    torch.save(model.state_dict(), ckpt)
    Path(f"{ckpt}.json").write_text(json.dumps({"arch": "cnn_small", "num_classes": 10, "dataset": "fashion-mnist"}))
    p = CacheParams(checkpoint=str(ckpt), dataset="fashion-mnist", root=FMNIST_ROOT, store=str(tmp / "fm.zarr"),
                    top_k=3, max_samples=300, chunk_rows=128, batch_size=50, device="cpu", progress=False)
    run(p)
    return p, model.eval()


def test_round_trip_fashion_mnist_vs_live_teacher(fmnist_store):
    p, model = fmnist_store
    store = LogitStore.open(p.store)
    view = store.teacher("teacher")  # name = checkpoint stem; arch came from the sidecar
    assert view.attrs["teacher"] == "cnn_small" and view.attrs["complete"] is True
    assert view.attrs["checkpoint_sha256"] == models.file_sha256(p.checkpoint)
    spec = data.open_dataset("fashion-mnist", "train", FMNIST_ROOT)
    assert store.info.dataset["fingerprint"] == spec.fingerprint and store.info.num_rows == 300
    images, labels = data.get_batch(spec.dataset, np.arange(300))
    z = live_batches(model, images, p.chunk_rows, p.batch_size)
    check_against_live(view, z, labels.numpy(), 3)
    np.testing.assert_array_equal(view["sample_id"][:], np.arange(300))
    # exact probabilities through the library reader
    ref = torch.softmax(z.double() / 4.0, dim=1).numpy()
    sp = view.sparse(4.0)
    np.testing.assert_allclose(sp["topk_probs"], np.take_along_axis(ref, sp["topk_ids"], 1), rtol=1e-5)
    np.testing.assert_allclose(sp["label_prob"], ref[np.arange(300), labels.numpy()], rtol=1e-5)


def _doc_snippet() -> str:
    text = (REPO / "docs" / "store-format.md").read_text()
    block = text.split("<!-- reader-snippet -->", 1)[1]
    m = re.search(r'```sh\npython -c "\n(.*?)\n" path/to/store\.zarr\n```', block, re.S)
    assert m, "docs/store-format.md lost its reader snippet"
    return m.group(1)


def test_documented_zarr_only_reader_matches_live_teacher(fmnist_store):
    p, model = fmnist_store
    out = subprocess.run([sys.executable, "-c", _doc_snippet(), p.store], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    rows = np.array(got["rows"])
    assert got["teacher"] == "teacher" and got["tau"] == 4.0 and len(rows) == 5
    spec = data.open_dataset("fashion-mnist", "train", FMNIST_ROOT)
    images, labels = data.get_batch(spec.dataset, np.arange(300))
    z = live_batches(model, images, p.chunk_rows, p.batch_size)[rows].double()
    ref = torch.softmax(z / 4.0, dim=1).numpy()
    np.testing.assert_array_equal(got["sample_id"], rows)
    np.testing.assert_array_equal(got["label"], labels.numpy()[rows])
    np.testing.assert_array_equal(got["topk_ids"], torch.topk(z, 3, dim=1).indices.numpy())
    np.testing.assert_allclose(got["p_topk"], np.take_along_axis(ref, np.array(got["topk_ids"]), 1), rtol=1e-5)
    np.testing.assert_allclose(got["p_label"], ref[np.arange(5), labels.numpy()[rows]], rtol=1e-5)
    np.testing.assert_array_equal(np.array(got["logits"], dtype=np.float32), z.float().numpy())


def _file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, st_mtime_ns, size) of every file under ``folder``: any rewrite — zarr renames a new file into
    place — changes the inode even within one tick of the clock (attrs["finished"] has 1 s resolution)."""
    out = {}
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            st = f.stat()
            out[f.relative_to(folder).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def test_rerun_of_complete_teacher_is_a_no_op(fmnist_store):
    p, _ = fmnist_store
    before = _file_stamps(Path(p.store))
    assert any("/logits/c/" in k for k in before)  # the chunk files are among the stamped files
    run(p)
    assert _file_stamps(Path(p.store)) == before  # no chunk, flag or attribute file was rewritten


# ---------------------------------------------------------------------------------------------------
# A user module:callable data set and teacher; two teachers in one store; views; top-k only


def _toy_live(fn: str, split: str = "train") -> tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    import toy_cache_module as tm

    model = getattr(tm, fn)(5, 1, 8).eval()
    ds = tm.dataset(split)
    return model, ds.images.clone(), np.asarray(ds.targets, dtype=np.int64)


def test_user_module_teacher_and_dataset(tmp_path):
    p = toy(tmp_path)
    run(p)
    view = LogitStore.open(p.store).teacher("teacher")
    model, images, labels = _toy_live("teacher")
    check_against_live(view, live_batches(model, images, 8, 3), labels, 3)
    assert view.attrs["checkpoint_sha256"] is None and view.attrs["teacher"] == "toy_cache_module:teacher"


def test_two_teachers_share_one_store_and_info(tmp_path):
    run(toy(tmp_path))
    run(toy(tmp_path, teacher="toy_cache_module:teacher_b", logits_dtype="none", chunk_rows=None))  # adopts 8
    store = LogitStore.open(str(tmp_path / "s.zarr"))
    assert store.teachers == ["teacher", "teacher_b"]
    b = store.teacher("teacher_b")
    assert not b.has_full_logits
    model, images, labels = _toy_live("teacher_b")
    z = live_batches(model, images, 8, 3)
    np.testing.assert_array_equal(b["topk_ids"][:], torch.topk(z, 3, dim=1).indices.numpy())
    np.testing.assert_array_equal(b["label_logit"][:], z.numpy()[np.arange(40), labels])
    # CLI: human summary and JSON
    from loca_pipe.cli.main import app

    res = CliRunner().invoke(app, ["info", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    assert "40 = 40 samples x 1 view(s); 5 classes; 5 chunks of 8 rows" in res.output
    assert "teacher_b: complete; top-k 3; temperatures [1.0, 4.0]; full logits no" in res.output
    res = CliRunner().invoke(app, ["info", str(tmp_path / "s.zarr"), "--json"])
    d = json.loads(res.output)
    assert d["teachers"]["teacher"]["logits_dtype"] == "float32" and d["teachers"]["teacher_b"]["full_logits"] is False


def test_views_store_replayable_aug_params(tmp_path):
    p = toy(tmp_path, views=3, view_seed=7, chunk_rows=10, batch_size=7)
    run(p)
    store = LogitStore.open(p.store)
    assert store.info.num_rows == 120 and store.info.chunk_rows == 9  # rounded down to whole samples
    assert store.info.aug_param_names == ("top", "left", "flip")
    view = store.teacher("teacher")
    sid = np.repeat(np.arange(40), 3)
    v = np.tile(np.arange(3), 40)
    np.testing.assert_array_equal(view["sample_id"][:], sid)
    np.testing.assert_array_equal(view["view"][:], v)
    aug = augment.make_augmenter("crop-flip", 7, 8)
    ref_params = np.stack([aug.sample_params(np.arange(40), k) for k in range(3)], axis=1).reshape(120, 3)
    np.testing.assert_array_equal(view["aug_params"][:], ref_params)
    model, images, labels = _toy_live("teacher")
    x = aug.apply(images[sid], torch.from_numpy(view["aug_params"][:]))
    assert not torch.equal(x[::3], images)  # augmented views, not the clean image
    # the stage forwards batch_size // V = 2 samples (6 rows) per pass, starting at each chunk (3 samples)
    outs = []
    with torch.inference_mode():
        for c0 in range(0, 120, 9):
            for b in range(c0, min(120, c0 + 9), 6):
                outs.append(model(x[b:min(b + 6, c0 + 9)]))
    check_against_live(view, torch.cat(outs), labels[sid], 3)


def test_load_params_per_teacher_overrides(tmp_path):
    cfg = {"cache": {"dataset": "toy_cache_module:dataset", "top_k": 2, "store": "x.zarr",
                     "teachers": {"a": {"teacher": "toy_cache_module:teacher"},
                                  "b": {"teacher": "toy_cache_module:teacher_b", "top_k": 4}}}}
    both = load_params(cfg, overrides={"store": "y.zarr"})
    assert [(q.name, q.teacher, q.top_k, q.store) for q in both] == [
        ("a", "toy_cache_module:teacher", 2, "y.zarr"), ("b", "toy_cache_module:teacher_b", 4, "y.zarr")]
    assert [q.name for q in load_params(cfg, teacher_key="b")] == ["b"]
    with pytest.raises(ConfigError, match=r"cache.teachers has no entry 'c'; it has \['a', 'b'\]"):
        load_params(cfg, teacher_key="c")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['topk'\]"):
        load_params({"cache": {"topk": 3}})
    assert load_params({"cache": {"teacher": "mlp"}}, overrides={"temperatures": [2.0]})[0].temperatures == (2.0,)


def test_shards_fill_one_store_identically(tmp_path, monkeypatch):
    from loca_pipe.pipeline import caching

    monkeypatch.setattr(caching, "SHARD_WAIT_SECONDS", 0.3)
    sharded = toy(tmp_path, store=str(tmp_path / "sh.zarr"), num_shards=2)
    with pytest.raises(StoreError, match=r"shard 1 of 2 waited 0 s for shard 0 to create teacher 'teacher'"):
        run(replace(sharded, shard=1))  # shard 0 has not created the store: never created by shard 1
    assert not (tmp_path / "sh.zarr").exists()
    run(replace(sharded, shard=0))
    store = LogitStore.open(sharded.store)
    assert store.pending_chunks("teacher") == [1, 3] and not store.is_complete("teacher")
    monkeypatch.setenv("RANK", "1")  # torchrun's variables are the defaults
    monkeypatch.setenv("WORLD_SIZE", "2")
    run(replace(sharded, num_shards=None))
    assert store.is_complete("teacher")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    run(toy(tmp_path))
    for k in TEACHER_ARRAYS:
        assert np.array_equal(store.teacher("teacher")[k][:], LogitStore.open(str(tmp_path / "s.zarr")).teacher("teacher")[k][:]), k
    with pytest.raises(ConfigError, match=r"shard must be in \[0, num_shards\).*got shard 2 of 2"):
        run(replace(sharded, shard=2))


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear LocaError each, and nothing already written lost


def _other_checkpoint(tmp_path: Path) -> str:
    ck = tmp_path / "mlp.pt"
    torch.save(models.build_model("mlp_small", 5, 1, 8).state_dict(), ck)
    return str(ck)


@pytest.mark.parametrize("kw, err, match", [
    (dict(dataset="toy_cache_module:bad_label_dataset"), DataError, r"labels"),
    (dict(top_k=6), ConfigError, r"--top-k must be in \[1, 5\].*got 6"),
    (dict(top_k=0), ConfigError, r"--top-k must be at least 1; got 0"),
    (dict(teacher="toy_cache_module:wrong_shape_teacher"), ModelError,
     r"teacher output must have shape \(batch, classes\) = \(3, 5\); got \(3, 6\)"),
    (dict(teacher="nope_net"), ModelError, r"unknown model 'nope_net'.*Valid names"),
    (dict(dataset="nope-set"), DataError, r"unknown data set 'nope-set'; valid names are"),
    (dict(teacher=None), ConfigError, r"give --teacher"),
    (dict(checkpoint="missing.pt"), ModelError, r"checkpoint 'missing.pt' not found"),
    (dict(teacher="toy_cache_module:teacher", checkpoint="OTHER"), ModelError,
     r"does not fit Linear: missing keys: fc.weight"),
    (dict(temperatures=(1.0, -2.0)), ConfigError, r"--temperatures must be positive numbers"),
    (dict(views=-1), ConfigError, r"views must be at least 0"),
])
def test_bad_input(tmp_path, kw, err, match):
    if kw.get("checkpoint") == "OTHER":
        kw["checkpoint"] = _other_checkpoint(tmp_path)
    with pytest.raises(err, match=match):
        run(toy(tmp_path, **kw))


def test_checkpoint_sidecar_must_describe_the_checkpoint(tmp_path):
    ck = tmp_path / "lin.pt"
    torch.save(_toy_live("teacher")[0].state_dict(), ck)
    Path(f"{ck}.json").write_text(json.dumps({"arch": "toy_cache_module:teacher", "num_classes": 5, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match=r"sidecar of checkpoint .* describes another file \(sha256 000000000000…"):
        run(toy(tmp_path, teacher=None, checkpoint=str(ck)))
    Path(f"{ck}.json").write_text(json.dumps({"arch": "toy_cache_module:teacher", "num_classes": 4}))
    with pytest.raises(ModelError, match=r"is for 4 classes but data set .* has 5"):
        run(toy(tmp_path, teacher=None, checkpoint=str(ck)))
    Path(f"{ck}.json").write_text(json.dumps({"arch": "toy_cache_module:teacher", "num_classes": 5,
                                              "sha256": models.file_sha256(ck)}))
    run(toy(tmp_path, teacher=None, checkpoint=str(ck)))
    assert LogitStore.open(str(tmp_path / "s.zarr")).teacher("lin").attrs["teacher"] == "toy_cache_module:teacher"


@pytest.mark.parametrize("teacher, dtype, err, match", [
    ("nan_teacher", "float32", NumericsError, r"NaN or inf logits for 1 row\(s\) \[11\]"),
    ("huge_teacher", "float16", NumericsError, r"sample ids \[11\] exceed the float16 range; cache with --logits-dtype float32"),
])
@pytest.mark.parametrize("threaded", [False, True])
def test_bad_numbers_name_samples_and_keep_finished_chunks(tmp_path, monkeypatch, teacher, dtype, err, match, threaded):
    from loca_pipe.pipeline import caching

    if threaded:  # summaries in the Summarizer thread (what a large CPU or any GPU batch gets)
        monkeypatch.setattr(caching, "SMALL_OP_ELEMENTS", 0)
    p = toy(tmp_path, teacher=f"toy_cache_module:{teacher}", logits_dtype=dtype)
    with pytest.raises(err, match=match):
        run(p)
    store = LogitStore.open(p.store)
    assert store.pending_chunks(teacher) == [1, 2, 3, 4]  # chunk 0 (rows 0..7) finished and kept
    with pytest.raises(IncompleteStoreError, match="is incomplete"):
        store.teacher(teacher)


def test_store_of_another_dataset_refused_unless_overwrite(tmp_path):
    run(toy(tmp_path))
    with pytest.raises(StoreConflictError, match=r"belongs to another data set.*dataset.fingerprint.*--overwrite"):
        run(toy(tmp_path, dataset="toy_cache_module:other_dataset"))
    assert LogitStore.open(str(tmp_path / "s.zarr")).is_complete("teacher")  # untouched
    run(toy(tmp_path, dataset="toy_cache_module:other_dataset", overwrite=True))
    model, _, _ = _toy_live("teacher")
    import toy_cache_module as tm

    z = live_batches(model, tm.other_dataset().images, 8, 3)
    np.testing.assert_array_equal(LogitStore.open(str(tmp_path / "s.zarr")).teacher("teacher")["logits"][:], z.numpy())


def test_other_teacher_checkpoint_refused_unless_overwrite(tmp_path):
    def ckpt(seed: int) -> str:  # two checkpoints of the toy teacher (its Linear is called fc)
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}" / "lin.pt"
        path.parent.mkdir()
        torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(64, 5).state_dict().items()}, path)
        return str(path)

    run(toy(tmp_path, name="t"))
    a, b = ckpt(1), ckpt(2)
    run(toy(tmp_path, checkpoint=a, name="lin"))
    run(toy(tmp_path, teacher="toy_cache_module:teacher_b", name="other"))  # a second teacher is added
    with pytest.raises(StoreConflictError, match=r"teacher 'lin' already in .*checkpoint_sha256: store has '[0-9a-f]+', this run has"):
        run(toy(tmp_path, checkpoint=b, name="lin"))
    run(toy(tmp_path, checkpoint=b, name="lin", overwrite=True))
    store = LogitStore.open(str(tmp_path / "s.zarr"))
    other = tmp_path / "s.zarr" / "teachers" / "other"
    stamps = _file_stamps(other)
    assert any(k.startswith("topk_logits/c/") for k in stamps)
    run(toy(tmp_path, teacher="toy_cache_module:teacher_b", name="other", overwrite=True))  # identical: kept
    assert _file_stamps(other) == stamps  # not one chunk file of the identical teacher was rewritten
    assert store.teachers == ["lin", "other", "t"] and all(store.is_complete(t) for t in store.teachers)
    assert store.teacher("lin").attrs["checkpoint_sha256"] == models.file_sha256(b)


@pytest.mark.parametrize("code, fail_on, match", [
    (errno.ENOSPC, "teachers/teacher/logits/c/2/", r"while writing chunk 2: the disk is full \(ENOSPC"),
    (errno.EROFS, "", r"while opening the store: the file system is read-only \(EROFS"),
    (errno.EACCES, "", r"permission denied \(EACCES"),
])
def test_full_or_read_only_location(tmp_path, monkeypatch, code, fail_on, match):
    import zarr.storage._local as local

    real = local._put

    def failing_put(path, value, exclusive=False):  # the OSError LocalStore's file write would raise
        if fail_on in Path(path).as_posix() + "/":
            raise OSError(code, os.strerror(code), str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", failing_put)
    with pytest.raises(StoreError, match=match + r".*chunks already finished are kept.*same command again to resume"):
        run(toy(tmp_path))
    monkeypatch.setattr(local, "_put", real)
    if code == errno.ENOSPC:
        store = LogitStore.open(str(tmp_path / "s.zarr"))
        assert store.pending_chunks("teacher") == [2, 3, 4]  # chunks finished before the disk filled are kept
    run(toy(tmp_path))  # the same command resumes once the disk has room
    model, images, labels = _toy_live("teacher")
    check_against_live(LogitStore.open(str(tmp_path / "s.zarr")).teacher("teacher"),
                       live_batches(model, images, 8, 3), labels, 3)


# ---------------------------------------------------------------------------------------------------
# Kill-and-resume: a real subprocess SIGKILLed mid-run, then the same command again


def _cli(store: Path) -> list[str]:
    return [sys.executable, "-m", "loca_pipe.cli.main", "cache-logits", "--teacher", "toy_cache_module:teacher",
            "--dataset", "toy_cache_module:dataset", "--store", str(store), "--top-k", "3", "--chunk-rows", "4",
            "--batch-size", "3", "--device", "cpu", "--num-workers", "0", "--no-progress"]


def _arrays(store: Path) -> dict[str, np.ndarray]:
    s = LogitStore.open(str(store))
    v = s.teacher("teacher")
    out = {k: v[k][:] for k in TEACHER_ARRAYS}
    out.update({k: s.group[k][:] for k in ROW_ARRAYS})
    return out


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = tmp_path / "killed.zarr"
    slow = subprocess.Popen(_cli(killed), env={**env, "LOCA_TEST_SLEEP": "0.25"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    kill_after_done_chunks(slow, killed / "teachers" / "teacher" / "done" / "c", timeout=90)
    assert slow.returncode == -signal.SIGKILL

    store = LogitStore.open(str(killed))
    pending = store.pending_chunks("teacher")
    assert 0 < len(pending) < store.info.num_chunks  # the kill landed mid-run
    with pytest.raises(IncompleteStoreError, match=r"teacher 'teacher' in .* is incomplete .*re-run the same"):
        store.teacher("teacher")
    from loca_pipe.cli.main import app

    res = CliRunner().invoke(app, ["info", str(killed)])
    assert f"INCOMPLETE ({store.info.num_chunks - len(pending)}/{store.info.num_chunks} chunks)" in res.output
    done_chunk = next(c for c in range(store.info.num_chunks) if c not in pending)
    chunk_file = killed / "teachers" / "teacher" / "logits" / "c" / str(done_chunk) / "0"
    mtime = chunk_file.stat().st_mtime_ns

    res = subprocess.run(_cli(killed), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert chunk_file.stat().st_mtime_ns == mtime  # finished chunks were kept, not recomputed
    # an uninterrupted run of the same command (in this process) is the reference
    run(toy(tmp_path, store=str(tmp_path / "ref.zarr"), top_k=3, chunk_rows=4, batch_size=3))
    got, want = _arrays(killed), _arrays(tmp_path / "ref.zarr")
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_cli_error_is_one_line(tmp_path, monkeypatch, capsys):
    from loca_pipe.cli.main import main

    monkeypatch.setattr(sys, "argv", ["loca-pipe"] + _cli(tmp_path / "s.zarr")[3:] + ["--top-k", "9"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: --top-k must be in [1, 5] (the data set has 5 classes); got 9"
    assert "Traceback" not in err


def test_cli_cache_logits_with_params_file(tmp_path):
    from loca_pipe.cli.main import app

    params = tmp_path / "params.yaml"
    params.write_text(f"""cache:
  dataset: toy_cache_module:dataset
  store: {tmp_path / 'p.zarr'}
  top_k: 2
  chunk_rows: 16
  device: cpu
  num_workers: 1
  teachers:
    a: {{teacher: "toy_cache_module:teacher"}}
    b: {{teacher: "toy_cache_module:teacher_b", top_k: 4}}
""")
    res = CliRunner().invoke(app, ["cache-logits", "--params", str(params), "--temperatures", "2,3", "--no-progress"])
    assert res.exit_code == 0, res.output
    store = LogitStore.open(str(tmp_path / "p.zarr"))
    assert store.teachers == ["a", "b"]
    assert store.teacher("b").top_k == 4 and store.teacher("a").temperatures == [2.0, 3.0]


def test_overwrite_recaches_a_complete_teacher_through_the_console_script(tmp_path):
    """#14: `cache-logits … --overwrite` on a complete store re-caches (it used to say "nothing to do")."""
    exe = str(Path(sys.executable).with_name("loca-pipe"))
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    store = tmp_path / "s.zarr"
    cmd = [exe] + _cli(store)[3:]
    assert subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120).returncode == 0
    chunk_file = store / "teachers" / "teacher" / "topk_logits" / "c" / "0" / "0"
    before, want = chunk_file.stat().st_mtime_ns, _arrays(store)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing left to cache (complete); pass --overwrite to re-cache it" in again.stderr
    assert chunk_file.stat().st_mtime_ns == before  # without --overwrite, complete work is kept
    chunk_file.write_bytes(b"corrupt")  # what a user repairs with --overwrite
    res = subprocess.run(cmd + ["--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"teacher 'teacher': 40 rows cached", res.stderr), res.stderr[-2000:]
    got = _arrays(store)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("amp, cause", [
    (False, r"ran in full precision \(no autocast\), so its weights or inputs hold NaN/inf"),
    (True, r"usually an fp16 overflow — cache with autocast off \(--no-amp\)"),
])
def test_nan_message_names_the_right_cause(amp, cause):
    """#14: NaN teacher outputs on CPU (no autocast) must not blame fp16 autocast."""
    from loca_pipe.pipeline.store import summarize_logits

    z = torch.tensor([[0.0, float("nan")], [1.0, 2.0]])
    with pytest.raises(NumericsError, match=cause) as exc:
        summarize_logits(z, torch.tensor([0, 1]), 1, TAUS, amp=amp)
    assert ("fp16" in str(exc.value)) == amp
