"""docs/reliability.md is up to date: it equals the rendering of tests/dist/reliability.json; every row of the
record names a test that records it; and the check each fault test applies to its own row as it records it
(conftest.check_row) rejects a changed or a new row. Nothing here depends on which tests ran before."""

import ast
import json

import pytest

from .conftest import HERE, HINT, RECORD, check_row
from .make_reliability_doc import DOC, render


def test_reliability_doc_is_generated_from_the_record():
    rows = json.loads(RECORD.read_text())
    assert len(rows) >= 8
    assert DOC.read_text() == render(rows), HINT


def _recording_tests() -> dict[str, set[str]]:
    """test id (file::function) → the string constants in that function (decorators included)."""
    out: dict[str, set[str]] = {}
    for path in sorted(HERE.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                consts = {c.value for part in [node, *node.decorator_list] for c in ast.walk(part)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                if any(isinstance(c, ast.Name) and c.id == "reliability" for c in ast.walk(node)):
                    out[f"{path.name}::{node.name}"] = consts
    return out


def test_session_rows_equal_the_record():
    rows = json.loads(RECORD.read_text())
    tests = _recording_tests()
    assert len(tests) >= 5, "the fault tests were not found"
    for key, row in rows.items():
        assert row["test"] in tests, f"row {key!r} names {row['test']!r}, which records no rows; {HINT}"
        assert key in tests[row["test"]], f"row {key!r}: {row['test']} does not record this key; {HINT}"
        check_row(key, dict(row), rows)  # the committed row passes the check the fault tests apply
    key, row = sorted(rows.items())[0]
    with pytest.raises(AssertionError, match=f"row {key!r} changed"):
        check_row(key, {**row, "seen": row["seen"] + " (a changed message)"}, rows)
    with pytest.raises(AssertionError, match="new fault row 'no-such-fault'"):
        check_row("no-such-fault", row, rows)
