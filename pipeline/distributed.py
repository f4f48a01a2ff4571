"""Running one stage as several processes, and keeping two jobs off one store.

* :func:`world` / :func:`init_from_env` / :func:`barrier`: ``torch.distributed`` as torchrun sets it up
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); gloo on CPU, nccl on CUDA. Nothing here
  launches processes — torchrun (or any launcher setting those variables) does.
* :func:`job_id`: one id shared by every rank of one torchrun job and different for another job, so the
  ranks of one job share a writer lease while a second job is refused.
* :class:`WriterLease`: a per-teacher writer lease in the store (``<store>/rows_done/writer-<teacher>.lease``,
  a small JSON file holding job id, host, pid and time), created atomically — ``O_CREAT|O_EXCL`` on a
  local path, an exclusive create (``mode="xb"``, a conditional put where the back-end supports it) on an
  fsspec URL. A lease whose pid is dead on this host is stale and taken over; a live lease of another job
  makes the second job refuse with a StoreConflictError naming the holder and the lease file.
  Limits (docs/reliability.md): a lease held by a process on another host is never broken
  automatically (delete the lease file once that job is gone); on object stores without a conditional put
  the create is check-then-write, so two jobs starting within the same second may both pass.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from typing import Any

import torch

from loca_pipe.pipeline.errors import StoreConflictError, StoreError

LEASE_DIR = "rows_done"  # inside a zarr array folder: zarr never lists it as a group member


def world() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else torchrun's env, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device_type: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 and MASTER_ADDR is set; True if one is active.

    gloo on CPU, nccl on CUDA. A group that is already initialised is kept.
    """
    if not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not os.environ.get("MASTER_ADDR"):
        return False
    backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    return True


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op without an active process group)."""
    if active():
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def job_id() -> str:
    """Id shared by the ranks of one job: ``LOCA_JOB_ID``, else torchrun's run id / agent, else host:pid."""
    if os.environ.get("LOCA_JOB_ID"):
        return os.environ["LOCA_JOB_ID"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    port = os.environ.get("MASTER_PORT", "")
    if run_id and run_id != "none":  # multi-node torchrun: every node passes the same --rdzv-id
        return f"torchrun:{run_id}:{os.environ.get('MASTER_ADDR', '')}:{port}"
    if run_id is not None or os.environ.get("LOCAL_RANK") is not None:  # single-node torchrun: one agent
        return f"torchrun:{socket.gethostname()}:{os.getppid()}:{port}"
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def live_writer(store_path: str, teacher: str) -> str | None:
    """"being written now by host H, pid P (since T)" when a live job holds the teacher's writer lease, else None
    (no lease, or its process is dead on this host): what an incomplete teacher's message says first."""
    try:
        lease = WriterLease(store_path, teacher)
        rec = lease.read()
    except Exception:  # noqa: BLE001 - the lease only words the message; the store's own error follows
        return None
    if not rec or lease.holder_is_stale(rec):
        return None
    return f"being written now by a running job (host {rec.get('host')}, pid {rec.get('pid')}, since {rec.get('time')})"


class WriterLease:
    """The writer lease of one teacher in one store (see the module docstring)."""

    def __init__(self, store_path: str, teacher: str, storage_options: dict[str, Any] | None = None):
        self.store_path, self.teacher = str(store_path), teacher
        self.storage_options = storage_options or {}
        name = f"writer-{teacher}.lease"
        if _is_url(self.store_path):
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(self.store_path, **self.storage_options)
            self.path = f"{root.rstrip('/')}/{LEASE_DIR}/{name}"
        else:
            self.fs = None
            self.path = os.path.join(self.store_path.removeprefix("file://"), LEASE_DIR, name)
        self.job = job_id()

    @property
    def location(self) -> str:
        return self.path if self.fs is None else f"{self.store_path.split('://')[0]}://{self.path}"

    def _record(self) -> dict[str, Any]:
        return {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def read(self) -> dict[str, Any] | None:
        try:
            if self.fs is None:
                with open(self.path, "rb") as f:
                    raw = f.read()
            else:
                if not self.fs.exists(self.path):
                    return None
                raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw.decode())
        except (ValueError, UnicodeDecodeError):
            return {"job": None, "host": None, "pid": None, "time": None, "unreadable": True}

    def _create(self) -> bool:
        """Atomically create the lease with our record; False if it already exists."""
        data = json.dumps(self._record()).encode()
        if self.fs is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return True
        try:
            with self.fs.open(self.path, "xb") as f:  # conditional put (If-None-Match) where supported
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # no exclusive mode: check, then write
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            return True

    def _remove(self) -> None:
        try:
            if self.fs is None:
                os.remove(self.path)
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def holder_is_stale(self, rec: dict[str, Any]) -> bool:
        """A lease is stale when its process is dead on this host (or the file is unreadable garbage)."""
        if rec.get("unreadable"):
            return True
        return rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) \
            and not _pid_alive(rec["pid"])

    def acquire(self) -> dict[str, Any]:
        """Take the lease (or join it: same job id). Raises StoreConflictError if another live job holds it."""
        for _ in range(5):
            if self._create():
                return self._record()
            rec = self.read()
            if rec is None:
                continue  # released between our create and read: try again
            if rec.get("job") == self.job:
                return rec
            if self.holder_is_stale(rec):
                self._remove()
                continue
            raise StoreConflictError(
                f"teacher {self.teacher!r} in {self.store_path!r} is being written by another job (job "
                f"{rec.get('job')}, host {rec.get('host')}, pid {rec.get('pid')}, since {rec.get('time')}); "
                f"two jobs must not write one teacher at once — wait for it to finish, or, if that job is "
                f"gone, delete the lease file {self.location!r} and run again")
        raise StoreError(f"could not take the writer lease {self.location!r} (it kept changing); run again")

    def check(self) -> bool:
        """True if our job holds the lease."""
        rec = self.read()
        return rec is not None and rec.get("job") == self.job

    def release(self) -> None:
        """Drop the lease if our job holds it."""
        rec = self.read()
        if rec is not None and rec.get("job") == self.job:
            self._remove()
