"""The store's array table (pipeline/layout.py) and the on-disk format it must keep byte for byte.

``store_layout_frozen.json`` holds every ``zarr.json`` of a tiny image store and a tiny token store as the
code wrote them before the table existed (volatile attributes — times, versions — removed); a store written
now must match it exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from loca_pipe.pipeline.store import LogitStore, StoreInfo

FROZEN = Path(__file__).with_name("store_layout_frozen.json")
VOLATILE = ("created", "finished", "versions")


def _metadata(root: Path) -> dict[str, dict]:
    out = {}
    for dirpath, _, files in os.walk(root):
        if "zarr.json" in files:
            rel = os.path.relpath(dirpath, root)
            meta = json.loads((Path(dirpath) / "zarr.json").read_text())
            for a in meta.get("attributes", {}).values():
                if isinstance(a, dict):
                    for k in VOLATILE:
                        a.pop(k, None)
            out[rel] = meta
    return dict(sorted(out.items()))


def _image_store(path: Path) -> None:
    R, C, V = 12, 7, 2
    info = StoreInfo(task="classification", num_samples=R // V, num_views=V, num_rows=R, num_classes=C,
                     chunk_rows=4, dataset={"name": "t", "split": "train", "fingerprint": "fp"},
                     aug_param_names=("top", "left", "flip"))
    s = LogitStore.create_or_open(str(path), info)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(R, C)).astype(np.float32)
    lab = rng.integers(0, C, R)
    for name, kw in (("full", dict(logits_dtype="float16", compress_logits=True)), ("topk", dict(logits_dtype=None))):
        w = s.begin_teacher(name, {"teacher_sha256": "x"}, top_k=3, temperatures=[1.0, 4.0], **kw)
        for c in range(info.num_chunks):
            sl = info.chunk_slice(c)
            s.write_rows(c, np.arange(sl.start, sl.stop) // V, lab[sl], np.arange(sl.start, sl.stop) % V,
                         np.zeros((sl.stop - sl.start, 3), np.float32))
            zz = torch.as_tensor(z[sl])
            top = torch.topk(zz, 3, dim=1)
            lse = torch.stack([torch.logsumexp(zz / t, 1) for t in (1.0, 4.0)], 1)
            w.write_chunk(c, {"topk_logits": top.values.numpy(), "topk_ids": top.indices.numpy(), "lse": lse.numpy(),
                              "label_logit": z[sl][np.arange(sl.stop - sl.start), lab[sl]], "logits": z[sl]})
        assert w.finalize()


def _token_store(path: Path) -> None:
    from loca_pipe.pipeline.lm import cache, models
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    ids = [rng.integers(3, 40, n).astype(np.int64) for n in (5, 7, 6, 9, 4)]
    enc = Encoded(ids=ids, prompt_len=np.array([2, 3, 2, 4, 2], np.int64))
    model = models.build_lm("llama", 40, 16, 1, 2, 32, None, seed=0).eval()
    for name, kw in (("a", dict(codec="compact", sample_draws=2, greedy_max_new_tokens=3, greedy_chunk=2)),
                     ("b", dict(logits_dtype="float32"))):
        rep = cache.cache_teacher(str(path), name, model, enc, pad_id=0, eos_id=2, top_k=4, temperatures=(1.0, 2.0),
                                  dataset={"name": "t", "split": "train", "fingerprint": "fp"},
                                  provenance={"teacher_sha256": "y"}, chunk_rows=8, batch_size=4, **kw)
        assert rep.complete


def _both(tmp_path: Path) -> dict[str, dict]:
    from loca_pipe.pipeline.targets import write_targets

    _image_store(tmp_path / "img")
    _token_store(tmp_path / "tok")
    write_targets(str(tmp_path / "img"), str(tmp_path / "tgt"), [0.9], 4.0)  # "full" → dense, "topk" → sparse
    out = {"image": _metadata(tmp_path / "img"), "token": _metadata(tmp_path / "tok"),
           "targets": _metadata(tmp_path / "tgt")}
    for meta in out["targets"].values():  # its group attributes hold paths and times: the arrays are what counts here
        if meta["node_type"] == "group":
            meta["attributes"] = {}
    return out


def test_store_metadata_is_unchanged(tmp_path):
    """Every zarr.json (shapes, chunks, dtypes, codecs, fill values, dimension names, attributes) as before."""
    got = _both(tmp_path)
    if os.environ.get("LOCA_FREEZE_LAYOUT"):  # how the frozen file was made (on the code before the table)
        FROZEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(FROZEN.read_text())
    assert got.keys() == want.keys()
    for kind in want:
        assert sorted(got[kind]) == sorted(want[kind]), kind
        for node, meta in want[kind].items():
            assert got[kind][node] == meta, f"{kind}: {node}"


def _tiny_token_store(path: Path, temperatures=(1.0, 2.0), **kw) -> None:
    from loca_pipe.pipeline.lm import cache, models
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    rng = np.random.default_rng(1)
    ids = [rng.integers(3, 40, n).astype(np.int64) for n in (5, 7, 6, 9, 4)]
    enc = Encoded(ids=ids, prompt_len=np.array([2, 3, 2, 4, 2], np.int64))
    model = models.build_lm("llama", 40, 16, 1, 2, 32, None, seed=0).eval()
    rep = cache.cache_teacher(str(path), "t", model, enc, pad_id=0, eos_id=2, top_k=4, temperatures=temperatures,
                              dataset={"name": "t", "split": "train", "fingerprint": "fp"},
                              provenance={"teacher_sha256": "y"}, chunk_rows=8, batch_size=4, **kw)
    assert rep.complete


# τ asked for → index among the declared (0.5, 2.0) under relative tolerance 1e-6 (None: not declared)
TAU_CASES = [(0.5, 0), (0.5 + 3e-7, 0), (0.5 + 7e-7, None), (0.5 - 7e-7, None), (2.0, 1), (2.0 * (1 + 5e-7), 1),
             (2.0 * (1 + 3e-6), None), (3.0, None)]


def test_every_reader_uses_the_one_tau_rule(tmp_path):
    """TeacherView, the in-memory LM cache and the streamed TokenTeacher find the same τ (the streamed one
    used an absolute tolerance 1e-6 below τ = 1: 0.5 + 7e-7 was accepted as 0.5 there, refused elsewhere)."""
    from loca_pipe.pipeline.errors import StoreError
    from loca_pipe.pipeline.lm.cache import open_lm_cache
    from loca_pipe.pipeline.lm.streaming import TokenTeacher
    from loca_pipe.pipeline.store import find_tau

    _tiny_token_store(tmp_path / "s", temperatures=(0.5, 2.0))
    readers = {"TeacherView": LogitStore.open(str(tmp_path / "s")).teacher("t"),
               "LMTeacherCache": open_lm_cache(str(tmp_path / "s")), "TokenTeacher": TokenTeacher(str(tmp_path / "s"))}
    for tau, want in TAU_CASES:
        assert find_tau((0.5, 2.0), tau) == want, tau
        for name, r in readers.items():
            if want is None:
                with pytest.raises(StoreError, match="not declared"):
                    r.tau_index(tau)
            else:
                assert r.tau_index(tau) == want, (name, tau)


def test_the_streamed_reader_serves_every_row_array_of_the_table(tmp_path):
    """TokenTeacher's arrays come from the table: every row array of a real token store (the image-only view
    index and the full logits aside), the codec's own arrays as the decoded top-k."""
    from loca_pipe.pipeline.lm.streaming import NOT_SERVED, TokenTeacher

    _tiny_token_store(tmp_path / "tok", codec="compact", sample_draws=2, logits_dtype="float16")
    store = LogitStore.open(str(tmp_path / "tok"))
    R = store.info.num_rows
    rows = {k for k, a in store.group.arrays() if a.shape[:1] == (R,)}
    rows |= {k for k, a in store.teacher("t").group.arrays() if a.shape[:1] == (R,)}
    from loca_pipe.pipeline.codecs import codec_of

    view = store.teacher("t")
    coded = set(codec_of(view.attrs).arrays(store.info.num_classes, view.top_k, len(view.temperatures)))
    assert "topk_code" in coded and coded <= rows, "the compact codec's own arrays"
    want = (rows - coded - set(NOT_SERVED)) | {"topk_logits", "topk_ids"}
    assert "logits" in rows and "sampled_counts" in want and "position" in want
    assert set(TokenTeacher(str(tmp_path / "tok")).keys) == want


REPO = Path(__file__).resolve().parents[2]


def _docs_table() -> str:
    text = (REPO / "docs" / "store-format.md").read_text()
    begin, end = "<!-- BEGIN ARRAY TABLE (generated by pipeline.layout.render_layout) -->\n", "<!-- END ARRAY TABLE -->"
    assert begin in text and end in text, "docs/store-format.md lost its array table markers"
    return text.split(begin, 1)[1].split(end, 1)[0].rstrip("\n")


def test_docs_array_table_is_the_table():
    """docs/store-format.md's array table is what pipeline/layout.py declares (regenerate it with
    ``python -c 'from loca_pipe.pipeline import layout; print(layout.render_layout())'``)."""
    from loca_pipe.pipeline import layout

    assert _docs_table() == layout.render_layout()


def test_docs_table_lists_every_array_a_store_holds(tmp_path):
    """Independent of the renderer: every array name found in a real image and token store is a row of the docs
    table (a codec's own arrays aside, which the codec table lists)."""
    _image_store(tmp_path / "img")
    _tiny_token_store(tmp_path / "tok", sample_draws=2, greedy_max_new_tokens=2, greedy_chunk=2)
    documented = {line.split("`")[1] for line in _docs_table().splitlines()[2:]}
    found = {Path(k).name for kind in ("img", "tok") for k in _metadata(tmp_path / kind) if k != "."}
    found -= {"teachers", "full", "topk", "t"}
    assert found and found <= documented, found - documented


def test_new_array_is_one_table_entry(tmp_path, monkeypatch):
    """A new teacher array declared by one temporary table entry is created, demanded and written by the chunk
    writer, read through TeacherView and walked (and repaired) by verify — no other edit."""
    from dataclasses import replace

    from loca_pipe.pipeline import layout
    from loca_pipe.pipeline.errors import StoreError
    from loca_pipe.pipeline.store import invalidate_chunks, verify_store

    base = layout.spec("label_logit")
    assert base is not None
    new = replace(base, name="margin", doc="top-1 minus top-2 logit")
    monkeypatch.setattr(layout, "ARRAYS", layout.ARRAYS + (new,))
    R, C = 8, 5
    info = StoreInfo(task="classification", num_samples=R, num_views=1, num_rows=R, num_classes=C, chunk_rows=4,
                     dataset={"name": "t", "split": "train", "fingerprint": "fp"})
    s = LogitStore.create_or_open(str(tmp_path / "s"), info)
    w = s.begin_teacher("t", {"teacher_sha256": "x"}, top_k=2, temperatures=[1.0])
    assert "margin" in w.group and w.group["margin"].shape == (R,)
    assert w.group["margin"].metadata.dimension_names == ("row",)
    z = np.random.default_rng(0).normal(size=(R, C)).astype(np.float32)
    lab = np.arange(R) % C
    for c in range(info.num_chunks):
        sl = info.chunk_slice(c)
        s.write_rows(c, np.arange(sl.start, sl.stop), lab[sl], np.zeros(sl.stop - sl.start, np.int16))
        zz = torch.as_tensor(z[sl])
        top = torch.topk(zz, 2, dim=1)
        arrays = {"topk_logits": top.values.numpy(), "topk_ids": top.indices.numpy(),
                  "lse": torch.logsumexp(zz, 1, keepdim=True).numpy(), "logits": z[sl],
                  "label_logit": z[sl][np.arange(sl.stop - sl.start), lab[sl]]}
        with pytest.raises(StoreError, match="missing array 'margin'"):
            w.write_chunk(c, arrays)
        w.write_chunk(c, {**arrays, "margin": (top.values[:, 0] - top.values[:, 1]).numpy()})
    assert w.finalize()
    t = s.teacher("t")
    top2 = np.sort(z, axis=1)[:, ::-1]
    np.testing.assert_array_equal(t.read("margin"), (top2[:, 0] - top2[:, 1]).astype(np.float32))
    rep = verify_store(str(tmp_path / "s"), record=False)
    assert not rep["bad"]
    assert rep["chunks_checked"] > 0
    # a corrupted chunk of the new array is found, mapped to the teacher's done flag and cleared by repair
    f = tmp_path / "s" / "teachers" / "t" / "margin" / "c" / "1"
    f.write_bytes(b"\0" * len(f.read_bytes()))
    rep = verify_store(str(tmp_path / "s"), record=False)
    assert [(b.array, b.row_chunk, b.flag) for b in rep["bad"]] == [("teachers/t/margin", 1, "done")]
    assert invalidate_chunks(str(tmp_path / "s"), rep["bad"]) == {"t": [1]}
    assert LogitStore.open(str(tmp_path / "s")).pending_chunks("t") == [1]


def test_describe_lists_the_arrays_with_their_writer(tmp_path):
    """`loca-pipe info --json` (LogitStore.describe) lists each group's arrays, shape, dtype and writer."""
    _tiny_token_store(tmp_path / "tok", codec="compact", sample_draws=2)
    d = LogitStore.open(str(tmp_path / "tok")).describe()
    root = d["arrays"]
    assert set(root) == {"sample_id", "label", "view", "rows_done", "offsets", "position"}
    assert root["offsets"] == {"shape": [6], "dtype": "int64", "written_by": "lm index"}
    t = d["teachers"]["t"]["arrays"]
    assert t["sampled_counts"] == {"shape": [d["num_rows"], 2], "dtype": "uint16", "written_by": "write_chunk (job)"}
    assert t["done"]["written_by"] == "flag" and t["lse"]["written_by"] == "write_chunk"
    assert t["topk_code"]["written_by"] == "write_chunk (top-k codec)" and "topk_logits" not in t
