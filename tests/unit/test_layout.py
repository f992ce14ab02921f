"""The source roots must never shadow the standard library's `operator` module."""

import operator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.unit
def test_operator_dir_is_not_a_package() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert callable(operator.itemgetter)
