"""Through the train-student stage: every method of a seed records one ``data_order`` (metrics.json), in
memory and with the teacher signal streamed (memory_limit_gb 0), and the seed changes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loca_pipe.stages.train_student import run
from tests.stages.test_train_student import HERE, env, make_store, make_teacher, params  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _toy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_every_method_of_a_seed_records_one_data_order(env, tmp_path):  # noqa: F811
    tmp, ck, teacher, store = env
    orders = {}
    for limit in (4.0, 0.0):
        for seed in (3, 4):
            for method in ("ce", "kd", "loca"):
                out = tmp_path / f"lim{limit}"
                m = run(params(out, store, method=method, alpha=0.9, seed=seed, epochs=1, memory_limit_gb=limit))
                written = json.loads((Path(out) / "runs" / m["run"] / "metrics.json").read_text())
                assert written["data_order"] == m["data_order"]
                orders[limit, seed, method] = m["data_order"]
    for limit in (4.0, 0.0):
        for seed in (3, 4):
            assert orders[limit, seed, "ce"] == orders[limit, seed, "kd"] == orders[limit, seed, "loca"]
        assert orders[limit, 3, "ce"] != orders[limit, 4, "ce"]
    assert orders[4.0, 3, "ce"] != orders[0.0, 3, "ce"]  # streamed: the block order, for CE too
