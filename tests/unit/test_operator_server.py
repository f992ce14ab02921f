"""The evaluator endpoint's shell: token check, inbox, answers only after the plan is recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mergerunner.trial import TrialResult
from mergesearch.operator import server, warm
from mergesearch.operator.jobs import Owner
from mergesearch.operator.reconcile import Plan

pytestmark = pytest.mark.unit

KEY = b"k" * 16
OWNER = Owner("demo", "team-a", "uid-1")
PATH = "/v1/namespaces/team-a/mergesearches/demo/lease"
TOKEN = warm.search_token(KEY, OWNER)


def run(test: Any) -> None:
    async def main() -> None:
        inboxes = server.Inboxes()
        pokes: list[tuple[str, str]] = []
        app = server.make_app(inboxes, lambda: KEY, pokes.append)
        async with TestClient(TestServer(app)) as client:
            await test(client, inboxes, pokes)

    asyncio.run(main())


def headers(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_unknown_searches_wait_and_wrong_tokens_are_refused() -> None:
    async def test(client: TestClient, inboxes: server.Inboxes, pokes: list) -> None:
        response = await client.post(PATH, json={"evaluator": "ev"}, headers=headers())
        assert response.status == 503  # not reconciled yet (an operator that just started)
        inboxes.owners[("team-a", "demo")] = OWNER
        for token in ("", "forged", warm.search_token(KEY, Owner("demo", "team-a", "uid-2"))):
            response = await client.post(PATH, json={"evaluator": "ev"}, headers=headers(token))
            assert response.status == 401
        response = await client.post(PATH, json={"evaluator": ""}, headers=headers())
        assert response.status == 400 and "evaluator" in (await response.json())["error"]
        bad = {"evaluator": "ev", "posted": {"candidate": "c", "result": {"status": "maybe"}}}
        response = await client.post(PATH, json=bad, headers=headers())
        assert response.status == 400 and "posted.result" in (await response.json())["error"]
        assert pokes == [] and not inboxes.box(("team-a", "demo")).results

    run(test)


def test_a_request_is_answered_only_once_its_plan_is_recorded() -> None:
    async def test(client: TestClient, inboxes: server.Inboxes, pokes: list) -> None:
        key = ("team-a", "demo")
        inboxes.owners[key] = OWNER
        result = TrialResult(id="job-c0", status="succeeded", held_in={"t": 0.5}, fitness=0.5)
        body = {"evaluator": "ev", "posted": {"candidate": "c0", "result": result.to_wire()}}
        pending = asyncio.ensure_future(client.post(PATH, json=body, headers=headers()))
        while not pokes:
            await asyncio.sleep(0.01)
        assert pokes == [key]
        inbox, taken = inboxes.snapshot(key)
        assert inbox.requests == ("ev",) and inbox.results[0].result == result
        await asyncio.sleep(0.05)
        assert not pending.done()  # nothing is answered before the status write
        plan = Plan(
            status={},
            changed=True,
            consumed=("c0",),
            assignments={"ev": warm.Assignment("c1", '{"id": "job-c1"}')},
        )
        inboxes.settle(key, plan, taken)
        response = await pending
        assert await response.json() == {"lease": {"candidate": "c1", "trial": '{"id": "job-c1"}'}}
        assert inboxes.snapshot(key)[0] == warm.Inbox()  # the result was taken, once

    run(test)


def test_a_finished_search_tells_its_evaluators_to_stop() -> None:
    async def test(client: TestClient, inboxes: server.Inboxes, pokes: list) -> None:
        key = ("team-a", "demo")
        inboxes.owners[key] = OWNER
        pending = asyncio.ensure_future(
            client.post(PATH, json={"evaluator": "ev"}, headers=headers())
        )
        while not pokes:
            await asyncio.sleep(0.01)
        _, taken = inboxes.snapshot(key)
        inboxes.settle(key, Plan(status={}, changed=False, evaluators_done=True), taken)
        assert await (await pending).json() == {"done": True}

    run(test)
