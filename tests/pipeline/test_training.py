"""Student training from a store: loss equals the live teacher's, views replay exactly, resume is exact,
chunk-streamed reading covers every row once, bad stores and NaN losses are refused with clear messages."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from loca_pipe.pipeline.losses import LossConfig, compute_loss
from loca_pipe.pipeline.errors import DataError, IncompleteStoreError, NumericsError, StoreError
from loca_pipe.pipeline.soft_labels import PlainSource, SoftLabels, load_soft_labels, random_view
from loca_pipe.pipeline.store import LogitStore, StoreInfo, summarize_logits
from loca_pipe.pipeline.training import Hooks, ImageSet, TrainConfig, preset_config, train_student

torch.set_num_threads(1)
N, C, H = 192, 10, 8
CHUNK = 64


def kd_reference(method, student_logits, labels, *, teacher_logits=None, teacher_probs=None, teacher_sparse=None,
                 cfg=None, epoch=0):
    """Independent reference loss: γ·CE + β·τ²·KL(p_T‖p_S) written with F.kl_div."""
    tau, beta, gamma = cfg.tau, cfg.beta, cfg.gamma
    ce = nn.functional.cross_entropy(student_logits, labels)
    if method == "ce":
        return ce
    if teacher_probs is None:
        teacher_probs = torch.softmax(teacher_logits / tau, dim=1)
    kl = nn.functional.kl_div(torch.log_softmax(student_logits / tau, 1), teacher_probs, reduction="batchmean")
    return gamma * ce + beta * tau * tau * kl


LCFG = LossConfig(tau=4.0, beta=0.9, gamma=0.1, alpha=0.9)


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, H, H, generator=g)
        self.y = torch.randint(0, C, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def spec_of(ds, fingerprint="fp-toy", split="train"):
    return SimpleNamespace(name="toy", split=split, dataset=ds, num_classes=C, in_channels=1, image_size=H,
                           fingerprint=fingerprint, labels=ds.y.numpy().astype(np.int64), transform="none")


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(H * H, 32), nn.ReLU(), nn.Linear(32, C))


class ShiftFlip:
    """Stand-in augmenter with the Augmenter interface: roll by (dy, dx), flip when f ≥ 0.5."""

    param_names = ("dy", "dx", "flip")

    def __init__(self, seed):
        self.seed = seed

    def sample_params(self, sample_ids, view):
        rng = np.random.default_rng([self.seed, view])
        p = rng.integers(-2, 3, size=(100_000, 2)).astype(np.float32)
        f = rng.random(100_000).astype(np.float32)
        ids = np.asarray(sample_ids)
        return np.stack([p[ids, 0], p[ids, 1], f[ids]], axis=1)

    def apply(self, images, params):
        params = torch.as_tensor(params)
        out = torch.empty_like(images)
        for i in range(images.shape[0]):
            x = torch.roll(images[i], shifts=(int(params[i, 0]), int(params[i, 1])), dims=(1, 2))
            out[i] = torch.flip(x, dims=(2,)) if params[i, 2] >= 0.5 else x
        return out


def write_store(path, ds, teacher, *, views=0, aug=None, fingerprint="fp-toy", top_k=3, temps=(4.0, 1.0),
                complete=True, full=True):
    """Cache ``teacher`` over ``ds`` the way cache-logits does (rows = sample·V + view); returns the teacher's
    input images per row, i.e. exactly the pixels the teacher saw."""
    V = max(1, views)
    n = len(ds)
    info = StoreInfo(task="classification", num_samples=n, num_views=V, num_rows=n * V, num_classes=C,
                     chunk_rows=CHUNK, dataset={"fingerprint": fingerprint, "split": "train",
                                                "augment": "shift-flip" if views else None, "view_seed": 0},
                     aug_param_names=tuple(aug.param_names) if views else ())
    store = LogitStore.create_or_open(str(path), info)
    w = store.begin_teacher("t", {"arch": "toy"}, top_k=top_k, temperatures=temps,
                            logits_dtype="float32" if full else None)
    sid = np.repeat(np.arange(n), V)
    vw = np.tile(np.arange(V), n)
    x = ds.x[torch.from_numpy(sid)]
    params = None
    if views:
        params = np.zeros((n * V, 3), np.float32)
        for v in range(V):
            params[vw == v] = aug.sample_params(sid[vw == v], v)
        x = aug.apply(x, torch.from_numpy(params))
    with torch.no_grad():
        z = teacher(x)
    y = ds.y[torch.from_numpy(sid)]
    for c in range(info.num_chunks):
        if not complete and c == info.num_chunks - 1:
            break
        sl = info.chunk_slice(c)
        store.write_rows(c, sid[sl], y[sl].numpy(), vw[sl], None if params is None else params[sl])
        s = summarize_logits(z[sl], y[sl], top_k, temps)
        arrays = {k: v.numpy() for k, v in s.items()}
        if full:
            arrays["logits"] = z[sl].numpy()
        w.write_chunk(c, arrays)
    w.finalize()
    return x, z


def run(ds, source, *, method="kd", epochs=2, seed=3, out=None, teacher=None, replay=None, hooks=None,
        resume=False, lr=0.1, loss_fn=None, batch=32, ident=None):
    model = make_model(seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, milestones=(1,), seed=seed)
    res = train_student(model, images=ImageSet(ds, "cpu"), labels=ds.y, source=source, method=method,
                        loss_cfg=LCFG, cfg=cfg, eval_images=ImageSet(ds, "cpu"), eval_labels=ds.y, out_dir=out,
                        teacher_model=teacher, replay=replay, resume=resume, hooks=hooks, loss_fn=loss_fn,
                        identity=ident or {"method": method, "seed": seed})
    return model, res


@pytest.fixture(scope="module")
def toy():
    ds = ToyData()
    teacher = make_model(99).eval()
    return ds, teacher


def test_loss_from_store_equals_loss_from_live_teacher(tmp_path, toy):
    ds, teacher = toy
    write_store(tmp_path / "s.zarr", ds, teacher)
    sl = load_soft_labels(str(tmp_path / "s.zarr"), spec_of(ds))
    assert sl.in_memory and sl.kind == "logits"
    rec = {"store": [], "live": []}
    m1, r1 = run(ds, sl, hooks=Hooks(on_step=lambda e, s, b, l: rec["store"].append((b.sample_index, float(l)))))
    m2, r2 = run(ds, PlainSource(len(ds)), teacher=teacher,
                 hooks=Hooks(on_step=lambda e, s, b, l: rec["live"].append((b.sample_index, float(l)))))
    assert len(rec["store"]) == len(rec["live"]) == 2 * math.ceil(N / 32)
    for (i1, l1), (i2, l2) in zip(rec["store"], rec["live"]):
        assert torch.equal(i1, i2)  # same data order
        assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    # and KD really used the teacher: a CE run ends elsewhere
    m3, _ = run(ds, PlainSource(len(ds)), method="ce")
    assert not torch.allclose(next(m3.parameters()), next(m1.parameters()))


def test_views_replay_exactly_the_pixels_the_teacher_saw(tmp_path, toy):
    ds, teacher = toy
    aug = ShiftFlip(seed=5)
    seen, z = write_store(tmp_path / "v.zarr", ds, teacher, views=3, aug=aug)
    sl = load_soft_labels(str(tmp_path / "v.zarr"), spec_of(ds))
    assert sl.has_views and sl.num_views == 3
    checked = []

    def on_step(epoch, step, batch, loss):
        assert (sl.view[batch.rows] == epoch % 3).all()  # epoch e trains on view e mod V
        assert torch.equal(batch.inputs, seen[batch.rows])  # replayed pixels == teacher's pixels
        assert torch.equal(batch.teacher["teacher_logits"], z[batch.rows])
        checked.append(batch.rows.numel())

    run(ds, sl, epochs=4, replay=aug, hooks=Hooks(on_step=on_step), batch=64)
    assert sum(checked) == 4 * N
    # a shuffled replay would not match: the check above can fail
    assert not torch.equal(seen[:N:3], ds.x[:N:3])


@pytest.mark.slow
def test_random_view_policy_picks_one_view_per_sample(tmp_path, toy):
    ds, teacher = toy
    aug = ShiftFlip(seed=5)
    write_store(tmp_path / "v.zarr", ds, teacher, views=3, aug=aug)
    sl = load_soft_labels(str(tmp_path / "v.zarr"), spec_of(ds), view_policy="random")
    rows = sl.epoch_rows(1, seed=0)
    assert sorted(sl.sample_id[rows].tolist()) == list(range(N))
    want = random_view(sl.sample_id[rows], 0, 1, 3)
    assert torch.equal(sl.view[rows], want)
    assert len(set(sl.view[rows].tolist())) == 3


def test_streamed_store_visits_every_row_once_with_the_same_values(tmp_path, toy):
    ds, teacher = toy
    aug = ShiftFlip(seed=1)
    _, z = write_store(tmp_path / "v.zarr", ds, teacher, views=2, aug=aug)
    mem = load_soft_labels(str(tmp_path / "v.zarr"), spec_of(ds))
    big = load_soft_labels(str(tmp_path / "v.zarr"), spec_of(ds), memory_limit_bytes=0, buffer_chunks=2)
    assert mem.in_memory and not big.in_memory
    for policy in ("cycle", "random"):
        big.view_policy = mem.view_policy = policy
        for epoch in (0, 1):
            rows, sizes = [], []
            for b in big.batches(epoch, 24, seed=7):
                assert torch.equal(b.teacher["teacher_logits"], z[b.rows])
                assert torch.equal(b.sample_index, big.sample_id[b.rows])
                assert torch.equal(b.aug_params, mem.aug[b.rows])
                rows.append(b.rows)
                sizes.append(b.rows.numel())
            rows = torch.cat(rows)
            # the same set of rows as the in-memory reader (one view per sample), each once
            assert sorted(rows.tolist()) == sorted(mem.epoch_rows(epoch, seed=7).tolist())
            assert sizes[:-1] == [24] * (len(sizes) - 1)
            assert rows.tolist() != sorted(rows.tolist())  # shuffled


class Interrupt(Exception):
    pass


def _boom(epoch, row):
    if epoch == 0:
        raise Interrupt


STOP_AFTER_EPOCH_1 = Hooks(on_epoch_end=_boom)  # an exception after the first epoch's checkpoint


def test_resume_after_interruption_is_bit_identical(tmp_path, toy):
    ds, teacher = toy
    write_store(tmp_path / "s.zarr", ds, teacher)
    sl = load_soft_labels(str(tmp_path / "s.zarr"), spec_of(ds))
    m_full, r_full = run(ds, sl, epochs=3, out=tmp_path / "a")

    with pytest.raises(Interrupt):
        run(ds, sl, epochs=3, out=tmp_path / "b", hooks=STOP_AFTER_EPOCH_1)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    m_res, r_res = run(ds, sl, epochs=3, out=tmp_path / "b", resume=True)
    for (k, a), (_, b) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
        assert torch.equal(a, b), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows]
    assert strip(r_full.history) == strip(r_res.history)
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 4  # header + 3 epochs
    # a checkpoint of another run is refused
    with pytest.raises(Exception, match="belongs to another run.*seed"):
        run(ds, sl, epochs=3, out=tmp_path / "b", resume=True, ident={"method": "kd", "seed": 4})


def test_nan_loss_stops_with_epoch_step_and_keeps_last_good_checkpoint(tmp_path, toy):
    ds, teacher = toy
    calls = {"n": 0}
    steps = math.ceil(N / 32)

    def nan_at_second_epoch(method, s, y, **kw):
        calls["n"] += 1
        loss = compute_loss(method, s, y, **kw)
        return loss * float("nan") if calls["n"] == steps + 3 else loss

    with pytest.raises(NumericsError, match=r"loss is nan at epoch 2, step 2 .*sample ids \[.*last good checkpoint.*"
                                            r"after epoch 1"):
        run(ds, PlainSource(N), method="ce", epochs=3, out=tmp_path / "n", loss_fn=nan_at_second_epoch)
    ck = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_bad_stores_are_refused_with_the_reason(tmp_path, toy):
    ds, teacher = toy
    write_store(tmp_path / "s.zarr", ds, teacher)
    with pytest.raises(DataError, match="fingerprint 'fp-toy'.*has fingerprint 'other'.*re-cache"):
        load_soft_labels(str(tmp_path / "s.zarr"), spec_of(ds, fingerprint="other"))
    with pytest.raises(StoreError, match="has 10 classes but the student outputs 100"):
        load_soft_labels(str(tmp_path / "s.zarr"), spec_of(ds), student_classes=100)
    other = ToyData(seed=1)
    with pytest.raises(DataError, match="labels that differ from the data set"):
        load_soft_labels(str(tmp_path / "s.zarr"), spec_of(other))
    write_store(tmp_path / "half.zarr", ds, teacher, complete=False)
    with pytest.raises(IncompleteStoreError, match="cannot train from this store.*incomplete.*1 of 3 chunks.*resume"):
        load_soft_labels(str(tmp_path / "half.zarr"), spec_of(ds))
    write_store(tmp_path / "k.zarr", ds, teacher, full=False)
    with pytest.raises(StoreError, match=r"keeps only top-3 logits"):
        load_soft_labels(str(tmp_path / "k.zarr"), spec_of(ds), form="logits")
    with pytest.raises(StoreError, match=r"temperature 2.0 was not declared.*\[4.0, 1.0\]"):
        load_soft_labels(str(tmp_path / "k.zarr"), spec_of(ds), tau=2.0)


def test_presets():
    p = preset_config("paper-cifar", "resnet8x4")
    assert (p.lr, p.batch_size, p.epochs, p.milestones, p.momentum, p.weight_decay) == \
        (0.05, 64, 240, (150, 180, 210), 0.9, 5e-4)
    assert preset_config("paper-cifar", "MobileNetV2").lr == 0.01
    assert preset_config("paper-cifar", "ShuffleV1").lr == 0.01
    assert preset_config("short-cpu", "mlp", lr=0.2).lr == 0.2
    with pytest.raises(Exception, match=r"unknown preset 'fast'.*\['paper-cifar', 'short-cpu'\]"):
        preset_config("fast")


@pytest.mark.parametrize("method", ["kd", "loca"])
def test_library_loss_from_store_matches_an_independent_reference(tmp_path, toy, method):
    """The loop feeds compute_loss the store's logits; KD equals an F.kl_div reference on the live teacher."""
    ds, teacher = toy
    write_store(tmp_path / "s.zarr", ds, teacher)
    sl = load_soft_labels(str(tmp_path / "s.zarr"), spec_of(ds))
    got, want = [], []
    run(ds, sl, method=method, epochs=1, hooks=Hooks(on_step=lambda e, s, b, l: got.append(float(l))))
    run(ds, PlainSource(N), method=method, epochs=1, teacher=teacher, loss_fn=kd_reference if method == "kd" else None,
        hooks=Hooks(on_step=lambda e, s, b, l: want.append(float(l))))
    assert got == pytest.approx(want, rel=1e-5)


def test_topk_store_gives_exact_sparse_teacher(tmp_path, toy):
    ds, teacher = toy
    _, z = write_store(tmp_path / "k.zarr", ds, teacher, full=False, top_k=3)
    sl = load_soft_labels(str(tmp_path / "k.zarr"), spec_of(ds), tau=1.0)
    assert sl.kind == "topk"
    b = next(sl.batches(0, 16, seed=0))
    sd = b.teacher["teacher_sparse"]
    p = torch.softmax(z[b.rows] / 1.0, dim=1)
    torch.testing.assert_close(sd.probs[:, :3], p.gather(1, sd.ids[:, :3]), rtol=1e-5, atol=1e-6)
    assert torch.equal(sd.ids[:, 3], sl.label[b.rows])
    torch.testing.assert_close(sd.tail + sd.probs.sum(1), torch.ones(16), rtol=0, atol=1e-5)
    # training with a sparse teacher runs end to end
    _, res = run(ds, sl, method="loca", epochs=1)
    assert math.isfinite(res.metrics["train_loss"])


def test_unknown_method_lists_the_valid_ones(toy):
    ds, _ = toy
    with pytest.raises(Exception, match=r"unknown loss method 'kdd'; valid methods: ce, kd, loca"):
        run(ds, PlainSource(N), method="kdd", epochs=1)


def test_blockkd_training_resumes_bit_identically_and_leaves_the_teacher_alone(tmp_path, toy):
    """Block-KD through the loop: the connectors are trained, checkpointed and restored; the teacher is not."""
    import copy

    from loca_pipe.pipeline.blockkd import build_blockkd

    ds, teacher = toy
    write_store(tmp_path / "s.zarr", ds, teacher)
    sl = load_soft_labels(str(tmp_path / "s.zarr"), spec_of(ds))

    def run_bk(out, hooks=None, resume=False):
        model = make_model(3)
        t = copy.deepcopy(teacher)
        bk = build_blockkd(model, "mlp_small", t, "mlp_small", 1, H)
        before = copy.deepcopy(bk.connectors.state_dict())
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, milestones=(1,), seed=3)
        train_student(model, images=ImageSet(ds, "cpu"), labels=ds.y, source=sl, method="blockkd_loca",
                      loss_cfg=LossConfig(tau=2.0, alpha=0.9, cross=0.5), cfg=cfg, out_dir=out, resume=resume,
                      hooks=hooks, blockkd=bk, identity={"method": "blockkd_loca"})
        return model, bk, before, t

    m_full, bk_full, before, t_full = run_bk(tmp_path / "a")
    assert not torch.equal(bk_full.connectors.state_dict()["0.0.weight"], before["0.0.weight"])  # trained
    assert all(torch.equal(a, b) for a, b in zip(t_full.state_dict().values(), teacher.state_dict().values()))

    with pytest.raises(Interrupt):
        run_bk(tmp_path / "b", hooks=STOP_AFTER_EPOCH_1)
    m_res, bk_res, _, _ = run_bk(tmp_path / "b", resume=True)
    for (k, a), (_, b) in zip(bk_full.state_dict().items(), bk_res.state_dict().items()):
        assert torch.equal(a, b), k
