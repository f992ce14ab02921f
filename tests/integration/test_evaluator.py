"""The warm evaluator's trials on real parts (S3 server, toy checkpoints, lm-eval): the same
digest and scores as a one-Job trial, bit for bit, and checkpoints fetched once per cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_runner_trial import bucket, trial  # noqa: F401 - the module's S3 fixture

from mergerunner.evaluator import WarmTrials
from mergerunner.run import run_trial
from mergerunner.trial import parse_trial

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_warm_trials_equal_one_job_trials_and_fetch_once(
    s3_server: Any,
    toy_pool: Any,
    bucket: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    names = list(toy_pool.checkpoints)
    mixes = [
        {n: round(1 / len(names), 6) for n in names},
        {n: (0.7 if i == 0 else round(0.3 / (len(names) - 1), 6)) for i, n in enumerate(names)},
    ]
    node_cache = tmp_path / "node-cache"
    warm = WarmTrials(cache_dir=node_cache)
    digests = []
    for i, weights in enumerate(mixes):
        doc = parse_trial(
            json.dumps(trial(toy_pool, bucket, id=f"t-{i}", weights=weights, output={}))
        )
        hot = warm.run(doc)
        cold = run_trial(doc, cache_dir=tmp_path / f"job-cache-{i}", work_dir=tmp_path)
        assert hot.status == cold.status == "succeeded", (hot.error, cold.error)
        assert hot.digest == cold.digest  # the same merged bytes, bit for bit
        assert hot.held_in == cold.held_in and hot.held_out == cold.held_out
        assert hot.fitness == cold.fitness
        digests.append(hot.digest)
        if i == 0:
            fetched = warm.bytes_fetched
            assert fetched > 0 and hot.timings.fetch_s > 0
        else:
            assert hot.timings.fetch_s == 0.0  # resident: nothing fetched or loaded again
            assert warm.bytes_fetched == fetched
            # A merge on one thread: CPU time, positive, within its wall time (+ a tick).
            assert 0 < warm.merge_cpu_s <= hot.timings.merge_s + 0.02
    assert digests[0] != digests[1]
    # A second evaluator on the same node (the same cache directory) fetches 0 bytes.
    neighbour = WarmTrials(cache_dir=node_cache)
    again = neighbour.run(doc)
    assert again.digest == hot.digest and neighbour.bytes_fetched == 0
