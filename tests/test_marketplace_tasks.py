"""Marketplace tasks: the read model, who may post and see, the state machine, label schemas."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.marketplace_support import (
    add_member,
    build_market,
    open_task,
    owner_of,
    settle,
    task_body,
    vendor_profile,
)
from tests.oauth_flow import bearer


async def test_read_model_follows_membership_events(client: httpx.AsyncClient, gateway) -> None:
    from services.marketplace.models import KnownClusterMember, KnownFirm, KnownFirmMember

    market = await build_market(client, gateway, tag="rm")
    db = gateway.apps["marketplace"].state.db
    sx = market.vendors["sx"]
    async with db.sessionmaker() as session:
        firm = await session.get(KnownFirm, sx)
        assert (firm.region, firm.actor_type, firm.industries) == (
            "CN-SX",
            "small_micro_enterprise",
            ["0304"],
        )
        membership = await session.get(KnownClusterMember, (market.cluster_id, sx))
        assert membership.active
    task = await open_task(client, market, items=2, overlap=1)
    annotator = bearer(market.annotators["sx"][0])
    assert (await client.get(f"/v1/tasks/{task['id']}", headers=annotator)).status_code == 200
    # The vendor leaves the cluster and changes region: the read model follows.
    owner = market.owners["sx"]
    left = await client.delete(
        f"/v1/clusters/{market.cluster_id}/members/{sx}", headers=bearer(owner)
    )
    assert left.status_code in (200, 204), left.text
    moved = await client.patch(f"/v1/firms/{sx}", json={"region": "CN-HE"}, headers=bearer(owner))
    assert moved.status_code == 200, moved.text
    annotator_id = (
        await client.get("/v1/users/me", headers=bearer(market.annotators["sx"][0]))
    ).json()["id"]
    promoted = await client.patch(
        f"/v1/firms/{sx}/members/{annotator_id}", json={"role": "admin"}, headers=bearer(owner)
    )
    assert promoted.status_code == 200, promoted.text
    await settle(gateway)
    async with db.sessionmaker() as session:
        assert not (await session.get(KnownClusterMember, (market.cluster_id, sx))).active
        assert (await session.get(KnownFirm, sx)).region == "CN-HE"
        assert (await session.get(KnownFirmMember, (sx, annotator_id))).role == "admin"
    # A firm that left the cluster no longer sees or works on its tasks.
    gone = await client.post(
        f"/v1/tasks/{task['id']}/assignments:claim", json={"count": 1}, headers=annotator
    )
    assert gone.status_code == 404
    assert (await client.get("/v1/tasks", headers=annotator)).json()["items"] == []


async def test_task_list_pages_and_filters(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="page", vendors={"sx": "CN-SX"})
    req = bearer(market.requester)
    ids = []
    for _ in range(5):
        created = await client.post("/v1/tasks", json=task_body(market.cluster_id), headers=req)
        ids.append(created.json()["id"])
    opened = await open_task(client, market, items=1)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/tasks", params=params, headers=req)).json()
        seen += [t["id"] for t in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == [*ids, opened["id"]]
    drafts = await client.get("/v1/tasks", params={"state": "draft"}, headers=req)
    assert [t["id"] for t in drafts.json()["items"]] == ids
    vendor = bearer(market.annotators["sx"][0])
    assert [t["id"] for t in (await client.get("/v1/tasks", headers=vendor)).json()["items"]] == [
        opened["id"]
    ]
    other = await client.get("/v1/tasks", params={"cluster_id": "cluster_nope"}, headers=req)
    assert other.json()["items"] == []
    assert (
        await client.get("/v1/tasks", params={"state": "bogus"}, headers=req)
    ).status_code == 422
    assert (await client.get("/v1/tasks", params={"cursor": "%%%"}, headers=req)).status_code == 400


async def test_old_event_never_overwrites_newer_state(gateway) -> None:
    from datetime import UTC, datetime

    from api.events import Envelope
    from services.kit.ids import new_id
    from services.marketplace.consumers import apply_event
    from services.marketplace.models import KnownFirmMember

    db = gateway.apps["marketplace"].state.db
    older, newer = new_id("evt"), new_id("evt")

    def envelope(event_id: str, kind: str, data: dict) -> Envelope:
        return Envelope(
            id=event_id, type=kind, source="membership", occurred_at=datetime.now(UTC), data=data
        )

    async with db.session_scope() as session:
        await apply_event(
            session, envelope(newer, "firm.member_removed", {"firm_id": "f", "user_id": "u"})
        )
    async with db.session_scope() as session:
        await apply_event(
            session,
            envelope(older, "firm.member_added", {"firm_id": "f", "user_id": "u", "role": "owner"}),
        )
    async with db.sessionmaker() as session:
        row = await session.get(KnownFirmMember, ("f", "u"))
        assert row is not None and row.active is False


async def test_task_lifecycle_and_state_machine(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="life")
    req = bearer(market.requester)
    created = await client.post("/v1/tasks", json=task_body(market.cluster_id), headers=req)
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["state"] == "draft" and task["requester_firm_id"] == market.requester_id
    tid = task["id"]

    # A draft is the requester's alone.
    vendor = bearer(market.owners["sx"])
    assert (await client.get(f"/v1/tasks/{tid}", headers=vendor)).status_code == 404
    # Nothing to publish yet, and only a draft changes.
    empty = await client.post(f"/v1/tasks/{tid}:publish", headers=req)
    assert empty.status_code == 409 and empty.json()["state"] == "draft"
    patched = await client.patch(f"/v1/tasks/{tid}", json={"overlap": 3}, headers=req)
    assert patched.status_code == 200 and patched.json()["overlap"] == 3
    imported = await client.post(
        f"/v1/tasks/{tid}/items", json=[{"input": {"text": "a"}}], headers=req
    )
    assert imported.status_code == 200, imported.text

    seen: list[Any] = []

    async def record(envelope: Any) -> None:
        seen.append(envelope)

    gateway.runtime.bus.subscribe("test-mp", record, sources=["marketplace"])
    published = await client.post(f"/v1/tasks/{tid}:publish", headers=req)
    assert published.status_code == 200 and published.json()["state"] == "open"
    assert (await client.get(f"/v1/tasks/{tid}", headers=vendor)).json()["state"] == "open"
    late = await client.patch(f"/v1/tasks/{tid}", json={"overlap": 1}, headers=req)
    assert late.status_code == 409 and late.json()["state"] == "open"

    for action, expected in [("pause", "paused"), ("resume", "open"), ("pause", "paused")]:
        response = await client.post(f"/v1/tasks/{tid}:{action}", headers=req)
        assert response.status_code == 200 and response.json()["state"] == expected
    again = await client.post(f"/v1/tasks/{tid}:pause", headers=req)
    assert again.status_code == 409 and again.json()["state"] == "paused"
    assert again.json()["type"].endswith("/invalid-state")
    done = await client.post(f"/v1/tasks/{tid}:complete", headers=req)
    assert done.json()["state"] == "completed"
    for action in ("publish", "pause", "resume", "complete", "cancel"):
        refused = await client.post(f"/v1/tasks/{tid}:{action}", headers=req)
        assert refused.status_code == 409 and refused.json()["state"] == "completed", action
    closed = await client.post(
        f"/v1/tasks/{tid}/items", json=[{"input": {"text": "b"}}], headers=req
    )
    assert closed.status_code == 409

    for _ in range(100):
        if seen:
            break
        import asyncio

        await asyncio.sleep(0.05)
    published_events = [e for e in seen if e.type == "task.published"]
    assert len(published_events) == 1
    data = published_events[0].data
    assert data["task_id"] == tid and data["requester_region"] == "CN-BJ"
    assert data["requester_industries"] == ["0301", "0406"] and data["item_count"] == 1

    # A draft can be cancelled; a cancelled task is final.
    other = (await client.post("/v1/tasks", json=task_body(market.cluster_id), headers=req)).json()
    assert (await client.post(f"/v1/tasks/{other['id']}:cancel", headers=req)).json()[
        "state"
    ] == "cancelled"
    assert (await client.post(f"/v1/tasks/{other['id']}:publish", headers=req)).status_code == 409


async def test_who_may_post_change_and_see(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="who")
    req = bearer(market.requester)
    body = task_body(market.cluster_id)
    # The requester firm's plain member may not post or change a task.
    member = await add_member(
        client, market.requester, market.requester_id, "member@who.example", role="member"
    )
    outsider_id, outsider = await owner_of(
        client, "out@who.example", vendor_profile("outsider", "CN-SC")
    )
    await settle(gateway)
    assert (await client.post("/v1/tasks", json=body, headers=bearer(member))).status_code == 403
    # A firm outside the cluster cannot even tell the cluster exists.
    assert (await client.post("/v1/tasks", json=body, headers=bearer(outsider))).status_code == 404
    # The acting firm comes from the token, never from the body.
    forged = await client.post(
        "/v1/tasks", json={**body, "requester_firm_id": outsider_id}, headers=req
    )
    assert forged.status_code == 422

    task = await open_task(client, market, items=2)
    tid = task["id"]
    assert (await client.get(f"/v1/tasks/{tid}", headers=bearer(member))).status_code == 200
    assert (await client.post(f"/v1/tasks/{tid}:pause", headers=bearer(member))).status_code == 403
    vendor_owner = bearer(market.owners["sx"])
    assert (await client.post(f"/v1/tasks/{tid}:pause", headers=vendor_owner)).status_code == 403
    assert (await client.get(f"/v1/tasks/{tid}", headers=bearer(outsider))).status_code == 404
    assert (await client.get(f"/v1/tasks/{tid}/items", headers=vendor_owner)).status_code == 403
    # Gold counts are the requester's business.
    assert (await client.get(f"/v1/tasks/{tid}", headers=vendor_owner)).json()["gold_count"] is None
    listed = await client.get("/v1/tasks", headers=bearer(outsider))
    assert listed.status_code == 200 and listed.json()["items"] == []
    listed = await client.get("/v1/tasks", headers=vendor_owner)
    assert [t["id"] for t in listed.json()["items"]] == [tid]


async def test_eligibility_by_region_and_actor_type(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="elig")
    only_sx = await open_task(client, market, items=2, eligibility={"regions": ["CN-SX"]})
    only_uni = await open_task(client, market, items=2, eligibility={"actor_types": ["university"]})
    sx, nm = bearer(market.annotators["sx"][0]), bearer(market.annotators["nm"][0])
    assert (await client.get(f"/v1/tasks/{only_sx['id']}", headers=sx)).status_code == 200
    assert (await client.get(f"/v1/tasks/{only_sx['id']}", headers=nm)).status_code == 404
    refused = await client.post(
        f"/v1/tasks/{only_sx['id']}/assignments:claim", json={"count": 1}, headers=nm
    )
    assert refused.status_code == 404
    assert (await client.get(f"/v1/tasks/{only_uni['id']}", headers=sx)).status_code == 404
    listed = (await client.get("/v1/tasks", headers=sx)).json()["items"]
    assert [t["id"] for t in listed] == [only_sx["id"]]


@pytest.mark.parametrize(
    ("kind", "schema", "good_input", "good_answer", "bad_answers"),
    [
        (
            "single_label",
            {"labels": ["cat", "dog"]},
            {"image_url": "https://img.example/1.jpg"},
            {"label": "cat"},
            [{"label": "cow"}, {"labels": ["cat"]}, {"label": 1}, "cat"],
        ),
        (
            "multi_label",
            {"labels": ["sports", "politics", "tech"]},
            {"text": "Match report"},
            {"labels": ["sports", "tech"]},
            [{"labels": ["sports", "sports"]}, {"labels": ["cooking"]}, {"label": "tech"}],
        ),
        (
            "span",
            {"labels": ["PER", "ORG"]},
            {"text": "Li Wei joined Zhiyuan"},
            {
                "spans": [
                    {"start": 0, "end": 6, "label": "PER"},
                    {"start": 14, "end": 21, "label": "ORG"},
                ]
            },
            [
                {"spans": [{"start": 0, "end": 99, "label": "PER"}]},
                {"spans": [{"start": 0, "end": 6, "label": "LOC"}]},
                {
                    "spans": [
                        {"start": 0, "end": 6, "label": "PER"},
                        {"start": 3, "end": 8, "label": "ORG"},
                    ]
                },
                {"spans": [{"start": 5, "end": 5, "label": "PER"}]},
            ],
        ),
        (
            "bbox",
            {"labels": ["car"]},
            {"image_url": "https://img.example/2.jpg", "width": 640, "height": 480},
            {"boxes": [{"x": 10, "y": 20, "w": 100, "h": 50, "label": "car"}]},
            [
                {"boxes": [{"x": 600, "y": 20, "w": 100, "h": 50, "label": "car"}]},
                {"boxes": [{"x": 10, "y": 20, "w": 0, "h": 50, "label": "car"}]},
                {"boxes": [{"x": 10, "y": 20, "w": 5, "h": 5, "label": "bus"}]},
            ],
        ),
        (
            "transcription",
            {"max_length": 20},
            {"audio_url": "https://audio.example/1.wav"},
            {"text": "ni hao"},
            [{"text": "x" * 21}, {"text": 5}, {"transcript": "ni hao"}],
        ),
    ],
)
async def test_label_schema_inputs_and_answers_per_kind(
    client: httpx.AsyncClient,
    gateway,
    kind: str,
    schema: dict,
    good_input: dict,
    good_answer: Any,
    bad_answers: list[Any],
) -> None:
    market = await build_market(client, gateway, tag=f"k{kind[:4]}", vendors={"sx": "CN-SX"})
    req = bearer(market.requester)
    created = await client.post(
        "/v1/tasks",
        json=task_body(market.cluster_id, kind=kind, label_schema=schema, overlap=1),
        headers=req,
    )
    assert created.status_code == 201, created.text
    tid = created.json()["id"]
    # An input of another kind is refused, with its line number.
    wrong_input = {"text": ""} if kind == "bbox" else {"width": 3}
    refused = await client.post(
        f"/v1/tasks/{tid}/items", json=[{"input": good_input}, {"input": wrong_input}], headers=req
    )
    assert refused.status_code == 422 and refused.json()["rejected"][0]["index"] == 1
    gold_bad = await client.post(
        f"/v1/tasks/{tid}/items",
        json=[{"input": good_input, "gold": True, "answer": bad_answers[0]}],
        headers=req,
    )
    assert gold_bad.status_code == 422
    ok = await client.post(
        f"/v1/tasks/{tid}/items",
        json=[{"input": good_input}, {"input": good_input}],
        headers=req,
    )
    assert ok.status_code == 200 and ok.json()["imported"] == 2
    assert (await client.post(f"/v1/tasks/{tid}:publish", headers=req)).status_code == 200

    annotator = bearer(market.annotators["sx"][0])
    claimed = await client.post(
        f"/v1/tasks/{tid}/assignments:claim", json={"count": 2}, headers=annotator
    )
    leases = claimed.json()["assignments"]
    assert len(leases) == 2 and leases[0]["input"] == good_input
    first = leases[0]["assignment_id"]
    for bad in bad_answers:
        response = await client.post(
            f"/v1/tasks/{tid}/assignments:submit",
            json={"answers": [{"assignment_id": first, "answer": bad}]},
            headers=annotator,
        )
        assert response.status_code == 422, (bad, response.text)
    # A bad answer in a batch rejects the batch; the lease stays and takes a good answer.
    mixed = await client.post(
        f"/v1/tasks/{tid}/assignments:submit",
        json={
            "answers": [
                {"assignment_id": leases[1]["assignment_id"], "answer": good_answer},
                {"assignment_id": first, "answer": bad_answers[0]},
            ]
        },
        headers=annotator,
    )
    assert mixed.status_code == 422 and mixed.json()["answers"][0]["index"] == 1
    done = await client.post(
        f"/v1/tasks/{tid}/assignments:submit",
        json={
            "answers": [
                {"assignment_id": first, "answer": good_answer},
                {"assignment_id": leases[1]["assignment_id"], "answer": good_answer},
            ]
        },
        headers=annotator,
    )
    assert done.status_code == 200, done.text
    assert {s["assignment_id"] for s in done.json()["submitted"]} == {
        first,
        leases[1]["assignment_id"],
    }


@pytest.mark.parametrize(
    ("kind", "schema"),
    [
        ("single_label", {"labels": ["only-one"]}),
        ("single_label", {"labels": ["a", "a"]}),
        ("multi_label", {"labels": []}),
        ("span", {"labels": ["PER"], "colours": {}}),
        ("bbox", {}),
        ("transcription", {"max_length": 0}),
    ],
)
async def test_bad_label_schemas_are_refused(
    client: httpx.AsyncClient, gateway, kind: str, schema: dict
) -> None:
    market = await build_market(client, gateway, tag="bs", vendors={})
    response = await client.post(
        "/v1/tasks",
        json=task_body(market.cluster_id, kind=kind, label_schema=schema),
        headers=bearer(market.requester),
    )
    assert response.status_code == 422, response.text
    listed = await client.get("/v1/tasks", headers=bearer(market.requester))
    assert listed.json()["items"] == []


async def test_bad_task_terms_are_refused(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="terms", vendors={})
    req = bearer(market.requester)
    for overrides in (
        {"overlap": 0},
        {"overlap": 11},
        {"reward_per_annotation": -1},
        {"kind": "video"},
        {"deadline": "2000-01-01T00:00:00Z"},
        {"eligibility": {"regions": ["Beijing"]}},
        {"gold_rate": 0.9},
    ):
        response = await client.post(
            "/v1/tasks", json=task_body(market.cluster_id, **overrides), headers=req
        )
        assert response.status_code == 422, (overrides, response.text)


async def test_integrator_client_posts_tasks_but_never_annotates(
    client: httpx.AsyncClient, gateway
) -> None:
    from tests.oauth_flow import client_credentials

    market = await build_market(client, gateway, tag="cli", vendors={"sx": "CN-SX"})
    made = await client.post(
        f"/v1/firms/{market.requester_id}/clients",
        json={"name": "ETL", "scope": "marketplace:read marketplace:write"},
        headers=bearer(market.requester),
    )
    assert made.status_code == 201, made.text
    etl = await client_credentials(client, made.json()["client_id"], made.json()["client_secret"])
    created = await client.post("/v1/tasks", json=task_body(market.cluster_id), headers=bearer(etl))
    assert created.status_code == 201, created.text
    tid = created.json()["id"]
    items = await client.post(
        f"/v1/tasks/{tid}/items", json=[{"input": {"text": "a"}}], headers=bearer(etl)
    )
    assert items.status_code == 200
    assert (await client.post(f"/v1/tasks/{tid}:publish", headers=bearer(etl))).status_code == 200
    refused = await client.post(
        f"/v1/tasks/{tid}/assignments:claim", json={"count": 1}, headers=bearer(etl)
    )
    assert refused.status_code == 403
    # A read-only client reads but does not change.
    ro = await client.post(
        f"/v1/firms/{market.requester_id}/clients",
        json={"name": "Viewer", "scope": "marketplace:read"},
        headers=bearer(market.requester),
    )
    viewer = await client_credentials(client, ro.json()["client_id"], ro.json()["client_secret"])
    assert (await client.get(f"/v1/tasks/{tid}", headers=bearer(viewer))).status_code == 200
    assert (await client.post(f"/v1/tasks/{tid}:pause", headers=bearer(viewer))).status_code == 403


async def test_label_schema_is_fixed_once_gold_exists(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="fix", vendors={})
    req = bearer(market.requester)
    tid = (await client.post("/v1/tasks", json=task_body(market.cluster_id), headers=req)).json()[
        "id"
    ]
    gold = [{"input": {"text": "a"}, "gold": True, "answer": {"label": "neutral"}}]
    assert (await client.post(f"/v1/tasks/{tid}/items", json=gold, headers=req)).is_success
    changed = await client.patch(
        f"/v1/tasks/{tid}", json={"label_schema": {"labels": ["yes", "no"]}}, headers=req
    )
    assert changed.status_code == 409
    task = (await client.get(f"/v1/tasks/{tid}", headers=req)).json()
    assert task["label_schema"] == {"labels": ["positive", "negative", "neutral"]}
    # Gold alone is no work: publishing needs a real item.
    assert (await client.post(f"/v1/tasks/{tid}:publish", headers=req)).status_code == 409
