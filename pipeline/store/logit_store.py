"""The logit store: open or create the Zarr group, write its shared row arrays, create and open its teachers.

The array table (``pipeline/layout.py``) says what each group holds; :mod:`.teacher` writes and reads a teacher;
:mod:`.verify` checks and repairs chunks. Paths may be fsspec URLs (``s3://…``, ``memory://…``; :func:`open_zarr_group`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from loca_pipe.pipeline import layout
from loca_pipe.pipeline.codecs import get_codec
from loca_pipe.pipeline.errors import IncompleteStoreError, StoreConflictError, StoreError
from loca_pipe.pipeline.io import versions
from loca_pipe.pipeline.layout import array_codecs
from loca_pipe.pipeline.store.format import (
    _RUN_KEYS,
    ATTR,
    FORMAT,
    FORMAT_VERSION,
    LOGIT_DTYPES,
    VERIFY_ATTR,
    StoreInfo,
    _same_identity,
    cache_command,
    now,
)
from loca_pipe.pipeline.store.teacher import TeacherView, TeacherWriter


def root_sizes(info: StoreInfo, **dims: int) -> layout.Sizes:
    return layout.Sizes(dims={"row": info.num_rows, "chunk": info.num_chunks, "aug_param": len(info.aug_param_names),
                              **dims}, chunks={"row": info.chunk_rows}, num_classes=info.num_classes, task=info.task)


def _created_root_arrays() -> tuple[str, ...]:
    return tuple(a.name for a in layout.arrays(layout.ROOT) if a.writer != layout.INDEX)


def root_arrays() -> tuple[str, ...]:
    """Names of the arrays of the store group (the shared rows, their flag, a token store's index): the table's."""
    return tuple(a.name for a in layout.arrays(layout.ROOT))


def dimension_names() -> dict[str, tuple[str, ...]]:
    """Zarr v3 ``dimension_names`` of every array of the table (pipeline/layout.py), so xarray.open_zarr (and other
    readers that label axes) open the store and each teacher group as a data set: rows share the dimension
    ``row``, flags the dimension ``chunk``."""
    return {a.name: a.dims for a in layout.ARRAYS}


def dims(name: str) -> dict[str, Any]:
    """``{"dimension_names": …}`` for array ``name`` (empty for an array not in the table)."""
    a = layout.spec(name)
    return {"dimension_names": a.dims} if a is not None else {}


def _teacher_sizes(info: StoreInfo, K: int, T: int, logits_dtype: str | None, compress_logits: bool,
                   extra_dims: dict[str, int] | None = None, extra_chunks: dict[str, int] | None = None) -> Any:
    return layout.Sizes(dims={"row": info.num_rows, "chunk": info.num_chunks, "class": info.num_classes, "k": K,
                              "temperature": T, **(extra_dims or {})},
                        chunks={"row": info.chunk_rows, **(extra_chunks or {})}, num_classes=info.num_classes,
                        logits_dtype=logits_dtype, compress_logits=compress_logits, task=info.task)


def _create_row_arrays(group: zarr.Group, info: StoreInfo) -> None:
    sizes = root_sizes(info)
    for a in layout.arrays(layout.ROOT, sizes):
        if a.writer != layout.INDEX:  # a token store's index is written by pipeline/lm/cache.py, once
            layout.create(group, a, sizes)


def open_zarr_group(path: str, mode: str) -> zarr.Group:
    """``zarr.open_group`` on a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``…).

    An unknown protocol or a missing fsspec back-end (s3fs, gcsfs) becomes a StoreError saying what to install;
    credentials and endpoints come from the back-end's usual sources (for S3: AWS_* variables such as
    AWS_ENDPOINT_URL, ~/.aws, or fsspec's config files).
    """
    try:
        return zarr.open_group(path, mode=mode)
    except ImportError as exc:
        raise StoreError(f"cannot open logit store {path!r}: its URL needs an fsspec back-end that is not installed "
                         f"({exc}); install it (s3:// → s3fs, gs:// → gcsfs, az:// → adlfs)") from exc
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        raise StoreError(f"cannot open logit store {path!r}: {exc}; use a local path or an fsspec URL such as "
                         f"s3://bucket/name.zarr or memory://name.zarr") from exc


def _stores_below(path: str, limit: int = 3) -> str:
    """``"; stores below it: 'a.zarr', …"`` for logit stores up to two levels under a local folder, else ``""``."""
    if "://" in path or not Path(path).is_dir():
        return ""
    found = []
    for meta in sorted(Path(path).glob("*/zarr.json")) + sorted(Path(path).glob("*/*/zarr.json")):
        try:
            a = json.loads(meta.read_text()).get("attributes", {}).get(ATTR) or {}
        except (OSError, ValueError):
            continue
        if a.get("format") == FORMAT:
            found.append(str(meta.parent))
    if not found:
        return ""
    more = f" (+{len(found) - limit} more)" if len(found) > limit else ""
    return f"; logit stores below it: {', '.join(repr(f) for f in found[:limit])}{more}"


def not_a_store_message(path: str) -> str:
    """Why ``path`` cannot be opened as a logit store, and what to pass instead (one line)."""
    local = "://" not in path
    if local and Path(path).is_file():
        return f"{path!r} is a file, not a logit store (a Zarr v3 folder written by `loca-pipe cache-logits`)"
    if local and Path(path).is_dir():
        return (f"{path!r} is not a loca-pipe logit store: a folder without zarr.json{_stores_below(path)}; pass a "
                f"store folder written by `loca-pipe cache-logits` (for example data/logits/fashion-mnist-train.zarr)")
    return (f"no logit store at {path!r} (nothing is there); check the path, or create one with "
            f"`loca-pipe cache-logits --store {path} …`")


class LogitStore:
    """A logit store on local disk or any fsspec URL zarr understands."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = dict(group.attrs).get(ATTR)
        if not attrs or attrs.get("format") != FORMAT:
            if attrs and attrs.get("format") == "loca-pipe/targets":
                src = (attrs.get("source") or {}).get("store")
                raise StoreError(f"{path!r} is a targets store (written by `loca-pipe calibrate`), not a logit store; "
                                 f"pass the logit store it was made from{f' ({src!r})' if src else ''}, or give "
                                 f"this folder to train-student as --targets")
            raise StoreError(f"{path!r} is not a loca-pipe logit store (a Zarr group without {ATTR!r} attributes "
                             f"of format {FORMAT!r}); point --store at a folder written by `loca-pipe cache-logits`"
                             f"{_stores_below(path)}")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path!r} has store format version {attrs.get('format_version')}, this loca-pipe "
                             f"reads version {FORMAT_VERSION}; re-cache or use a matching loca-pipe")
        self.info = StoreInfo.from_attrs(attrs)

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, mode: str = "r") -> "LogitStore":
        """Open an existing store (mode 'r' or 'r+'); a missing or foreign path raises StoreError."""
        try:
            group = open_zarr_group(str(path), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
            raise StoreError(not_a_store_message(str(path))) from exc
        return cls(group, str(path))

    @classmethod
    def create_or_open(cls, path: str, info: StoreInfo, overwrite: bool = False) -> "LogitStore":
        """Open the store at ``path`` for writing, creating it if absent.

        An existing store must have the same identity (data fingerprint, split, rows, classes, views, chunking);
        otherwise StoreConflictError, unless ``overwrite`` — which deletes it first.
        """
        path = str(path)
        existing = None
        try:
            existing = cls.open(path, mode="r+")
        except StoreError:
            try:
                probe = open_zarr_group(path, mode="r")
                # a creation killed before its attributes were written leaves only row arrays: redo it
                interrupted = not dict(probe.attrs) and set(probe.keys()) <= set(_created_root_arrays())
                if (list(probe.keys()) or dict(probe.attrs)) and not interrupted:
                    if not overwrite:
                        raise StoreConflictError(f"{path!r} holds something that is not a loca-pipe store; "
                                                 f"choose another --store or pass --overwrite to replace it")
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
                pass
        if existing is not None and not overwrite:
            diffs = _same_identity(existing.info, info)
            if diffs:
                raise StoreConflictError(
                    f"store {path!r} belongs to another data set or layout ({'; '.join(diffs)}); "
                    f"use another --store, or pass --overwrite to replace it (its teachers are deleted)")
            return existing
        group = open_zarr_group(path, mode="w")
        _create_row_arrays(group, info)
        group.attrs[ATTR] = info.to_attrs()  # last: a store with attributes has all its row arrays
        return cls(group, path)

    # -- shared rows ----------------------------------------------------------------------------------
    def write_rows(self, c: int, sample_id: np.ndarray, label: np.ndarray, view: np.ndarray,
                   aug_params: np.ndarray | None = None) -> None:
        """Write the shared row arrays of chunk ``c``; if already written, check they are identical."""
        sl = self.info.chunk_slice(c)
        new = {"sample_id": np.asarray(sample_id, np.int64), "label": np.asarray(label, np.int64),
               "view": np.asarray(view, np.int16)}
        if self.info.aug_param_names:
            if aug_params is None:
                raise StoreError("this store caches augmented views; aug_params are required for every row")
            new["aug_params"] = np.asarray(aug_params, np.float32)
        for k, v in new.items():
            if v.shape[0] != sl.stop - sl.start:
                raise StoreError(f"chunk {c} needs {sl.stop - sl.start} rows of {k}; got {v.shape[0]}")
        if self.group["rows_done"][c]:
            for k, v in new.items():
                old = self.group[k][sl]
                if not np.array_equal(old, v):
                    raise StoreConflictError(
                        f"rows {sl.start}..{sl.stop - 1} of {k!r} differ from what the store holds: this run sees "
                        f"another sample order, labels or views than the store's first teacher; use another --store")
            return
        for k, v in new.items():
            self.group[k][sl] = v
        self.group["rows_done"][c] = 1

    # -- teachers -----------------------------------------------------------------------------------
    @property
    def teachers(self) -> list[str]:
        if "teachers" not in self.group:
            return []
        return sorted(self.group["teachers"].group_keys())

    def teacher_attrs(self, name: str) -> dict[str, Any]:
        """The teacher's ``loca_pipe`` attributes ({} if its creation was interrupted before they were set)."""
        return dict(dict(self._teacher_group(name).attrs).get(ATTR) or {})

    def _teacher_group(self, name: str) -> zarr.Group:
        if name not in self.teachers:
            have = ", ".join(self.teachers) or "none"
            raise StoreError(f"teacher {name!r} is not in store {self.path!r}; it holds: {have}")
        return self.group["teachers"][name]

    def is_complete(self, name: str) -> bool:
        return bool(self.teacher_attrs(name).get("complete", False))

    def pending_chunks(self, name: str) -> list[int]:
        g = self._teacher_group(name)
        if "done" not in g:  # creation interrupted: nothing of it counts
            return list(range(self.info.num_chunks))
        done = g["done"][:]
        return [int(c) for c in np.flatnonzero(done == 0)]

    def teacher(self, name: str | None = None, allow_incomplete: bool = False) -> "TeacherView":
        """Read access to one teacher's arrays; refuses a half-written teacher unless ``allow_incomplete``."""
        if name is None:
            if len(self.teachers) != 1:
                raise StoreError(f"store {self.path!r} holds {len(self.teachers)} teachers ({', '.join(self.teachers) or 'none'}); "
                                 f"name one")
            name = self.teachers[0]
        g = self._teacher_group(name)
        if not allow_incomplete and not self.is_complete(name):
            left = len(self.pending_chunks(name))
            # deferred on purpose: distributed imports torch, and only an incomplete teacher's message needs it
            from loca_pipe.pipeline.distributed import live_writer

            if (writer := live_writer(self.path, name)) is not None:  # issue #20: say a writer is running
                raise IncompleteStoreError(f"teacher {name!r} in {self.path!r} is incomplete ({left} of "
                                           f"{self.info.num_chunks} chunks not written): it is {writer}; wait for it")
            raise IncompleteStoreError(
                f"teacher {name!r} in {self.path!r} is incomplete ({left} of {self.info.num_chunks} chunks not "
                f"written): it is still being written or its run crashed; re-run the same `{cache_command(self.info.task)}` "
                f"command to resume it")
        return TeacherView(self, name, g)

    def begin_teacher(self, name: str, provenance: dict[str, Any], top_k: int, temperatures: Iterable[float],
                      logits_dtype: str | None = "float32", compress_logits: bool = False,
                      overwrite: bool = False, codec: str = "lossless",
                      extra_dims: dict[str, int] | None = None,
                      extra_chunks: dict[str, int] | None = None) -> "TeacherWriter":
        """Create (or reopen for resume) teacher ``name``. Provenance must match an existing teacher of that name.

        ``logits_dtype`` None keeps only top-k (the vocabulary-scale form). ``codec`` says how the top-k
        values and ids are stored (pipeline/codecs.py; resuming with another codec is refused).
        ``extra_dims`` gives the sizes of the job's own dimensions (a token store's ``draw``, ``sequence``,
        ``new_token``, ``greedy_chunk``; ``extra_chunks`` their chunk lengths): the table's arrays
        (pipeline/layout.py) with those dimensions are created with the teacher, before its attributes (so a
        joining shard finds them); the job's row arrays among them are written by ``write_chunk``.
        """
        cod = get_codec(codec)
        C = self.info.num_classes
        temps = [float(t) for t in temperatures]
        if not 1 <= top_k <= C:
            raise StoreError(f"--top-k must be in [1, {C}] (the teacher has {C} classes); got {top_k}")
        if not temps or any(not (t > 0 and math.isfinite(t)) for t in temps):
            raise StoreError(f"temperatures must be positive numbers; got {temps}")
        if logits_dtype is not None and logits_dtype not in LOGIT_DTYPES:
            raise StoreError(f"logits dtype must be one of {list(LOGIT_DTYPES)} (or none); got {logits_dtype!r}")
        settings = {"top_k": int(top_k), "temperatures": temps, "logits_dtype": logits_dtype,
                    "full_logits": logits_dtype is not None}
        if cod.name != "lossless":
            if self.info.task != "causal-lm":
                raise StoreError(f"codec {cod.name!r} is for token stores (lm-cache); the image readers read lossless "
                                 f"top-k, so cache-logits keeps codec 'lossless'")
            settings["codec"] = cod.attrs()
        cod.check(C, int(top_k))
        meta = {**provenance, **settings}
        teachers = self.group.require_group("teachers")
        if name in self.teachers and not overwrite and self.teacher_attrs(name):
            old = self.teacher_attrs(name)
            have = (old.get("codec") or {}).get("name", "lossless")
            if have != cod.name:
                raise StoreConflictError(
                    f"teacher {name!r} in {self.path!r} was written with codec {have!r}; this run asks for codec "
                    f"{cod.name!r}; resume with --codec {have}, or pass --overwrite to re-cache it with {cod.name!r}")
            diffs = [f"{k}: store has {old.get(k)!r}, this run has {v!r}" for k, v in meta.items()
                     if k not in _RUN_KEYS and old.get(k) != v]
            if diffs:
                raise StoreConflictError(
                    f"teacher {name!r} already in {self.path!r} with other settings ({'; '.join(diffs)}); "
                    f"pass --overwrite to replace it, or cache under another --name")
            return TeacherWriter(self, name, teachers[name])
        g = teachers.create_group(name, overwrite=True)
        sizes = _teacher_sizes(self.info, int(top_k), len(temps), logits_dtype, compress_logits, extra_dims,
                               extra_chunks)
        rows = []
        for spec in layout.arrays(layout.TEACHER, sizes):
            if spec.codec:  # the top-k values and ids, as the codec keeps them (its own arrays for a lossy codec)
                if spec.name == next(x.name for x in layout.ARRAYS if x.codec):
                    self._create_codec_arrays(g, cod, sizes)
                continue
            layout.create(g, spec, sizes)
            if spec.writer == layout.JOB:
                rows.append(spec.name)
        g.attrs[ATTR] = {**meta, "name": name, "created": now(), "versions": versions(), "complete": False,
                         **({"row_arrays": rows} if rows else {})}
        return TeacherWriter(self, name, g)

    @staticmethod
    def _create_codec_arrays(g: zarr.Group, cod: Any, sizes: Any) -> None:
        C, K, T = sizes.num_classes, sizes.dims["k"], sizes.dims["temperature"]
        for key, (width, dt, fill) in cod.arrays(C, K, T).items():
            dt = np.dtype(dt)
            g.create_array(key, shape=(sizes.dims["row"], width), chunks=(sizes.chunks["row"], width), dtype=dt,
                           fill_value=fill, **array_codecs(dt, sizes.compress_logits or cod.compress),
                           dimension_names=layout.dimension_names(key))

    def describe(self) -> dict[str, Any]:
        """What `loca-pipe info` prints: layout, teachers, completeness, provenance."""
        out: dict[str, Any] = {"path": self.path, **self.info.to_attrs(), "num_chunks": self.info.num_chunks,
                               "arrays": _describe_arrays(self.group), "teachers": {}}
        for t in self.teachers:
            a = self.teacher_attrs(t)
            pending = len(self.pending_chunks(t))
            out["teachers"][t] = {**a, "chunks_done": self.info.num_chunks - pending,
                                  "arrays": _describe_arrays(self._teacher_group(t))}
            if a.get(VERIFY_ATTR):  # `loca-pipe verify` found bad chunks: never reported as complete
                out["teachers"][t]["complete"] = False
        return out


def _describe_arrays(group: zarr.Group) -> dict[str, dict[str, Any]]:
    """``{name: {shape, dtype, written_by}}`` of the arrays in ``group``, the writer from the table (pipeline/layout.py)."""
    out = {}
    for k in sorted(group.array_keys()):
        arr, spec = group[k], layout.spec(k)
        out[k] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                  "written_by": spec.writer if spec is not None else "write_chunk (top-k codec)"}
    return out
