"""Generate docs/reliability.md from the fault / bad-input tests.

``python -m tests.dist.make_reliability_doc`` runs ``pytest tests/dist`` with ``LOCA_RELIABILITY_OUT`` set, so
every test that tries a fault records its row (what was tried, the message the user sees, what was kept)
into ``tests/dist/reliability.json``; then it renders the table into ``docs/reliability.md``.
``--render-only`` skips the test run. ``test_zz_reliability_doc.py`` checks the committed doc equals
:func:`render` of the committed record and that this session's rows equal the record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RECORD = HERE / "reliability.json"
DOC = REPO / "docs" / "reliability.md"

HEADER = """# Reliability: faults and bad input

What happens when things go wrong while caching, reading or training — each row below was **tried by a test**
in `tests/dist/` and the message column is the one that test saw (temporary paths, ports, pids, hosts and
times replaced by `<…>`). This file is generated: `python -m tests.dist.make_reliability_doc` re-runs the
tests and rewrites it, and `tests/dist/test_zz_reliability_doc.py` fails when it is out of date. How the
store makes this possible (chunk-wise done flags, CRC32C per chunk, the writer lease) is described in
[store-format.md](store-format.md) and, for several processes, in [scale-out.md](scale-out.md).

"""

FOOTER = """
## The mechanisms behind the table

* **Done flags.** A chunk's arrays are written whole, then its `done[c]` flag; a teacher is `complete` only
  after every flag. Readers (`LogitStore.teacher`) refuse an incomplete teacher (IncompleteStoreError);
  writers skip chunks whose flag is set, so any crash resumes where it stopped and re-computes only
  unfinished chunks, with the same batches (bit-identical result).
* **CRC32C per chunk.** Every chunk of every array ends with a CRC32C of its bytes. Every read through
  `TeacherView` (`view["logits"][rows]`, `.oindex`, `.probs`, `.sparse`, `.lse`, `.read`) turns zarr's bare
  checksum error into a StoreError naming the array, the chunk, its rows and its file. Readers that open
  the arrays with zarr directly get zarr's ValueError ("Stored and computed checksum do not match").
* **Writer lease.** `<store>/rows_done/writer-<teacher>.lease` (JSON: job id, host, pid, time), created with
  `O_CREAT|O_EXCL` locally or a conditional put (`If-None-Match: *`, fsspec `mode="xb"`) on S3. The ranks of
  one torchrun job share a job id and therefore the lease; another live job is refused; a lease whose pid is
  dead on the same host (or an unreadable lease file) is taken over; it is removed when the teacher is
  complete, or when a single-process run fails. Limits: a lease held on *another host* is never broken
  automatically (delete the file once that job is gone); back-ends without conditional puts fall back to
  check-then-write; several shards started by hand (`--shard/--num-shards` without torchrun) must share
  `LOCA_JOB_ID`.
* **File-system errors** (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) while writing become a StoreError that says
  what happened, that finished chunks are kept, and that the same command resumes. Output folders of
  analyze, calibrate, train-teacher, train-student and report are probed with a real temporary file
  *before* any work, so a read-only folder is one line (`cannot write … : the file system is read-only`),
  never a traceback after training.
* **Verify and repair.** `loca-pipe verify STORE` reads every chunk of every array (shared row arrays and
  each teacher's) that its done flag claims — a chunk still pending after a kill holds nothing claimed yet, and
  the resume rewrites whatever a torn write left there — and names each one failing its CRC32C — or, for id/label arrays, missing although its
  chunk is marked done — as array, chunk, file; it exits 1 and records the finding in the teacher's
  attributes (`verify_failed`), so `info` calls the teacher CORRUPT instead of complete. `--repair` takes
  the teacher's writer lease, deletes those chunk files, clears their done flags (`rows_done` and every
  teacher's `done` for a shared row chunk) and marks the teacher incomplete; the same `cache-logits`
  command then recomputes exactly those chunks, with the same batches, so the store is bit-identical to
  the original (only the `finished` time differs). A token store's sequence index (`offsets`, `position`), which
  `lm-cache` writes once from the data, is repaired the same way: its bad chunks are deleted, every
  teacher is marked incomplete, and the same `lm-cache` command rewrites them from the data (messages
  about a token store name `lm-cache`, not `cache-logits`).
* **Interrupts.** Ctrl-C (SIGINT) in any command exits 130 naming the command that resumes (`interrupted;
  resume with: loca-pipe …`; `train-student` gains `--resume`); chunks whose done flag is set are whole and kept, and calibrate's local workers stop after the
  chunk they are writing.
* **Training numerics.** Students and teachers train through one loop (`training.train_student`;
  `train-teacher` via `fit_teacher`): a NaN/inf loss stops it with a `NumericsError` naming the epoch, step
  and first sample ids, keeping the last finished epoch's checkpoint where the run writes one (students;
  `train-teacher` writes its outputs only after training, so a failed teacher run leaves none behind).
"""


def render(rows: dict[str, dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| fault or bad input | what the user sees | what is kept | test |", "|---|---|---|---|"]
    for key in sorted(rows):
        r = rows[key]
        lines.append(f"| {cell(r['tried'])} | {cell(r['seen'])} | {cell(r['kept'])} | `{cell(r['test'])}` |")
    return HEADER + "\n".join(lines) + "\n" + FOOTER


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--render-only" not in argv:
        if RECORD.exists():
            RECORD.unlink()
        env = {**os.environ, "LOCA_RELIABILITY_OUT": str(RECORD)}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE),
                              "--deselect", "tests/dist/test_zz_reliability_doc.py"], cwd=REPO, env=env)
        if res.returncode != 0:
            print("tests failed; the record may be partial", file=sys.stderr)
            return res.returncode
    rows = json.loads(RECORD.read_text())
    DOC.write_text(render(rows))
    print(f"wrote {DOC.relative_to(REPO)} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
