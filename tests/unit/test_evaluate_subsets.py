"""The seeded example subsets: the search's is unchanged, the confirmation one is disjoint."""

from __future__ import annotations

import pytest

from mergerunner.evaluate import EvaluationError, subset_indices

pytestmark = pytest.mark.unit


def test_search_subset_is_the_one_searches_always_used() -> None:
    # pinned: changing it would silently change every search's examples
    assert subset_indices("toy_add", 10, 4, 1234) == [3, 5, 7, 8]
    assert subset_indices("toy_add", 10, None, 1234) is None
    assert subset_indices("toy_add", 10, 10, 1234) is None


@pytest.mark.parametrize(("n_docs", "limit"), [(200, 100), (200, 50), (150, 100), (1000, 250)])
def test_confirmation_is_disjoint_seeded_and_as_large_as_possible(n_docs: int, limit: int) -> None:
    search = subset_indices("toy_add", n_docs, limit, 7)
    confirm = subset_indices("toy_add", n_docs, limit, 7, "confirmation")
    assert search is not None and confirm is not None
    assert not set(search) & set(confirm)
    assert len(confirm) == min(limit, n_docs - limit)
    assert confirm == sorted(confirm)
    assert confirm == subset_indices("toy_add", n_docs, limit, 7, "confirmation")
    assert confirm != subset_indices("toy_rev", n_docs, limit, 7, "confirmation") or (
        n_docs - limit <= limit
    )


def test_no_unseen_examples_is_an_error_naming_the_task() -> None:
    with pytest.raises(EvaluationError, match=r"toy_add.*no examples left for confirmation"):
        subset_indices("toy_add", 10, None, 1, "confirmation")
    with pytest.raises(EvaluationError, match="toy_add"):
        subset_indices("toy_add", 10, 10, 1, "confirmation")
