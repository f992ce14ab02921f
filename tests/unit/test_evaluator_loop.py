"""The warm evaluator's lease loop against a scripted endpoint (benchmarking-mode trials)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mergerunner.evaluator import EXIT_CONFIG, EXIT_DONE, WarmTrials, serve, setup_key
from mergerunner.trial import parse_trial

pytestmark = pytest.mark.unit


def document(trial_id: str, a: float) -> str:
    return json.dumps(
        {
            "apiVersion": "mergerunner.mergesearch.io/v2",
            "id": trial_id,
            "checkpoints": [{"name": "a", "uri": "s3://b/a/"}, {"name": "b", "uri": "s3://b/b/"}],
            "weights": {"a": a, "b": 1 - a},
            "heldIn": [{"task": "t1"}],
            "evaluator": {"backend": "analytic"},
        }
    )


class Endpoint:
    """Answers in order; records every request body."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, url: str, token: str, body: Mapping[str, Any]) -> tuple[int, dict]:
        assert url == "http://op/lease" and token == "tok"
        self.bodies.append(json.loads(json.dumps(body)))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def lease(candidate: str, doc: str) -> tuple[int, dict[str, Any]]:
    return 200, {"lease": {"candidate": candidate, "trial": doc}}


def test_results_ride_on_the_next_request_and_survive_an_unreachable_endpoint(
    tmp_path: Path,
) -> None:
    endpoint = Endpoint(
        [
            lease("c0", document("job-c0", 0.25)),
            ConnectionRefusedError("operator restarting"),
            (503, {}),
            (200, {"wait": True}),
            lease("c1", document("job-c1", 0.5)),
            (200, {"done": True}),
        ]
    )
    sleeps: list[float] = []
    code = serve(
        "http://op/lease", "ev-0", "tok", WarmTrials(tmp_path), post=endpoint, sleep=sleeps.append
    )
    assert code == EXIT_DONE
    first, retry, after_503, after_wait, second, last = endpoint.bodies
    assert "posted" not in first and first["evaluator"] == "ev-0"
    assert retry["posted"] == after_503["posted"] == after_wait["posted"]
    assert retry["posted"]["candidate"] == "c0"
    assert retry["posted"]["result"]["id"] == "job-c0"
    assert retry["posted"]["result"]["status"] == "succeeded"
    assert "posted" not in second  # acknowledged by the 200 "wait" answer
    assert last["posted"]["candidate"] == "c1" and last["posted"]["result"]["id"] == "job-c1"
    assert sleeps  # backed off while unreachable


def test_each_trial_is_logged_with_its_timings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = Endpoint([lease("c0", document("job-c0", 0.25)), (200, {"done": True})])
    resident_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE"
    )
    with caplog.at_level("INFO", logger="mergerunner.evaluator"):
        serve(
            "http://op/lease",
            "ev",
            "tok",
            WarmTrials(tmp_path),
            post=endpoint,
            sleep=lambda s: None,
        )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ")]
    record = json.loads(line.split(" ", 1)[1])
    assert record["trial"] == "job-c0" and record["status"] == "succeeded"
    assert record["doneAt"] >= record["leasedAt"] and "mergeS" in record["timings"]
    assert record["mergeCpuS"] == 0.0  # an analytic trial merges nothing
    assert record["bytesFetched"] == 0
    # This process's high-water mark, in bytes (ru_maxrss is in kilobytes: 1024 times less).
    # The kernel folds per-thread RSS counts into it lazily, so it may trail by a few pages.
    assert record["peakRssBytes"] >= resident_before * 0.9


def test_a_refused_token_ends_the_evaluator_with_the_configuration_exit_code(
    tmp_path: Path,
) -> None:
    endpoint = Endpoint([(401, {"error": "bad token"})] * 5)
    code = serve(
        "http://op/lease", "ev", "tok", WarmTrials(tmp_path), post=endpoint, sleep=lambda s: None
    )
    assert code == EXIT_CONFIG and len(endpoint.bodies) == 5


def test_an_unreadable_document_is_reported_as_bad_input(tmp_path: Path) -> None:
    endpoint = Endpoint([lease("c0", '{"id": "job-c0", "weights": "no"}'), (200, {"done": True})])
    serve("http://op/lease", "ev", "tok", WarmTrials(tmp_path), post=endpoint, sleep=lambda s: None)
    posted = endpoint.bodies[1]["posted"]
    assert posted["candidate"] == "c0"
    assert posted["result"]["id"] == "job-c0"
    assert posted["result"]["errorKind"] == "invalid-input"


def test_documents_of_one_search_share_their_setup() -> None:
    one, two = parse_trial(document("x", 0.1)), parse_trial(document("y", 0.9))
    assert setup_key(one) == setup_key(two)
    other = parse_trial(document("x", 0.1).replace('"t1"', '"t2"'))
    assert setup_key(other) != setup_key(one)


def test_the_command_without_endpoint_or_token_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergerunner import cli

    for name in ("MERGESEARCH_EVALUATOR_URL", "MERGESEARCH_EVALUATOR_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["evaluator"]) == EXIT_CONFIG
    missing = tmp_path / "no-token"
    argv = ["evaluator", "--endpoint", "http://op/lease", "--token-file", str(missing)]
    assert cli.main(argv) == EXIT_CONFIG
