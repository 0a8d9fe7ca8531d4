"""Quality report, aggregated results and raw annotation exports of a task, through the API."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from services.marketplace import aggregation
from tests.marketplace_support import add_member, build_market, claim, open_task, submit
from tests.oauth_flow import bearer

POS, NEG, NEU = "positive", "negative", "neutral"
# Non-gold items r0..r3: what annotators A1, A2 (vendor sx) and B1 (vendor nm) answer.
PLAN = {
    "review 0": (POS, POS, NEG),  # positive, 2 of 3
    "review 1": (NEG, NEG, NEG),  # negative, unanimous
    "review 2": (POS, NEU, NEG),  # a three-way tie: positive, listed first in the schema
    "review 3": (NEU, NEU, POS),  # neutral, 2 of 3
}
# Gold items (known answer "negative"): A1 right twice, A2 once, B1 never.
GOLD_PLAN = {"review 4": (NEG, NEG, POS), "review 5": (NEG, POS, POS)}


async def _rows(gateway: Any, sql: str, **params: Any) -> list[Any]:
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        return list((await session.execute(sa.text(sql), params)).all())


async def _execute(gateway: Any, sql: str, **params: Any) -> None:
    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        await session.execute(sa.text(sql), params)


async def _user_id(client: httpx.AsyncClient, tokens: dict) -> str:
    return (await client.get("/v1/users/me", headers=bearer(tokens))).json()["id"]


async def _work(client: httpx.AsyncClient, tokens: dict, task_id: str, slot: int) -> None:
    """Claim until nothing is left and answer every lease as PLAN/GOLD_PLAN says."""
    answers: list[tuple[str, Any]] = []
    for _ in range(10):
        claimed = await claim(client, tokens, task_id, 3)
        assert claimed.status_code == 200, claimed.text
        leases = claimed.json()["assignments"]
        if not leases:
            break
        for lease in leases:
            text = lease["input"]["text"]
            label = {**PLAN, **GOLD_PLAN}[text][slot]
            answers.append((lease["assignment_id"], {"label": label}))
    done = await submit(client, tokens, task_id, answers)
    assert done.status_code == 200, done.text
    assert len(answers) == len(PLAN) + len(GOLD_PLAN)


async def _scenario(client: httpx.AsyncClient, gateway: Any, tag: str) -> dict[str, Any]:
    market = await build_market(client, gateway, tag=tag, annotators_per_vendor=2)
    task = await open_task(client, market, items=4, gold=2, overlap=3, gold_rate=0.5)
    # A gold rate of 1 (past the API's cap) makes claims deterministic: each one takes one
    # work item plus every gold item the annotator has not seen yet.
    await _execute(gateway, "UPDATE tasks SET gold_rate = 1.0 WHERE id = :t", t=task["id"])
    people = [market.annotators["sx"][0], market.annotators["sx"][1], market.annotators["nm"][0]]
    for slot, tokens in enumerate(people):
        await _work(client, tokens, task["id"], slot)
    items = await _rows(
        gateway, "SELECT id, external_id, gold FROM items WHERE task_id = :t", t=task["id"]
    )
    return {
        "market": market,
        "task": task,
        "tid": task["id"],
        "people": people,
        "ids": [await _user_id(client, t) for t in people],
        "work": {external: item_id for item_id, external, gold in items if not gold},
        "gold": {item_id for item_id, _, gold in items if gold},
    }


async def _get(client: httpx.AsyncClient, url: str, tokens: dict, **params: Any) -> httpx.Response:
    return await client.get(url, params=params, headers=bearer(tokens))


def _jsonl(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


# -- results -------------------------------------------------------------------------
async def test_majority_vote_results_in_jsonl_and_csv(client: httpx.AsyncClient, gateway) -> None:
    s = await _scenario(client, gateway, "rmv")
    requester, tid = s["market"].requester, s["tid"]
    response = await _get(client, f"/v1/tasks/{tid}/results", requester)
    assert (
        f'filename="{tid}-results-majority_vote.jsonl"' in (response.headers["content-disposition"])
    )
    rows = _jsonl(response)
    by_external = {row["external_id"]: row for row in rows}
    assert set(by_external) == {"r0", "r1", "r2", "r3"}  # gold items never appear
    assert {row["item_id"] for row in rows} == set(s["work"].values())
    assert not {row["item_id"] for row in rows} & s["gold"]
    expected = {"r0": (POS, 2 / 3), "r1": (NEG, 1.0), "r2": (POS, 1 / 3), "r3": (NEU, 2 / 3)}
    for external, (label, confidence) in expected.items():
        row = by_external[external]
        assert row["label"] == label and row["answer"] == {"label": label}
        assert row["confidence"] == pytest.approx(confidence, abs=1e-6)
        assert row["method"] == "majority_vote" and row["annotations"] == 3
        assert row["item_id"] == s["work"][external]
    assert [row["item_id"] for row in rows] == sorted(row["item_id"] for row in rows)

    as_csv = await _get(client, f"/v1/tasks/{tid}/results", requester, format="csv")
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["content-disposition"].endswith('-results-majority_vote.csv"')
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert list(table[0]) == [
        "item_id",
        "external_id",
        "label",
        "answer",
        "confidence",
        "method",
        "annotations",
    ]
    assert len(table) == 4
    r0 = next(row for row in table if row["external_id"] == "r0")
    assert r0["label"] == POS and json.loads(r0["answer"]) == {"label": POS}
    assert float(r0["confidence"]) == pytest.approx(2 / 3, abs=1e-6) and r0["annotations"] == "3"


async def test_rejected_answers_do_not_count_and_accepted_only_narrows(
    client: httpx.AsyncClient, gateway
) -> None:
    s = await _scenario(client, gateway, "rrej")
    requester, tid = s["market"].requester, s["tid"]
    a1, a2, _ = s["ids"]
    # A1's "positive" on r0 is rejected: r0 is left with A2 "positive" and B1 "negative".
    await _execute(
        gateway,
        "UPDATE assignments SET status = 'rejected' WHERE item_id = :i AND annotator_id = :a",
        i=s["work"]["r0"],
        a=a1,
    )
    rows = {
        r["external_id"]: r
        for r in _jsonl(await _get(client, f"/v1/tasks/{tid}/results", requester))
    }
    assert rows["r0"]["annotations"] == 2 and rows["r0"]["label"] == POS  # tie → schema order
    assert rows["r0"]["confidence"] == pytest.approx(0.5)
    # Only A2's answers were accepted: with status=accepted each item has one answer.
    await _execute(
        gateway,
        "UPDATE assignments SET status = 'accepted' WHERE task_id = :t AND annotator_id = :a",
        t=tid,
        a=a2,
    )
    accepted = _jsonl(await _get(client, f"/v1/tasks/{tid}/results", requester, status="accepted"))
    by_external = {r["external_id"]: r for r in accepted}
    assert {r["annotations"] for r in accepted} == {1}
    assert [by_external[f"r{i}"]["label"] for i in range(4)] == [POS, NEG, NEU, NEU]
    # Nothing accepted on an item: it is still listed, with no label.
    await _execute(
        gateway,
        "UPDATE assignments SET status = 'submitted' WHERE item_id = :i AND annotator_id = :a",
        i=s["work"]["r1"],
        a=a2,
    )
    accepted = _jsonl(await _get(client, f"/v1/tasks/{tid}/results", requester, status="accepted"))
    r1 = next(r for r in accepted if r["external_id"] == "r1")
    assert r1["label"] is None and r1["answer"] is None and r1["annotations"] == 0
    assert r1["confidence"] == 0
    bad = await _get(client, f"/v1/tasks/{tid}/results", requester, status="rejected")
    assert bad.status_code == 422


async def test_review_through_the_api_decides_what_counts(
    client: httpx.AsyncClient, gateway
) -> None:
    s = await _scenario(client, gateway, "rrev")
    requester, tid = s["market"].requester, s["tid"]
    a1, a2, _ = s["ids"]
    raw = _jsonl(await _get(client, f"/v1/tasks/{tid}/annotations", requester))
    a1_on_r0 = next(
        r["assignment_id"]
        for r in raw
        if r["annotator_id"] == a1 and r["item_id"] == s["work"]["r0"]
    )
    rejected = await client.post(
        f"/v1/tasks/{tid}/submissions:reject",
        json={"assignment_ids": [a1_on_r0], "reason": "careless"},
        headers=bearer(requester),
    )
    assert rejected.status_code == 200, rejected.text
    accepted = await client.post(
        f"/v1/tasks/{tid}/submissions:accept",
        json={"filter": {"annotator_id": a2}},
        headers=bearer(requester),
    )
    assert accepted.status_code == 200, accepted.text
    rows = {
        r["external_id"]: r
        for r in _jsonl(await _get(client, f"/v1/tasks/{tid}/results", requester))
    }
    assert rows["r0"]["annotations"] == 2 and rows["r0"]["confidence"] == pytest.approx(0.5)
    assert all(rows[f"r{i}"]["annotations"] == 3 for i in (1, 2, 3))
    only = _jsonl(await _get(client, f"/v1/tasks/{tid}/results", requester, status="accepted"))
    assert {r["annotations"] for r in only} == {1}
    assert [r["label"] for r in sorted(only, key=lambda r: r["external_id"])] == [
        POS,
        NEG,
        NEU,
        NEU,
    ]
    statuses = {
        r["assignment_id"]: r["status"]
        for r in _jsonl(await _get(client, f"/v1/tasks/{tid}/annotations", requester))
    }
    assert statuses[a1_on_r0] == "rejected"
    report = (await _get(client, f"/v1/tasks/{tid}/quality", requester)).json()
    assert report["counts"]["answers"].get("rejected") == 1
    assert report["agreement"]["annotations"] == 11


async def test_dawid_skene_results_match_the_aggregation_of_the_raw_export(
    client: httpx.AsyncClient, gateway
) -> None:
    s = await _scenario(client, gateway, "rds")
    requester, tid = s["market"].requester, s["tid"]
    raw = _jsonl(await _get(client, f"/v1/tasks/{tid}/annotations", requester))
    for method, one_coin in (("dawid_skene", False), ("one_coin_dawid_skene", True)):
        response = await _get(client, f"/v1/tasks/{tid}/results", requester, method=method)
        assert response.headers["content-disposition"].endswith(f'-results-{method}.jsonl"')
        rows = _jsonl(response)
        assert {row["item_id"] for row in rows} == set(s["work"].values())
        # Oracle: the same answers through aggregation.dawid_skene, gold pinned to "negative".
        labels = [POS, NEG, NEU]
        item_ids = sorted({r["item_id"] for r in raw})
        annotators = sorted({r["annotator_id"] for r in raw})
        known = [labels.index(NEG) if i in s["gold"] else -1 for i in item_ids]
        fit = aggregation.dawid_skene(
            [item_ids.index(r["item_id"]) for r in raw],
            [annotators.index(r["annotator_id"]) for r in raw],
            [labels.index(r["answer"]["label"]) for r in raw],
            n_classes=3,
            known=known,
            one_coin=one_coin,
        )
        for row in rows:
            index = item_ids.index(row["item_id"])
            assert row["method"] == method and row["annotations"] == 3
            assert row["label"] == labels[fit.labels[index]]
            assert row["confidence"] == pytest.approx(fit.confidence[index], abs=1e-6)
        # Unanimous r1 stays negative; A1 (all gold right) outweighs the others on r2.
        by_external = {row["external_id"]: row for row in rows}
        assert by_external["r1"]["label"] == NEG
        assert by_external["r2"]["label"] == POS


async def test_dawid_skene_needs_a_classification_task(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="rtx")
    created = await client.post(
        "/v1/tasks",
        json={
            "cluster_id": market.cluster_id,
            "title": "Transcribe",
            "kind": "transcription",
            "label_schema": {"max_length": 100},
            "reward_per_annotation": 1,
            "overlap": 2,
            "lease_seconds": 600,
        },
        headers=bearer(market.requester),
    )
    assert created.status_code == 201, created.text
    tid = created.json()["id"]
    lines = [{"input": {"audio_url": f"https://a.example/{i}.wav"}} for i in range(2)]
    imported = await client.post(
        f"/v1/tasks/{tid}/items", json=lines, headers=bearer(market.requester)
    )
    assert imported.status_code == 200, imported.text
    published = await client.post(f"/v1/tasks/{tid}:publish", headers=bearer(market.requester))
    assert published.status_code == 200, published.text
    for tokens, text in (
        (market.annotators["sx"][0], "Hello"),
        (market.annotators["nm"][0], "hello"),
    ):
        leases = (await claim(client, tokens, tid, 2)).json()["assignments"]
        done = await submit(
            client, tokens, tid, [(a["assignment_id"], {"text": text}) for a in leases]
        )
        assert done.status_code == 200, done.text
    refused = await _get(client, f"/v1/tasks/{tid}/results", market.requester, method="dawid_skene")
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith("application/problem+json")
    rows = _jsonl(await _get(client, f"/v1/tasks/{tid}/results", market.requester))
    assert len(rows) == 2
    for row in rows:  # "Hello" and "hello" are two classes: a tie, the smaller text wins
        assert row["label"] is None and row["answer"] == {"text": "Hello"}
        assert row["confidence"] == 0.5
    quality = (await _get(client, f"/v1/tasks/{tid}/quality", market.requester)).json()
    assert quality["agreement"]["alpha"] == pytest.approx(-0.5)  # exact match only: a lower bound
    assert "lower bound" in quality["agreement"]["note"]


# -- raw annotations -----------------------------------------------------------------
async def test_raw_annotations_export(client: httpx.AsyncClient, gateway) -> None:
    s = await _scenario(client, gateway, "rraw")
    requester, tid = s["market"].requester, s["tid"]
    a1, _, b1 = s["ids"]
    await _execute(
        gateway,
        "UPDATE assignments SET status = 'rejected' WHERE item_id = :i AND annotator_id = :a",
        i=s["work"]["r3"],
        a=b1,
    )
    response = await _get(client, f"/v1/tasks/{tid}/annotations", requester)
    assert (
        response.headers["content-disposition"] == f'attachment; filename="{tid}-annotations.jsonl"'
    )
    rows = _jsonl(response)
    assert len(rows) == 3 * 6  # every answered assignment, gold and rejected ones included
    assert set(rows[0]) == {
        "assignment_id",
        "item_id",
        "external_id",
        "annotator_id",
        "annotator_firm_id",
        "status",
        "answer",
        "submitted_at",
        "gold",
        "correct",
    }
    assert [r["item_id"] for r in rows] == sorted(r["item_id"] for r in rows)
    gold_rows = [r for r in rows if r["gold"]]
    assert {r["item_id"] for r in gold_rows} == s["gold"]
    assert sum(r["correct"] for r in gold_rows) == 3  # A1 twice, A2 once
    assert all(r["correct"] for r in gold_rows if r["annotator_id"] == a1)
    assert all(r["correct"] is None for r in rows if not r["gold"])
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["answer"] == {"label": POS}
    assert (
        rejected[0]["external_id"] == "r3"
        and rejected[0]["annotator_firm_id"] == (s["market"].vendors["nm"])
    )
    assert datetime.fromisoformat(rows[0]["submitted_at"]) <= datetime.now(UTC)
    only = _jsonl(await _get(client, f"/v1/tasks/{tid}/annotations", requester, status="rejected"))
    assert [r["assignment_id"] for r in only] == [rejected[0]["assignment_id"]]

    as_csv = await _get(client, f"/v1/tasks/{tid}/annotations", requester, format="csv")
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(table) == 18 and table[0].keys() == rows[0].keys()
    assert {json.loads(r["answer"])["label"] for r in table} == {POS, NEG, NEU}
    assert {r["gold"] for r in table} == {"true", "false"}
    assert {r["correct"] for r in table if r["gold"] == "false"} == {""}


# -- quality -------------------------------------------------------------------------
async def test_quality_report(client: httpx.AsyncClient, gateway) -> None:
    import krippendorff

    s = await _scenario(client, gateway, "rq")
    requester, tid = s["market"].requester, s["tid"]
    a1, a2, b1 = s["ids"]
    response = await _get(client, f"/v1/tasks/{tid}/quality", requester)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["task_id"] == tid and report["kind"] == "single_label"
    assert report["counts"] == {
        "items": 4,
        "gold_items": 2,
        "items_answered": 4,
        "items_complete": 4,
        "answers": {"submitted": 12},
        "gold_answers": {"submitted": 6},
    }
    annotators = {row["annotator_id"]: row for row in report["annotators"]}
    assert annotators[a1]["gold_accuracy"] == 1.0 and annotators[a1]["gold_answered"] == 2
    assert annotators[a2]["gold_accuracy"] == 0.5 and annotators[a2]["gold_correct"] == 1
    assert annotators[b1]["gold_accuracy"] == 0.0 and annotators[b1]["answered"] == 4
    assert annotators[b1]["firm_id"] == s["market"].vendors["nm"]
    firms = {row["firm_id"]: row for row in report["firms"]}
    sx, nm = s["market"].vendors["sx"], s["market"].vendors["nm"]
    assert firms[sx]["gold_accuracy"] == 0.75 and firms[sx]["answered"] == 8
    assert firms[nm]["gold_accuracy"] == 0.0 and firms[nm]["gold_answered"] == 2
    # Agreement over non-gold items, checked with an independent implementation.
    labels = [POS, NEG, NEU]
    table = np.array([[labels.index(PLAN[k][slot]) for k in sorted(PLAN)] for slot in range(3)])
    expected = krippendorff.alpha(reliability_data=table, level_of_measurement="nominal")
    assert report["agreement"]["alpha"] == pytest.approx(expected)
    assert report["agreement"]["items"] == 4 and report["agreement"]["annotations"] == 12
    # A rejected answer leaves the agreement but its gold accuracy stays counted.
    await _execute(
        gateway,
        "UPDATE assignments SET status = 'rejected' WHERE task_id = :t AND annotator_id = :a",
        t=tid,
        a=b1,
    )
    after = (await _get(client, f"/v1/tasks/{tid}/quality", requester)).json()
    assert after["agreement"]["annotations"] == 8
    assert after["counts"]["answers"] == {"submitted": 8, "rejected": 4}
    b1_after = next(r for r in after["annotators"] if r["annotator_id"] == b1)
    assert b1_after["gold_answered"] == 2 and b1_after["gold_accuracy"] == 0.0
    expected = krippendorff.alpha(reliability_data=table[:2], level_of_measurement="nominal")
    assert after["agreement"]["alpha"] == pytest.approx(expected)


async def test_a_task_with_no_answers_has_an_empty_report(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="rnone")
    task = await open_task(client, market, items=3)
    report = (await _get(client, f"/v1/tasks/{task['id']}/quality", market.requester)).json()
    assert report["agreement"]["alpha"] is None and report["annotators"] == []
    assert report["counts"]["items_answered"] == 0
    for method in ("majority_vote", "dawid_skene"):
        rows = _jsonl(
            await _get(client, f"/v1/tasks/{task['id']}/results", market.requester, method=method)
        )
        assert len(rows) == 3 and all(r["label"] is None for r in rows)
    assert _jsonl(await _get(client, f"/v1/tasks/{task['id']}/annotations", market.requester)) == []


# -- who may read --------------------------------------------------------------------
async def test_only_the_requester_firms_admins_read_results(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="racl")
    task = await open_task(client, market, items=2)
    tid = task["id"]
    other = await build_market(client, gateway, tag="racl2", vendors={})
    requester_annotator = await add_member(
        client, market.requester, market.requester_id, "staff@racl.example"
    )
    from tests.marketplace_support import settle

    await settle(gateway)
    for path in ("quality", "results", "annotations"):
        url = f"/v1/tasks/{tid}/{path}"
        ok = await _get(client, url, market.requester)
        assert ok.status_code == 200, (path, ok.text)
        for tokens, status in (
            (market.annotators["sx"][0], 403),  # sees the task, may not read its results
            (market.owners["sx"], 403),
            (requester_annotator, 403),  # the requester firm, but no admin role
            (other.requester, 404),  # another tenant
        ):
            refused = await _get(client, url, tokens)
            assert refused.status_code == status, (path, tokens is other.requester, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
        unknown = await _get(
            client, f"/v1/tasks/task_00000000000000000000000000/{path}", market.requester
        )
        assert unknown.status_code == 404
        assert (await client.get(url)).status_code == 401


# -- bounded memory ------------------------------------------------------------------
async def _fill(gateway: Any, task_id: str, annotations_per_item: int) -> int:
    """Answers straight into the table: ``annotations_per_item`` per non-gold item."""
    from services.kit.ids import new_id
    from services.marketplace.models import Assignment

    items = await _rows(
        gateway, "SELECT id FROM items WHERE task_id = :t AND gold = :g", t=task_id, g=False
    )
    now = datetime.now(UTC)
    labels = [POS, NEG, NEU]
    rows = [
        {
            "id": new_id("asg"),
            "task_id": task_id,
            "item_id": item_id,
            "annotator_id": f"usr_bulk{k:02d}",
            "annotator_firm_id": "firm_bulk",
            "gold": False,
            "status": "submitted",
            "leased_at": now,
            "expires_at": now + timedelta(hours=1),
            "submitted_at": now,
            "answer": {"label": labels[(i + k) % 3 if k else i % 2]},
        }
        for i, (item_id,) in enumerate(items)
        for k in range(annotations_per_item)
    ]
    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        for start in range(0, len(rows), 5000):
            await session.execute(sa.insert(Assignment), rows[start : start + 5000])
    return len(rows)


async def _download(app: Any, path: str, query: str, token: str) -> tuple[int, int, int]:
    """GET through the ASGI app, counting the body without keeping it; (status, bytes, lines)."""
    started: dict[str, Any] = {}
    size = lines = 0
    sent = False
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal size, lines
        if message["type"] == "http.response.start":
            started.update(message)
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            size += len(body)
            lines += body.count(b"\n")
            if not message.get("more_body"):
                done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return started["status"], size, lines


@pytest.mark.slow
async def test_exports_stream_in_bounded_memory(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="rmem", vendors={"sx": "CN-SX"})
    task = await open_task(client, market, items=10_000, overlap=5)
    tid = task["id"]
    total = await _fill(gateway, tid, 5)
    assert total == 50_000
    token = market.requester["access_token"]
    path = f"/v1/tasks/{tid}/annotations"
    for query, lines in (("format=jsonl", total), ("format=csv", total + 1)):
        await _download(gateway, path, query, token)  # warm caches and compiled statements
        tracemalloc.start()
        try:
            status, size, counted = await _download(gateway, path, query, token)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status == 200 and counted == lines
        assert size > 5_000_000
        # The export never sits in memory whole: the peak is about one chunk's rows.
        assert peak < size / 4, (query, peak, size)
