"""The evaluator endpoint: warm evaluators lease candidates and post results here.

`POST /v1/namespaces/{namespace}/mergesearches/{name}/lease` with `Authorization: Bearer
<token>` (the search's token, `warm.search_token`, mounted from the Secret the operator made)
and a JSON body `{"evaluator": <pod name>, "posted": {"candidate", "result"}?, "stats"?}`.
The answer is `{"lease": {"candidate", "trial"}}`, `{"wait": true}` (nothing to lease within
`HOLD_S`: ask again) or `{"done": true}` (the search is not running: exit).

The handler decides nothing. It puts the request and the posted result in the search's inbox,
wakes the search's daemon and waits: the daemon's next reconcile (the pure
`reconcile.reconcile`, with the inbox as input) tells the result and chooses the lease, writes
the status compare-and-set, and only then answers. So a lease handed out is always recorded
first, and a result enters the search exactly once, through that status write. The inbox is
memory: an operator restart loses what it held, and the evaluators' retries restore it (an
evaluator that asks while still holding a lease gets the same candidate again and posts it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from mergerunner.trial import TrialResult
from mergesearch.operator import warm
from mergesearch.operator.jobs import Owner
from mergesearch.operator.reconcile import Plan

log = logging.getLogger("mergesearch.operator.evaluators")
Key = tuple[str, str]
HOLD_S = 20.0  # a request without work waits this long before it is answered "wait"
MAX_BODY = 1 << 20  # a result is a few KiB; anything near this is not one
NAME_CHARS = 253


@dataclass
class _Waiting:
    evaluator: str
    answer: asyncio.Future[dict[str, Any]]


@dataclass
class SearchInbox:
    waiting: dict[str, _Waiting] = field(default_factory=dict)
    results: list[warm.Posted] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Inboxes:
    """Per search: evaluators waiting for an answer and results not yet told."""

    owners: dict[Key, Owner] = field(default_factory=dict)
    boxes: dict[Key, SearchInbox] = field(default_factory=dict)

    def box(self, key: Key) -> SearchInbox:
        return self.boxes.setdefault(key, SearchInbox())

    def snapshot(self, key: Key) -> tuple[warm.Inbox, list[warm.Posted]]:
        box = self.boxes.get(key)
        if box is None:
            return warm.Inbox(), []
        results = list(box.results)
        fetched = {
            name: int(stats["bytesFetched"])
            for name, stats in box.stats.items()
            if isinstance(stats.get("bytesFetched"), int) and stats["bytesFetched"] >= 0
        }
        return warm.Inbox(tuple(box.waiting), tuple(results), fetched), results

    def settle(self, key: Key, plan: Plan, taken: list[warm.Posted]) -> None:
        """After the plan's status write succeeded (or nothing needed writing): drop the
        results it handled, answer the evaluators it leased to (or all, when done)."""
        box = self.boxes.get(key)
        if box is None:
            return
        consumed = list(plan.consumed)
        for posted in taken:
            if posted.candidate in consumed:
                consumed.remove(posted.candidate)
                box.results = [p for p in box.results if p is not posted]
        for evaluator, waiting in list(box.waiting.items()):
            assignment = plan.assignments.get(evaluator)
            if assignment is not None:
                answer = {
                    "lease": {"candidate": assignment.candidate, "trial": assignment.document}
                }
            elif plan.evaluators_done:
                answer = {"done": True}
            else:
                continue
            del box.waiting[evaluator]
            if not waiting.answer.done():
                waiting.answer.set_result(answer)

    def forget(self, key: Key) -> None:
        box = self.boxes.pop(key, None)
        self.owners.pop(key, None)
        for waiting in box.waiting.values() if box else ():
            if not waiting.answer.done():
                waiting.answer.set_result({"done": True})


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else ""


def _parse(body: Any) -> tuple[str, warm.Posted | None, dict[str, Any]]:
    """(evaluator, posted result, stats) from a request body; ValueError names what is bad."""
    if not isinstance(body, dict):
        raise ValueError("body: must be a JSON object")
    evaluator = body.get("evaluator")
    if not isinstance(evaluator, str) or not 0 < len(evaluator) <= NAME_CHARS:
        raise ValueError("evaluator: must be the pod's name")
    posted = body.get("posted")
    result: warm.Posted | None = None
    if posted is not None:
        if not isinstance(posted, dict) or not isinstance(posted.get("candidate"), str):
            raise ValueError("posted.candidate: must be a string")
        try:
            trial = TrialResult.model_validate(posted.get("result"))
        except ValidationError as exc:
            raise ValueError(f"posted.result: {exc.errors()[0]['msg']}") from None
        result = warm.Posted(evaluator, posted["candidate"], trial)
    stats = body.get("stats") if isinstance(body.get("stats"), dict) else {}
    return evaluator, result, stats


def make_app(
    inboxes: Inboxes, key_bytes: Callable[[], bytes | None], poke: Callable[[Key], None]
) -> web.Application:
    """The aiohttp application; `poke` wakes a search's daemon."""

    async def lease(request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        owner = inboxes.owners.get(key)
        secret = key_bytes()
        if owner is None or secret is None:  # not reconciled yet (a restart): ask again
            return web.json_response({"error": "search not served yet"}, status=503)
        if not warm.token_matches(secret, owner, _bearer(request)):
            return web.json_response({"error": "token refused"}, status=401)
        try:
            evaluator, posted, stats = _parse(await request.json())
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        box = inboxes.box(key)
        if posted is not None:
            box.results.append(posted)
        box.stats[evaluator] = dict(stats)
        previous = box.waiting.pop(evaluator, None)
        if previous is not None and not previous.answer.done():
            previous.answer.set_result({"wait": True})
        waiting = _Waiting(evaluator, asyncio.get_running_loop().create_future())
        box.waiting[evaluator] = waiting
        poke(key)
        try:
            answer = await asyncio.wait_for(asyncio.shield(waiting.answer), HOLD_S)
        except TimeoutError:
            if box.waiting.get(evaluator) is waiting:
                del box.waiting[evaluator]
            answer = {"wait": True}
        return web.json_response(answer)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/namespaces/{namespace}/mergesearches/{name}/lease", lease)
    return app


async def start(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104 - reached through the Service
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("evaluator endpoint listening on %s:%d", host, port)
    return runner
