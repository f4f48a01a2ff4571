"""Student epoch time: training from the logit store vs the in-memory floor, CE, and online KD.

One process, real Fashion-MNIST, the default student (``mlp_small``) with the short-cpu batch size, the
default teacher architecture (``cnn``, random init — the ratios do not depend on its accuracy). Prints:

  store / in-memory KD   epoch from the Zarr store ÷ KD with the logits as one in-memory tensor (goal ≤ 1.05)
  store / CE             ÷ a CE-only epoch (the KD loss itself costs something on a tiny student)
  online / store         online KD (teacher forward every step) ÷ store epoch (speed-up; goal ≥ 10×)

and, for Block-KD (student ``cnn_small``, teacher ``cnn``, two blocks each, connectors 1×1 conv + BN):

  Block-KD / KD          Block-KD from the store (hybrids run the teacher's later blocks) ÷ KD from the store
  Block-KD store / online  Block-KD from the store ÷ Block-KD with the teacher's full forward online for the
                         KL targets (what the cache saves Block-KD)

Epoch times are the minimum of interleaved repeats (the machine is shared and noisy; noise only adds). ``LOCA_BENCH_QUICK=1``
uses 1,024 samples and one repeat; ``LOCA_BENCH_N=N`` the first N samples.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    from loca_pipe.pipeline.blockkd import build_blockkd
    from loca_pipe.pipeline.data import open_dataset
    from loca_pipe.pipeline.losses import LossConfig
    from loca_pipe.pipeline.models import build_model
    from loca_pipe.pipeline.soft_labels import PlainSource, TensorSource, load_soft_labels
    from loca_pipe.pipeline.caching import summarize_logits
    from loca_pipe.pipeline.store import LogitStore, StoreInfo, default_chunk_rows
    from loca_pipe.pipeline.training import ImageSet, TrainConfig, preset_config, train_student

    quick = os.environ.get("LOCA_BENCH_QUICK") == "1"
    threads = int(os.environ.get("LOCA_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    repeats = 1 if quick else 5
    spec = open_dataset("fashion-mnist", "train")
    n = 1024 if quick else min(len(spec), int(os.environ.get("LOCA_BENCH_N", len(spec))))
    images = ImageSet(spec.dataset, "cpu")
    images.images = images.images[:n]
    labels = torch.as_tensor(spec.labels[:n], dtype=torch.int64)
    C = spec.num_classes
    short = preset_config("short-cpu", "mlp_small")
    cfg = TrainConfig(epochs=1, batch_size=short.batch_size, lr=short.lr, milestones=(), seed=0)
    loss_cfg = LossConfig()

    torch.manual_seed(0)
    teacher = build_model("cnn", C, spec.in_channels, spec.image_size).eval()
    torch.set_num_threads(max(threads, torch.get_num_threads(), 2))  # the one-off teacher pass may use both cores
    t0 = time.perf_counter()
    with torch.no_grad():
        z = torch.cat([teacher(images.images[i:i + 1024]) for i in range(0, n, 1024)])
    t_teacher = time.perf_counter() - t0
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store.zarr")
        info = StoreInfo(task="classification", num_samples=n, num_views=1, num_rows=n, num_classes=C,
                         chunk_rows=min(n, default_chunk_rows(C)),
                         dataset={"name": "fashion-mnist", "split": "train", "fingerprint": spec.fingerprint})
        store = LogitStore.create_or_open(path, info)
        w = store.begin_teacher("cnn", {"teacher": "cnn"}, top_k=5, temperatures=(1.0, 4.0))
        for c in range(info.num_chunks):
            sl = info.chunk_slice(c)
            store.write_rows(c, np.arange(sl.start, sl.stop), spec.labels[sl], np.zeros(sl.stop - sl.start))
            arrays = {k: v.numpy() for k, v in summarize_logits(z[sl], labels[sl], 5, (1.0, 4.0)).items()}
            arrays["logits"] = z[sl].numpy()
            w.write_chunk(c, arrays)
        w.finalize()
        t0 = time.perf_counter()
        sl_store = load_soft_labels(path, spec, tau=4.0)
        t_load = time.perf_counter() - t0

        def epoch(source, method, teacher_model=None, student="mlp_small") -> float:
            torch.manual_seed(1)
            model = build_model(student, C, spec.in_channels, spec.image_size)
            bk = None
            if method.startswith("blockkd"):
                bk = build_blockkd(model, student, teacher, "cnn", spec.in_channels, spec.image_size)
            t = time.perf_counter()
            train_student(model, images=images, labels=labels, source=source, method=method, loss_cfg=loss_cfg,
                          cfg=cfg, teacher_model=teacher_model, do_eval=False, blockkd=bk)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {"store": [], "memory": [], "ce": [], "online": []}
        runs = {"store": (sl_store, "kd", None), "memory": (TensorSource(z), "kd", None), "ce": (PlainSource(n), "ce", None)}
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate order against drift
            for k in order:
                times[k].append(epoch(*runs[k]))
            if r < (1 if quick else 2):
                times["online"].append(epoch(PlainSource(n), "kd", teacher_model=teacher))
        bk_runs = {"kd_cnn": (sl_store, "kd", None, "cnn_small"), "blockkd": (sl_store, "blockkd", None, "cnn_small"),
                   "blockkd_online": (PlainSource(n), "blockkd", teacher, "cnn_small")}
        for r in range(1 if quick else 2):
            for k in (list(bk_runs) if r % 2 == 0 else list(reversed(bk_runs))):
                times.setdefault(k, []).append(epoch(*bk_runs[k]))

    # min over repeats: the machine is shared, and noise only ever adds time (timeit's rule)
    med = {k: min(v) for k, v in times.items()}
    t_online = med["online"]
    print(f"bench_train: Fashion-MNIST {n} samples, student mlp_small, teacher cnn (random init), batch "
          f"{cfg.batch_size}, {threads} thread(s), min of {repeats} interleaved epochs (online: {len(times['online'])})")
    print(f"  teacher pass over the data (cache cost, no I/O): {t_teacher:.2f} s; store load into memory: {t_load:.3f} s")
    print(f"  epoch seconds: store {med['store']:.2f}  in-memory KD {med['memory']:.2f}  CE {med['ce']:.2f}  "
          f"online KD {t_online:.2f}")
    print(f"  store / in-memory KD = {med['store'] / med['memory']:.3f}  (goal <= 1.05)")
    print(f"  store / CE           = {med['store'] / med['ce']:.3f}")
    print(f"  online / store       = {t_online / med['store']:.1f}x speed-up  (goal >= 10x)")
    print(f"  samples/s from the store: {n / med['store']:.0f}")
    print(f"  Block-KD (student cnn_small, teacher cnn, 2 blocks), epoch seconds: KD from the store {med['kd_cnn']:.2f}  "
          f"Block-KD from the store {med['blockkd']:.2f}  Block-KD with the teacher online {med['blockkd_online']:.2f}")
    print(f"  Block-KD / KD (both from the store)      = {med['blockkd'] / med['kd_cnn']:.2f}")
    print(f"  Block-KD store / Block-KD online teacher = {med['blockkd'] / med['blockkd_online']:.2f}")
    print("  all epoch times (s): " + "; ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()))


if __name__ == "__main__":
    main()
