"""pipeline/guard.py and the atomic writer's special-file rule (issue #20), in-process and fast."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.guard import FILE, FOLDER, LOGITS, TARGETS, _inside, check_outputs, kind_of, special_kind
from loca_pipe.pipeline.io import atomic_write_text, write_json


def _store(folder, fmt="loca-pipe/logit-store"):
    folder.mkdir(parents=True)
    (folder / "zarr.json").write_text('{"node_type": "group", "attributes": {"loca_pipe": {"format": "%s"}}}' % fmt)
    return folder


def test_special_files_are_named():
    assert special_kind("/dev/null") == "a character device"
    assert special_kind("/") is None and special_kind(__file__) is None and special_kind("/no/such/path") is None


def test_atomic_writer_never_renames_over_a_fifo_or_a_folder(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"it is a FIFO \(named pipe\), not a regular file"):
        atomic_write_text(fifo, "x")
    link = tmp_path / "link"
    link.symlink_to(fifo)  # a link is followed: the FIFO behind it is refused too
    with pytest.raises(ConfigError, match="FIFO"):
        write_json(link, {})
    with pytest.raises(ConfigError, match="it is a folder"):
        atomic_write_text(tmp_path, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link"]  # no temporary left behind
    atomic_write_text(tmp_path / "f.txt", "ok")  # a regular file is still written and replaced
    atomic_write_text(tmp_path / "f.txt", "ok2")
    assert (tmp_path / "f.txt").read_text() == "ok2"


def test_atomic_writer_refuses_a_device_before_writing():
    """/dev/null is refused before anything is written (never replaced: we run as root)."""
    with pytest.raises(ConfigError, match="character device"):
        atomic_write_text("/dev/null", "x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_kinds_by_marker(tmp_path):
    assert kind_of(_store(tmp_path / "a.zarr")) == LOGITS
    assert kind_of(_store(tmp_path / "t.zarr", "loca-pipe/targets")) == TARGETS
    assert kind_of(_store(tmp_path / "z.zarr", "")) == "zarr group"
    (tmp_path / "c.pt").write_bytes(b"x")
    assert kind_of(tmp_path / "c.pt") is None  # no sidecar: an ordinary file
    (tmp_path / "c.pt.json").write_text('{"arch": "mlp"}')
    assert kind_of(tmp_path / "c.pt") == kind_of(tmp_path / "c.pt.json") == "teacher checkpoint"


def test_same_kind_is_allowed_other_kinds_refused(tmp_path):
    s = _store(tmp_path / "s.zarr")
    t = _store(tmp_path / "t.zarr", "loca-pipe/targets")
    check_outputs({}, {"--store": (s, LOGITS)})  # a logit store where a logit store is written: its own rules decide
    check_outputs({}, {"--out": (t, TARGETS)})
    check_outputs({}, {"--out": (tmp_path / "new", FOLDER)})  # nothing there yet
    with pytest.raises(ConfigError, match=r"is a logit store; this command writes a targets store there"):
        check_outputs({}, {"--out": (s, TARGETS)})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds something other than a targets store"):
        check_outputs({}, {"--out": (tmp_path / "junk", TARGETS)})  # --overwrite would have deleted notes.txt
    with pytest.raises(ConfigError, match="contains the logit store"):
        check_outputs({}, {"--out": (tmp_path, FOLDER)})
    check_outputs({"--store": "s3://bucket/x.zarr"}, {"--out": ("s3://bucket/x.zarr", TARGETS)})  # URLs: back-end's


def test_an_interrupted_store_creation_can_be_resumed(tmp_path):
    """A creation killed before the attributes leaves a zarr group of row arrays only: not refused."""
    g = _store(tmp_path / "s.zarr", "")
    (g / "sample_id").mkdir()
    check_outputs({}, {"--store": (g, LOGITS)})
    (g / "mine").mkdir()
    with pytest.raises(ConfigError, match="zarr group that is not a loca-pipe logit store"):
        check_outputs({}, {"--store": (g, LOGITS)})


parts = st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=4)


@settings(max_examples=200, deadline=None)
@given(inp=parts, out=parts)
def test_overlap_is_exactly_prefix_relation(tmp_path_factory, inp, out):
    """Refused iff one path is the other or lies inside it (compared component-wise, never as strings)."""
    base = tmp_path_factory.getbasetemp() / "overlap"
    i, o = base.joinpath("x", *inp), base.joinpath("x", *out)
    overlap = inp[:len(out)] == out or out[:len(inp)] == inp
    assert (_inside(o, i) or _inside(i, o)) == overlap
    try:
        check_outputs({"IN": i}, {"--out": (o, FILE)})
        refused = False
    except ConfigError as exc:
        refused = True
        assert str(i) in str(exc) and str(o) in str(exc)  # names both paths
    assert refused == overlap


def test_a_sibling_with_a_common_prefix_is_not_inside(tmp_path):
    check_outputs({"STORE": tmp_path / "s.zarr"}, {"--out": (tmp_path / "s.zarr2", FOLDER)})


def test_the_guard_knows_the_stores_formats():
    """guard.py names the formats without importing the store modules (zarr, torch): the same strings."""
    from loca_pipe.pipeline import guard, store, targets

    assert guard._FORMATS == {store.FORMAT: LOGITS, targets.FORMAT: TARGETS}
