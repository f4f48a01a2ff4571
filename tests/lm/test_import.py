"""#21 item 3: `loca-pipe lm-import` — a DistillKit Parquet cache (raw top-k, and its compressed form) into a token
store. The files are written here, with pyarrow, to DistillKit's published schema by an encoder of this test's own
(torch's bf16 rounding, numpy's least squares and packbits — none of the import's code): ids and log-probs round-trip
exactly where the format is exact, the decoded polynomial tail equals the fit the file holds, and lm-analyze's numbers
on the imported store equal a direct computation from the same Parquet rows. Bad input: a few rows through the
installed CLI (one `error:` line, exit 1, nothing lost), the rest in-process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loca_pipe.pipeline.errors import ConfigError, DataError, StoreConflictError
from loca_pipe.pipeline.lm import import_distillkit as imp
from loca_pipe.pipeline.lm.streaming import TokenTeacher

V, K = 50, 16


def _rows(seed: int = 0, n_seq: int = 9):
    """Sequences with teacher rows from heavy-tailed distributions over V: (input_ids, ids (n, K), logprobs (n, K)).
    About half the next tokens are drawn from the row's top-k, the rest anywhere (often outside it)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_seq):
        L = int(rng.integers(3, 10))
        z = rng.gumbel(size=(L - 1, V)) * 2.0
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :K]
        ids = np.stack([r[rng.permutation(K)] for r in ids])  # the file need not be sorted
        vals = np.take_along_axis(lp, ids, 1)
        inp = rng.integers(0, V, L)
        for j in range(L - 1):
            if rng.random() < 0.5:
                inp[j + 1] = ids[j, rng.integers(0, K)]
        out.append((inp, ids, vals))
    return out


def _write(path: Path, table: dict, types: dict) -> None:
    pq.write_table(pa.table({k: pa.array(v, type=types[k]) for k, v in table.items()}), path)


def write_raw(path: Path, seqs, drop: str | None = None) -> None:
    t = {"input_ids": [s[0].tolist() for s in seqs], "token_ids": [s[1].tolist() for s in seqs],
         "top_values": [s[2].astype(np.float32).tolist() for s in seqs]}
    types = {"input_ids": pa.list_(pa.uint64()), "token_ids": pa.list_(pa.list_(pa.uint64())),
             "top_values": pa.list_(pa.list_(pa.float32()))}
    _write(path, {k: v for k, v in t.items() if k != drop}, types)


# -- the compressed form, encoded here from the description ------------------------------------------------
README = {"d": V, "k": K, "exact_k": 4, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
          "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
          "normalize_t": True}
DELTA = {"d": V, "k": K, "exact_k": 2, "exact_dtype": "float32", "polynomial_terms": [0, 1], "term_dtype": "float32",
         "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": K - 2}],
         "delta_encoding": True}


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).float().numpy().astype(np.float64)


def _basis(cfg, n):
    t = np.linspace(0, 1, n) if cfg.get("normalize_t") else np.arange(n, dtype=np.float64)
    return np.stack([np.sqrt(t) if p == "sqrt" else t ** p for p in cfg["polynomial_terms"]], 1)


def encode(cfg, ids: np.ndarray, lp: np.ndarray):
    """One sequence's rows → (compressed_logprobs bytes (n, B), bytepacked_indices (n, I), what decoding must give)."""
    order = np.argsort(-lp, axis=1, kind="stable")
    lp, ids = np.take_along_axis(lp, order, 1), np.take_along_axis(ids, order, 1)
    v = np.concatenate([lp[:, :1], np.diff(lp, axis=1)], 1) if cfg.get("delta_encoding", True) else lp.copy()
    e = cfg["exact_k"]
    parts, want = [], np.zeros_like(v)
    if cfg["exact_dtype"] == "bfloat16":
        b = torch.tensor(v[:, :e], dtype=torch.float32).to(torch.bfloat16)
        parts.append(b.view(torch.int16).numpy().astype("<i2").view(np.uint8).reshape(len(v), -1))
        want[:, :e] = b.float().numpy()
    else:
        f = v[:, :e].astype("<f4")
        parts.append(f.view(np.uint8).reshape(len(v), -1))
        want[:, :e] = f
    X = _basis(cfg, K - e)
    coef = np.ascontiguousarray(np.linalg.lstsq(X, v[:, e:].T, rcond=None)[0].T, dtype="<f4")
    parts.append(coef.view(np.uint8).reshape(len(v), -1))
    fit = coef.astype(np.float64) @ X.T
    want[:, e:] = fit
    for bn in cfg.get("residual_bins", []):
        res = v[:, e:] - fit
        scale = (np.abs(res).max(1, keepdims=True) / 2 ** (bn["element_bits"] - 1)).astype("<f2")
        q = np.clip(np.round(res / scale.astype(np.float64)), -128, 127)
        parts += [scale.view(np.uint8).reshape(len(v), -1), (q + 128).astype(np.uint8)]  # 8 bits: one byte each
        want[:, e:] += q * scale.astype(np.float64)
    if cfg.get("delta_encoding", True):
        want = np.cumsum(want, 1)
    bits = int(np.ceil(np.log2(cfg["d"])))
    stream = ((ids[..., None] >> np.arange(bits - 1, -1, -1)) & 1).reshape(len(ids), -1).astype(np.uint8)
    return np.concatenate(parts, 1), np.packbits(stream, axis=1), ids, want


def write_compressed(path: Path, seqs, cfg) -> list[tuple[np.ndarray, np.ndarray]]:
    enc = [encode(cfg, s[1], s[2]) for s in seqs]
    _write(path, {"input_ids": [s[0].tolist() for s in seqs], "compressed_logprobs": [e[0].tolist() for e in enc],
                  "bytepacked_indices": [e[1].tolist() for e in enc]},
           {"input_ids": pa.list_(pa.uint64()), "compressed_logprobs": pa.list_(pa.list_(pa.uint8())),
            "bytepacked_indices": pa.list_(pa.list_(pa.uint8()))})
    return [(e[2], e[3]) for e in enc]


def _store_rows(seqs):
    """The rows the store must hold, from the file's rows: row j of a sequence scores input_ids[j + 1]."""
    return [(i, j, int(s[0][j + 1])) for i, s in enumerate(seqs) for j in range(len(s[0]) - 1)]


# -- round trips --------------------------------------------------------------------------------------------
def test_raw_top_k_round_trips_exactly_and_flags_unknown_labels(tmp_path):
    seqs = _rows(0)
    write_raw(tmp_path / "c.parquet", seqs)
    rep = imp.import_distillkit(str(tmp_path / "c.parquet"), str(tmp_path / "s.zarr"), vocab_size=V, chunk_rows=7)
    t = TokenTeacher(str(tmp_path / "s.zarr"), "teacher")
    d = t.read(0, t.num_rows)
    rows = _store_rows(seqs)
    assert rep["tokens"] == t.num_rows == len(rows) and rep["form"] == "raw" and t.temperatures == [1.0]
    assert (d["lse"] == 0).all()
    n_unknown = 0
    for r, (i, j, y) in enumerate(rows):
        ids, lp = seqs[i][1][j], seqs[i][2][j].astype(np.float32)
        o = np.lexsort((ids, -lp))
        np.testing.assert_array_equal(d["topk_ids"][r], ids[o])
        np.testing.assert_array_equal(d["topk_logits"][r], lp[o])  # float32 in, float32 out: exact
        assert (d["sample_id"][r], d["position"][r], d["label"][r]) == (i, j, y)
        if y in ids:
            assert d["import_flags"][r] == 0 and d["label_logit"][r] == lp[list(ids).index(y)]
        else:  # unknown: flagged, label_logit holds the bound log(tail)
            n_unknown += 1
            tail = 1 - np.exp(lp.astype(np.float64)).sum()
            assert d["import_flags"][r] == imp.LABEL_UNKNOWN
            assert abs(d["label_logit"][r] - np.log(tail)) < 1e-5
    assert 0 < n_unknown < len(rows) and rep["label_unknown"] == n_unknown


@pytest.mark.parametrize("cfg", [README, DELTA], ids=["readme-config", "delta-residual-bin"])
def test_compressed_form_decodes_to_what_the_file_encodes(tmp_path, cfg):
    import yaml

    seqs = _rows(1)
    want = write_compressed(tmp_path / "c.parquet", seqs, cfg)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"teacher": {"kind": "dataset", "logprob_compressor": cfg}}))
    comp = imp.load_compression(str(tmp_path / "cfg.yaml"))
    assert comp.logprob_bytes() == len(pq.read_table(tmp_path / "c.parquet")["compressed_logprobs"][0][0])
    imp.import_distillkit(str(tmp_path / "c.parquet"), str(tmp_path / "s.zarr"), compression=comp, chunk_rows=5)
    t = TokenTeacher(str(tmp_path / "s.zarr"))
    d = t.read(0, t.num_rows)
    for r, (i, j, _y) in enumerate(_store_rows(seqs)):
        ids, lp = want[i][0][j], want[i][1][j]
        o = np.lexsort((ids, -lp))
        np.testing.assert_array_equal(d["topk_ids"][r], ids[o])  # bit-packed ids: exact
        np.testing.assert_allclose(d["topk_logits"][r], lp[o].astype(np.float32), rtol=0, atol=2e-5)
        if not cfg["delta_encoding"]:  # the exact_k values are stored exactly (bf16)
            top = np.sort(lp[:cfg["exact_k"]])[::-1]
            np.testing.assert_array_equal(d["topk_logits"][r][:cfg["exact_k"]], top.astype(np.float32))


def test_the_dataset_reads_an_import_with_its_unknown_labels_marked(tmp_path):
    """TokenStoreDataset over an imported store (the file's input_ids, prompt_len 1: every next token is a row):
    the file's top-k at τ = 1, and label_known False exactly where the label is outside it — the same through the
    decoded sidecar."""
    from loca_pipe.pipeline.lm.dataset import TokenStoreDataset

    seqs = _rows(6, n_seq=5)
    write_raw(tmp_path / "c.parquet", seqs)
    imp.import_distillkit(str(tmp_path / "c.parquet"), str(tmp_path / "s.zarr"), vocab_size=V, chunk_rows=9)
    ids = [s[0] for s in seqs]
    plain = TokenStoreDataset(str(tmp_path / "s.zarr"), ids, [1] * len(ids))
    side = TokenStoreDataset(str(tmp_path / "s.zarr"), ids, [1] * len(ids), sidecar=True)
    for i, (inp, tid, tlp) in enumerate(seqs):
        a, b = plain[i], side[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
        for j in range(len(inp) - 1):
            o = np.lexsort((tid[j], -tlp[j].astype(np.float32)))
            np.testing.assert_array_equal(a["teacher_ids"][j].numpy(), tid[j][o])
            np.testing.assert_allclose(a["teacher_logprobs"][j].numpy(), tlp[j][o], rtol=0, atol=1e-6)
            assert bool(a["label_known"][j]) == (inp[j + 1] in tid[j])
        assert bool(a["label_known"][-1])  # the last position scores nothing


# -- analysis -------------------------------------------------------------------------------------------------
def test_lm_analyze_on_the_import_matches_the_parquet_rows(tmp_path):
    from loca_pipe.pipeline.lm.analysis import analyze_streamed

    seqs = _rows(2, n_seq=14)
    write_raw(tmp_path / "c.parquet", seqs)
    imp.import_distillkit(str(tmp_path / "c.parquet"), str(tmp_path / "s.zarr"), vocab_size=V, chunk_rows=16)
    s = analyze_streamed(TokenTeacher(str(tmp_path / "s.zarr")), 1.0, 0.9, tmp_path / "a")
    # direct, from the file's rows: p = exp(log-prob); a label in the top-k is mis-instructed when p_y ≤ max other
    # (ties count); outside it p_y ≤ tail, certain when tail ≤ p_top1, undetermined otherwise
    mis = unk = und = 0
    p_known = []
    for i, j, y in _store_rows(seqs):
        ids, p = seqs[i][1][j], np.exp(seqs[i][2][j].astype(np.float32).astype(np.float64))
        if y in ids:
            py = p[list(ids).index(y)]
            p_known.append(py)
            mis += py <= np.max(np.where(ids == y, -1, p))
        else:
            unk += 1
            certain = 1 - p.sum() <= p.max()
            mis += certain
            und += not certain
    n = len(_store_rows(seqs))
    assert (s["tokens"], s["mis_instructed"], s["label_unknown"], s["mis_undetermined"]) == (n, mis, unk, und)
    assert unk > 0 and s["mis_ratio_max"] == pytest.approx((mis + und) / n)
    assert s["mean_p_label"] == pytest.approx(np.mean(p_known), rel=1e-5)
    tab = pq.read_table(tmp_path / "a" / "tokens.parquet").to_pydict()
    assert sum(not k for k in tab["label_known"]) == unk
    assert all(np.isnan(p) == (not k) for p, k in zip(tab["p_label"], tab["label_known"]))
    assert 0 <= s["loca_calibrated_share"] <= 1 and json.loads((tmp_path / "a" / "metrics.json").read_text())["exactness"]


# -- bad input, in-process ---------------------------------------------------------------------------------------
def test_bad_inputs_in_process(tmp_path, tok):
    seqs = _rows(3, n_seq=3)
    f = tmp_path / "c.parquet"
    write_raw(f, seqs)
    with pytest.raises(ConfigError, match="--vocab-size"):  # raw form without a vocabulary
        imp.import_distillkit(str(f), str(tmp_path / "a.zarr"))
    with pytest.raises(DataError, match="input_ids reach 4[0-9], beyond the declared vocabulary of 20 tokens"):
        imp.import_distillkit(str(f), str(tmp_path / "a.zarr"), vocab_size=20)
    write_raw(tmp_path / "ids.parquet", [(s[0] % 20, s[1], s[2]) for s in seqs])  # only the teacher's ids reach 49
    with pytest.raises(DataError, match="teacher ids up to 4[0-9] .* exceed the declared vocabulary of 20 tokens"):
        imp.import_distillkit(str(tmp_path / "ids.parquet"), str(tmp_path / "a.zarr"), vocab_size=20)
    with pytest.raises(StoreConflictError, match="not the cache's tokenizer"):  # 300 tokens, a 50-token teacher
        imp.import_distillkit(str(f), str(tmp_path / "a.zarr"), vocab_size=V, tokenizer_dir=str(_saved(tok, tmp_path)))
    assert not (tmp_path / "a.zarr").exists()  # every refusal above came before anything was written
    write_compressed(tmp_path / "z.parquet", seqs, README)
    with pytest.raises(ConfigError, match="--compression-config"):
        imp.import_distillkit(str(tmp_path / "z.parquet"), str(tmp_path / "a.zarr"), vocab_size=V)
    with pytest.raises(ConfigError, match="implies"):  # another config than the capture's
        imp.import_distillkit(str(tmp_path / "z.parquet"), str(tmp_path / "a.zarr"),
                              compression=imp.Compression.from_mapping({**README, "exact_k": 6}))
    with pytest.raises(ConfigError, match="unknown key"):
        imp.Compression.from_mapping({**README, "exactk": 4})
    pq.write_table(pa.table({"input_ids": [[1, 2]], "packed_indices": [[[1]]]}), tmp_path / "legacy.parquet")
    with pytest.raises(DataError, match="legacy"):
        imp.import_distillkit(str(tmp_path / "legacy.parquet"), str(tmp_path / "a.zarr"), vocab_size=V)
    logits = [(s[0], s[1], s[2] + 5.0) for s in seqs]  # raw logits, not log-probs
    write_raw(tmp_path / "l.parquet", logits)
    imp.import_distillkit(str(f), str(tmp_path / "a.zarr"), vocab_size=V)
    before = TokenTeacher(str(tmp_path / "a.zarr")).read(0, 10)
    with pytest.raises(DataError, match="not log-probs"):  # met while writing: --out is swapped only when whole
        imp.import_distillkit(str(tmp_path / "l.parquet"), str(tmp_path / "a.zarr"), vocab_size=V, overwrite=True)
    after = TokenTeacher(str(tmp_path / "a.zarr")).read(0, 10)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir() if "import-" in p.name] == []


def _saved(tok, tmp_path: Path) -> Path:
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


# -- bad input, through the installed CLI ---------------------------------------------------------------------------
def _cli(args, cwd):
    exe = Path(sys.executable).parent / "loca-pipe"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()


def _main(args, capsys) -> dict:
    """The CLI's entry point in this process (what the console script calls); its printed JSON."""
    from loca_pipe.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_lm_import_through_the_cli(tmp_path, monkeypatch, capsys):
    seqs = _rows(4, n_seq=4)
    write_raw(tmp_path / "c.parquet", seqs)
    monkeypatch.chdir(tmp_path)
    assert _main(["lm-import", "c.parquet", "--vocab-size", str(V), "--workdir", "w"], capsys)["tokens"] == \
        len(_store_rows(seqs))
    # lm-analyze runs on the import as on lm-cache's store, and says what is a bound
    assert _main(["lm-analyze", "--workdir", "w"], capsys)["label_unknown"] > 0
    store = tmp_path / "w" / "store.zarr"
    before = _tree(store)
    write_raw(tmp_path / "m.parquet", seqs, drop="top_values")
    rows = [  # through the installed console script, as a user runs it: (args, what the one error line must say)
        (["lm-import", "c.parquet", "--vocab-size", str(V), "--workdir", "w"], "already exists; pass --overwrite"),
        (["lm-import", "c.parquet", "--vocab-size", "20", "--workdir", "w", "--overwrite"],
         "beyond the declared vocabulary of 20 tokens"),
        (["lm-import", "m.parquet", "--vocab-size", str(V), "--workdir", "w", "--overwrite"], "no column 'top_values'"),
    ]
    for args, says in rows:
        r = _cli(args, tmp_path)
        assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert says in r.stderr, r.stderr
        assert _tree(store) == before  # nothing already written is lost


def test_the_output_guard_refuses_destructive_outs(tmp_path, monkeypatch, capsys):
    """pipeline/guard.py for lm-import: --out on its own input, on a FIFO, on a folder of other things — one error
    line naming --out, and nothing changes."""
    from loca_pipe.cli.main import main

    write_raw(tmp_path / "c.parquet", _rows(5, n_seq=2))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    for out in ("c.parquet", "fifo", "keep"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["lm-import", "c.parquet", "--vocab-size", str(V), "--out", out, "--overwrite"])
        err = capsys.readouterr().err
        assert done.value.code == 1 and err.startswith("error:") and err.count("\n") == 1 and "--out" in err, err
        assert _tree(tmp_path) == before
