"""Local mode's trial log (mergesearch/local/records.py): one JSON line per trial, read back
whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch.local.records import append_record, read_records
from support.local_inputs import trial_record as rec

pytestmark = pytest.mark.unit


def test_records_survive_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "trials.jsonl"
    first = rec("b-uniform", "baseline", 0.5, 0.5, 0.5)
    append_record(log, first)
    with log.open("a") as handle:
        handle.write('{"id": "g000-c0')  # killed mid-write
    assert read_records(log) == [first]
