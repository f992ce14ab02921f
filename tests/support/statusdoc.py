"""Reading a MergeSearch status document as the API server stores it (camelCase JSON), for
assertions: through the operator's typed model, so a test reads what the operator wrote."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergesearch.operator.status import MergeSearchStatus


def condition(status: Mapping[str, Any] | MergeSearchStatus, type: str) -> dict[str, Any] | None:
    """The condition `type` of a status (a wire document or the model), as its JSON."""
    doc = status if isinstance(status, MergeSearchStatus) else MergeSearchStatus.read(status)
    cond = doc.condition(type)
    return None if cond is None else cond.to_wire()
