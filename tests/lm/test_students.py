"""Student losses from the token cache against dense references on the live teacher's full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.errors import ConfigError, StoreConflictError, StoreError
from loca_pipe.pipeline.lm import cache, evaluation, models, students, tokenizer, trainer

from .conftest import spread


def _store(tmp_path, teacher, tok, enc, top_k, **kw):
    cache.cache_teacher(str(tmp_path), "t", teacher, enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        top_k=top_k, temperatures=(1.0, 2.0), dataset={"name": "x", "split": "train", "fingerprint": "f"},
                        provenance={}, chunk_rows=128, batch_size=8, **kw)
    return cache.open_lm_cache(str(tmp_path))


def _live(teacher, enc, idx):
    with torch.no_grad():
        z, y = models.response_logits(teacher, [enc.ids[i] for i in idx], enc.prompt_len[idx], 0)
    return z, y


def _dense_loca(p: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Independent LoCa (paper Eq. 14-18) on full distributions, row by row."""
    out = p.clone()
    for r in range(p.shape[0]):
        k = int(p[r].argmax())
        if k == int(y[r]):
            continue
        s = alpha / (1 - p[r, y[r]] + p[r, k])
        out[r] = s * p[r]
        out[r, y[r]] = 1 - s * (1 - p[r, y[r]])
    return out


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sparse_kd_with_full_vocab_equals_dense_kd(tmp_path, teacher, tok, enc, tau):
    V = len(tok)
    c = _store(tmp_path / "s", teacher, tok, enc, top_k=V)
    idx = np.array([3, 0, 7, 11])
    zt, y = _live(teacher, enc, idx)
    student = spread(models.build_lm("llama", V, 32, 1, 2, 64, tok), seed=5, std=0.2)
    zs, ys = models.response_logits(student, [enc.ids[i] for i in idx], enc.prompt_len[idx], tok.pad_token_id)
    assert torch.equal(ys, y)
    loss = students.make_loss("kd", c, students.KDSettings(tau=tau, beta=1.0, gamma=0.0))(zs, ys, idx)
    ref = tau * tau * F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt / tau, 1), log_target=True,
                               reduction="batchmean")
    torch.testing.assert_close(loss, ref, atol=2e-5, rtol=2e-5)
    # with γ the CE term is added on the same rows
    loss2 = students.make_loss("kd", c, students.KDSettings(tau=tau, beta=0.5, gamma=0.5))(zs, ys, idx)
    torch.testing.assert_close(loss2, 0.5 * ref + 0.5 * F.cross_entropy(zs, ys), atol=2e-5, rtol=2e-5)
    # LoCa-KD with k = V equals KD against the dense LoCa-calibrated teacher
    p_loca = _dense_loca(torch.softmax(zt / tau, 1).double(), y, 0.9).float()
    loss3 = students.make_loss("loca", c, students.KDSettings(tau=tau, alpha=0.9, beta=1.0, gamma=0.0))(zs, ys, idx)
    ref3 = tau * tau * F.kl_div(F.log_softmax(zs / tau, 1), p_loca, reduction="batchmean")
    torch.testing.assert_close(loss3, ref3, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_star_with_full_vocab_equals_the_dense_reference(tmp_path, trained_teacher, tok, enc, tau):
    """KD* with k = V: the dense KL row by row, the mis-instructed rows (label not the strict argmax of the
    teacher) counted as 0, divided by all rows; + γ·CE on every row."""
    V = len(tok)
    c = _store(tmp_path / "s", trained_teacher, tok, enc, top_k=V)
    idx = np.arange(12)
    zt, y = _live(trained_teacher, enc, idx)
    student = spread(models.build_lm("llama", V, 32, 1, 2, 64, tok), seed=5, std=0.2)
    zs, ys = models.response_logits(student, [enc.ids[i] for i in idx], enc.prompt_len[idx], tok.pad_token_id)
    loss4 = students.make_loss("kd_star", c, students.KDSettings(tau=tau, beta=1.0, gamma=0.0))(zs, ys, idx)
    rows = F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt / tau, 1), log_target=True, reduction="none").sum(1)
    p_t = torch.softmax(zt / tau, 1)
    keep = torch.tensor([bool(p_t[r, y[r]] > p_t[r].scatter(0, y[r:r + 1], -1.0).max()) for r in range(len(y))])
    assert 0 < int(keep.sum()) < len(y)  # the trained teacher is wrong on some tokens and right on others
    ref4 = tau * tau * torch.where(keep, rows, 0.0).sum() / len(y)
    torch.testing.assert_close(loss4, ref4, atol=2e-5, rtol=2e-5)
    loss5 = students.make_loss("kd_star", c, students.KDSettings(tau=tau, beta=0.5, gamma=0.5))(zs, ys, idx)
    torch.testing.assert_close(loss5, 0.5 * ref4 + 0.5 * F.cross_entropy(zs, ys), atol=2e-5, rtol=2e-5)


def test_loca_sparse_equals_dense_on_kept_ids(tmp_path, trained_teacher, tok, enc):
    teacher = trained_teacher
    c = _store(tmp_path / "s", teacher, tok, enc, top_k=5)
    idx = np.arange(len(enc))
    zt, y = _live(teacher, enc, idx)
    rows = c.rows(idx)
    tau = 2.0
    sd = students.sparse_targets(c, rows, y, tau, alpha=0.8)
    dense = _dense_loca(torch.softmax(zt.double() / tau, 1), y, 0.8)
    mis = zt.argmax(1) != y
    assert 0 < int(mis.sum()) < len(y)  # both kinds of rows are present
    ids = sd.ids
    got = sd.probs.double()
    want = dense.gather(1, ids)
    in_top = (ids[:, :-1] == y.view(-1, 1)).any(1)
    want[:, -1] = torch.where(in_top, torch.zeros_like(want[:, -1]), want[:, -1])  # label column: 0 when in top-k
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    kept = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(sd.tail.double(), (dense * ~kept).sum(1), atol=1e-5, rtol=1e-4)
    # correct rows are untouched by LoCa
    plain = students.sparse_targets(c, rows, y, tau, alpha=None)
    torch.testing.assert_close(sd.probs[~mis], plain.probs[~mis])


def test_training_methods_and_checks(tmp_path, teacher, tok, enc):
    c = _store(tmp_path / "s", teacher, tok, enc, top_k=8, greedy_max_new_tokens=6, sample_draws=6)
    students.check_cache_matches(c, enc)
    other = tokenizer.Encoded([s.copy() for s in enc.ids], enc.prompt_len.copy())
    other.ids[2][-1] = (other.ids[2][-1] + 1) % 300
    with pytest.raises(StoreConflictError, match="differ from this data's response tokens"):
        students.check_cache_matches(c, other)
    with pytest.raises(StoreConflictError, match="re-cache the teacher on the same data"):
        students.check_cache_matches(c, tokenizer.Encoded(enc.ids[:5], enc.prompt_len[:5]))
    with pytest.raises(ConfigError, match="unknown student method 'dkd'; valid methods are"):
        students.make_loss("dkd", c, students.KDSettings())
    with pytest.raises(StoreError, match="not declared at cache time"):
        students.make_loss("kd", c, students.KDSettings(tau=4.0))
    seq = students.seqkd_encoding(enc, c.greedy_responses(), tok.eos_token_id, 40)
    g = c.greedy_responses()
    for i in (0, 9):
        P = enc.prompt_len[i]
        assert seq.ids[i][:P].tolist() == enc.ids[i][:P].tolist()
        assert seq.ids[i][P:].tolist() == (g[i].tolist() + [tok.eos_token_id])[:40 - P]
    for method in students.METHODS:
        m = models.build_lm("llama", len(tok), 32, 1, 2, 64, tok, seed=1)
        data = seq if method == "seqkd" else enc
        s = trainer.TrainSettings(batch_size=4, steps=3, lr=1e-3, log_every=1)
        hist = trainer.train(m, data, students.make_loss(method, c, students.KDSettings()), s,
                             pad_id=tok.pad_token_id, out_dir=tmp_path / "ck", teacher=c)
        losses = [h["loss"] for h in hist if "loss" in h]
        assert len(losses) == 3 and all(np.isfinite(x) for x in losses), method
    ev = evaluation.evaluate(m, tok, enc, [s[:p] for s, p in zip(enc.ids[:4], enc.prompt_len[:4])],
                             ["a", "b", "c", "d"], 4)
    assert 0 <= ev["token_accuracy"] <= 1 and ev["perplexity"] > 1 and 0 <= ev["rouge_l"] <= 100


def test_sampled_kd_against_dense_estimate(tmp_path, teacher, tok, enc):
    c = _store(tmp_path / "s", teacher, tok, enc, top_k=4, sample_draws=12, sample_tau=1.0)
    idx = np.array([1, 4])
    rows = c.rows(idx)
    student = spread(models.build_lm("llama", len(tok), 32, 1, 2, 64, tok), seed=6, std=0.2)
    zs, ys = models.response_logits(student, [enc.ids[i] for i in idx], enc.prompt_len[idx], tok.pad_token_id)
    got = students.make_loss("kd_sampled", c, students.KDSettings(tau=1.0, beta=1.0, gamma=0.0))(zs, ys, idx)
    # dense reference: scatter counts/12 into a full-vocabulary target and take KL(p̂ ‖ q) with F.kl_div
    ph = torch.zeros(len(rows), len(tok))
    for r, row in enumerate(rows):
        for i, n in zip(c.sampled_ids[row], c.sampled_counts[row]):
            if n:
                ph[r, i] += n / 12
    torch.testing.assert_close(ph.sum(1), torch.ones(len(rows)))
    ref = F.kl_div(F.log_softmax(zs, 1), ph, reduction="batchmean")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="sample_tau=1.0"):
        students.make_loss("kd_sampled", c, students.KDSettings(tau=2.0))
    c2 = _store(tmp_path / "s2", teacher, tok, enc, top_k=4)
    with pytest.raises(ConfigError, match="sample_draws > 0"):
        students.make_loss("kd_sampled", c2, students.KDSettings())


def test_mechanism_metric_against_the_live_teacher(tmp_path, trained_teacher, tok, enc):
    """follows_teacher / recovers_label on the mis-instructed tokens, against a count on the live teacher's
    and student's full logits; the teacher as its own student follows itself on every such token."""
    _store(tmp_path / "s", trained_teacher, tok, enc, top_k=8)
    student = spread(models.build_lm("llama", len(tok), 32, 1, 2, 64, tok), seed=4, std=0.2)
    got = evaluation.mechanism(student, enc, str(tmp_path / "s"), "t", tok.pad_token_id, batch_size=5)["mechanism"]
    zt, y = _live(trained_teacher, enc, np.arange(len(enc)))
    with torch.no_grad():
        zs, _ = models.response_logits(student, enc.ids, enc.prompt_len, tok.pad_token_id)
    rival = zt.scatter(1, y[:, None], float("-inf")).max(1).values
    mis = zt.gather(1, y[:, None]).view(-1) <= rival
    wrong = zt.argmax(1)
    assert got["mis_tokens"] == int(mis.sum()) > 0 and got["split"] == "train"
    assert got["follows_teacher"] == pytest.approx(float(((zs.argmax(1) == wrong) & mis).sum()) / int(mis.sum()))
    assert got["recovers_label"] == pytest.approx(float(((zs.argmax(1) == y) & mis).sum()) / int(mis.sum()))
    self_ = evaluation.mechanism(trained_teacher, enc, str(tmp_path / "s"), "t", tok.pad_token_id)["mechanism"]
    assert self_["follows_teacher"] == 1.0 and self_["recovers_label"] == 0.0


def test_lm_loss_settings_are_the_one_loss_config_with_its_checks():
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.pipeline.losses import LossConfig

    kd = students.KDSettings()
    assert isinstance(kd, LossConfig) and (kd.tau, kd.alpha, kd.beta, kd.gamma) == (1.0, 0.9, 0.5, 0.5)
    assert students.KDSettings(2.0, 0.95, 1.0, 0.0) == students.KDSettings(tau=2.0, alpha=0.95, beta=1.0, gamma=0.0)
    for bad in ({"tau": 0.0}, {"beta": -1.0}, {"alpha": 0.0}, {"gamma": float("nan")}):
        with pytest.raises(ConfigError, match="LossConfig"):
            students.KDSettings(**bad)
