"""Output destinations are checked before any work: local paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergerunner.fetch import check_destination
from mergerunner.storage import FetchError

pytestmark = pytest.mark.unit


def test_nothing_there_yet_is_empty(tmp_path: Path) -> None:
    assert check_destination(str(tmp_path / "a" / "b")) == "empty"
    (tmp_path / "c").mkdir()
    assert check_destination(f"file://{tmp_path / 'c'}") == "empty"


def test_an_earlier_export_is_reported(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"x")
    assert check_destination(str(tmp_path / "out")) == "model"


@pytest.mark.parametrize("what", ["file", "other-files", "bad-scheme"])
def test_unusable_destinations_are_config_errors(tmp_path: Path, what: str) -> None:
    target = tmp_path / "out"
    uri = str(target)
    if what == "file":
        target.write_text("not a directory")
    elif what == "other-files":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        uri = "ftp://host/out/"
    with pytest.raises(FetchError) as caught:
        check_destination(uri)
    assert caught.value.kind == "config"
    assert ("out" in str(caught.value)) or ("ftp" in str(caught.value))
