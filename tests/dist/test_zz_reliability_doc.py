"""docs/reliability.md is up to date: it equals the rendering of tests/dist/reliability.json, and every row
recorded by this session's fault tests (those that ran before this file, in file-name order) equals the
committed record."""

import json

from .conftest import RECORD, SESSION_ROWS
from .make_reliability_doc import DOC, render

HINT = "run `python -m tests.dist.make_reliability_doc` and commit docs/reliability.md + tests/dist/reliability.json"


def test_reliability_doc_is_generated_from_the_record():
    rows = json.loads(RECORD.read_text())
    assert len(rows) >= 8
    assert DOC.read_text() == render(rows), HINT


def test_session_rows_equal_the_record():
    rows = json.loads(RECORD.read_text())
    for key, row in SESSION_ROWS.items():
        assert key in rows, f"new fault row {key!r}; {HINT}"
        assert rows[key] == row, f"row {key!r} changed: {row} vs {rows[key]}; {HINT}"
