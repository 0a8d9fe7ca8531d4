"""Tenant isolation and bad input, for every route in the route table.

Two worlds, A and B, each with a cluster, firms, parks, invitations, join requests and
an integrator client. Every ``/v1`` route of every service must have a case here (the
test reads the gateway's route table, so a new route without a case fails):

* called by A's operator with B's ids → 404 (never 403, which would reveal existence);
* called with A's ids by a principal whose role is too low → 403;
* called with no token or a garbage token → 401 with ``WWW-Authenticate``;
* called with an unknown id → 404; with a malformed body → 400/422;

and none of those calls changes any table (only ``denied``/``failed`` audit rows appear).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.marketplace_support import settle
from tests.messaging_support import settle as settle_messaging
from tests.metrics_support import settle_metrics
from tests.oauth_flow import bearer, login, sign_up

FIRM = {"city": "C", "actor_type": "medium_enterprise", "industries": ["0301"]}


@dataclass
class Case:
    body: dict[str, Any] | None = None
    foreign: int | None = 404
    lower: tuple[str, int] | None = None
    lower_params: dict[str, str] = field(default_factory=dict)
    public: bool = False
    note: str = ""


PUBLIC = {("POST", "/v1/users"), ("GET", "/v1/industries"), ("GET", "/v1/regions")}
CLIENT = {"name": "ETL", "scope": "membership:read"}
PARK = {"name": "Park", "region": "CN-BJ", "city": "Beijing", "capacity": 3}
WEBHOOK = {"url": "https://93.184.215.14/hook", "events": ["payout.settled"]}
TASK = {
    "cluster_id": "{cluster_id}",
    "title": "Sentiment",
    "kind": "single_label",
    "label_schema": {"labels": ["x", "y"]},
    "reward_per_annotation": 1,
}

CHANNEL = {"cluster_id": "{cluster_id}", "kind": "public", "name": "c"}

CASES: dict[tuple[str, str], Case] = {
    ("GET", "/v1/users/me"): Case(foreign=None),
    ("PATCH", "/v1/users/me"): Case(body={"display_name": "x"}, foreign=None),
    ("POST", "/v1/users/me:deactivate"): Case(foreign=None, note="acts on the caller only"),
    ("POST", "/v1/firms"): Case(body={"name": "F", "region": "CN-BJ", **FIRM}, foreign=None),
    ("GET", "/v1/firms"): Case(foreign=None),
    ("GET", "/v1/firms/{firm_id}"): Case(),
    ("PATCH", "/v1/firms/{firm_id}"): Case(body={"name": "Renamed"}, lower=("a1x", 403)),
    ("GET", "/v1/firms/{firm_id}/members"): Case(),
    ("PATCH", "/v1/firms/{firm_id}/members/{user_id}"): Case(
        body={"role": "member"}, lower=("a1x", 403)
    ),
    ("DELETE", "/v1/firms/{firm_id}/members/{user_id}"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/members/{user_id}:deactivate"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/members/{user_id}:reactivate"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/invitations"): Case(
        body={"email": "n@x.example"}, lower=("a1x", 403)
    ),
    ("GET", "/v1/firms/{firm_id}/invitations"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/invitations/{invitation_id}:revoke"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/invitations/{invitation_id}:accept"): Case(
        body={"token": "not-the-token-of-this-invitation"}, note="the token is the credential"
    ),
    ("GET", "/v1/firms/{firm_id}/audit-events"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/clients"): Case(body=CLIENT, lower=("a1x", 403)),
    ("GET", "/v1/firms/{firm_id}/clients"): Case(lower=("a1x", 403)),
    ("GET", "/v1/firms/{firm_id}/clients/{client_id}"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/clients/{client_id}:rotate-secret"): Case(lower=("a1x", 403)),
    ("POST", "/v1/firms/{firm_id}/clients/{client_id}:disable"): Case(lower=("a1x", 403)),
    ("POST", "/v1/clusters"): Case(
        body={"name": "X", "core_region": "CN-BJ"}, foreign=None, lower=("a1x", 403)
    ),
    ("GET", "/v1/clusters"): Case(foreign=None),
    ("GET", "/v1/clusters/{cluster_id}"): Case(foreign=200, note="the directory entry is public"),
    ("PATCH", "/v1/clusters/{cluster_id}"): Case(body={"name": "Y"}, lower=("a2", 403)),
    ("POST", "/v1/clusters/{cluster_id}/join-requests"): Case(
        body={}, foreign=None, note="applying to another tenant's cluster is the feature"
    ),
    ("GET", "/v1/clusters/{cluster_id}/join-requests"): Case(),
    ("POST", "/v1/clusters/{cluster_id}/join-requests/{request_id}:approve"): Case(
        lower=("a2", 403)
    ),
    ("POST", "/v1/clusters/{cluster_id}/join-requests/{request_id}:reject"): Case(
        body={"reason": "no"}, lower=("a2", 403)
    ),
    ("POST", "/v1/clusters/{cluster_id}/join-requests/{request_id}:withdraw"): Case(
        lower=("a2", 404)
    ),
    ("POST", "/v1/clusters/{cluster_id}/invitations"): Case(
        body={"firm_id": "{free_firm}"}, lower=("a2", 403)
    ),
    ("GET", "/v1/clusters/{cluster_id}/invitations"): Case(),
    ("POST", "/v1/clusters/{cluster_id}/invitations/{invitation_id}:accept"): Case(
        lower=("a2", 404)
    ),
    ("POST", "/v1/clusters/{cluster_id}/invitations/{invitation_id}:decline"): Case(
        lower=("a2", 404)
    ),
    ("POST", "/v1/clusters/{cluster_id}/invitations/{invitation_id}:revoke"): Case(
        lower=("a2", 403)
    ),
    ("GET", "/v1/clusters/{cluster_id}/members"): Case(),
    ("GET", "/v1/clusters/{cluster_id}/members/{firm_id}"): Case(),
    ("PATCH", "/v1/clusters/{cluster_id}/members/{firm_id}"): Case(
        body={"park_id": None}, lower=("a2", 403), lower_params={"firm_id": "fa1"}
    ),
    ("DELETE", "/v1/clusters/{cluster_id}/members/{firm_id}"): Case(
        lower=("a2", 403), lower_params={"firm_id": "fa1"}
    ),
    ("POST", "/v1/clusters/{cluster_id}/parks"): Case(body=PARK, lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/parks"): Case(),
    ("GET", "/v1/clusters/{cluster_id}/parks/{park_id}"): Case(),
    ("PATCH", "/v1/clusters/{cluster_id}/parks/{park_id}"): Case(
        body={"capacity": 9}, lower=("a2", 403)
    ),
    ("GET", "/v1/clusters/{cluster_id}/audit-events"): Case(lower=("a2", 403)),
    # marketplace: a1 is the requester (fa1), a2 an annotator firm, a1x may read only
    ("POST", "/v1/tasks"): Case(body=TASK, lower=("a1x", 403)),
    ("GET", "/v1/tasks"): Case(foreign=None),
    ("GET", "/v1/tasks/{task_id}"): Case(),
    ("PATCH", "/v1/tasks/{task_id}"): Case(body={"title": "T"}, lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}:publish"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}:pause"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}:resume"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}:complete"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}:cancel"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}/items"): Case(
        lower=("a1x", 403), note="access is settled before the body is read (bodies: items tests)"
    ),
    ("GET", "/v1/tasks/{task_id}/items"): Case(lower=("a1x", 403)),
    ("GET", "/v1/tasks/{task_id}/quality"): Case(lower=("a1x", 403)),
    ("GET", "/v1/tasks/{task_id}/results"): Case(lower=("a1x", 403)),
    ("GET", "/v1/tasks/{task_id}/annotations"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}/assignments:claim"): Case(
        body={"count": 1}, lower=("a1x", 403), note="a firm does not annotate its own task"
    ),
    ("POST", "/v1/tasks/{task_id}/assignments:release"): Case(
        body={"assignment_ids": ["{assignment_id}"]}, lower=("a1x", 403)
    ),
    ("POST", "/v1/tasks/{task_id}/assignments:submit"): Case(
        body={"answers": [{"assignment_id": "{assignment_id}", "answer": {"label": "x"}}]},
        lower=("a1x", 403),
    ),
    # contracted task of fa1 (task_id below is its contract_task_id): fa2 bid, was awarded
    ("POST", "/v1/tasks/{task_id}/bids"): Case(
        body={"price_per_annotation": 1, "daily_capacity": 1},
        lower=("a1x", 403),
        note="a firm does not bid on its own task",
    ),
    ("GET", "/v1/tasks/{task_id}/bids"): Case(),
    ("GET", "/v1/tasks/{task_id}/bids/{bid_id}"): Case(),
    ("POST", "/v1/tasks/{task_id}/bids/{bid_id}:withdraw"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}/bids/{bid_id}:decline"): Case(
        body={"reason": "no"}, lower=("a1x", 403)
    ),
    ("POST", "/v1/tasks/{task_id}/bids/{bid_id}:award"): Case(
        body={"quota": 1}, lower=("a1x", 403)
    ),
    ("GET", "/v1/tasks/{task_id}/contracts"): Case(),
    ("GET", "/v1/tasks/{task_id}/contracts/{contract_id}"): Case(),
    ("POST", "/v1/tasks/{task_id}/contracts/{contract_id}:terminate"): Case(lower=("a1x", 403)),
    ("GET", "/v1/firms/{firm_id}/reputation"): Case(note="firms sharing a cluster only"),
    # ledger and review: a1's firm fa1 runs the cluster; a2 holds a lease (not submitted)
    ("POST", "/v1/ledger/grants"): Case(
        body={"cluster_id": "{cluster_id}", "firm_id": "{fa2}", "amount": 5}, lower=("a1x", 403)
    ),
    ("GET", "/v1/ledger/accounts"): Case(foreign=None, lower=("a1x", 403)),
    ("GET", "/v1/ledger/accounts/{account_id}/entries"): Case(lower=("a1x", 403)),
    ("GET", "/v1/tasks/{task_id}/submissions"): Case(lower=("a1x", 403)),
    ("POST", "/v1/tasks/{task_id}/submissions:accept"): Case(
        body={"assignment_ids": ["{assignment_id}"]}, lower=("a1x", 403)
    ),
    ("POST", "/v1/tasks/{task_id}/submissions:reject"): Case(
        body={"assignment_ids": ["{assignment_id}"], "reason": "no"}, lower=("a1x", 403)
    ),
    # webhooks: fa1's owner a1 manages fa1's; a1x, its annotator, may not
    ("POST", "/v1/webhooks"): Case(body=WEBHOOK, foreign=None, lower=("a1x", 403)),
    ("GET", "/v1/webhooks"): Case(foreign=None, lower=("a1x", 403)),
    ("GET", "/v1/webhooks/{webhook_id}"): Case(lower=("a1x", 403)),
    ("PATCH", "/v1/webhooks/{webhook_id}"): Case(body={"description": "x"}, lower=("a1x", 403)),
    ("DELETE", "/v1/webhooks/{webhook_id}"): Case(lower=("a1x", 403)),
    ("POST", "/v1/webhooks/{webhook_id}:rotate-secret"): Case(
        body={"keep_previous_seconds": 60}, lower=("a1x", 403)
    ),
    ("POST", "/v1/webhooks/{webhook_id}:ping"): Case(lower=("a1x", 403)),
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): Case(lower=("a1x", 403)),
    ("GET", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}"): Case(lower=("a1x", 403)),
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}:redeliver"): Case(
        lower=("a1x", 403)
    ),
    # messaging: {channel_id} is a public channel a1 created, a1x joined, a2 did not
    ("POST", "/v1/channels"): Case(body=CHANNEL),
    ("GET", "/v1/channels"): Case(foreign=None),
    ("GET", "/v1/channels/{channel_id}"): Case(),
    ("PATCH", "/v1/channels/{channel_id}"): Case(body={"topic": "t"}, lower=("a1x", 403)),
    ("POST", "/v1/channels/{channel_id}:join"): Case(),
    ("POST", "/v1/channels/{channel_id}:leave"): Case(),
    ("GET", "/v1/channels/{channel_id}/members"): Case(),
    ("POST", "/v1/channels/{channel_id}/members"): Case(
        body={"user_id": "{a2_id}"}, lower=("a2", 403), note="only members invite"
    ),
    ("POST", "/v1/conversations"): Case(
        body={"cluster_id": "{cluster_id}", "user_ids": ["{a2_id}"]}
    ),
    ("GET", "/v1/channels/{channel_id}/messages"): Case(),
    ("POST", "/v1/channels/{channel_id}/messages"): Case(
        body={"text": "hi"}, lower=("a2", 403), note="posting needs joining"
    ),
    ("PATCH", "/v1/channels/{channel_id}/messages/{message_id}"): Case(
        body={"text": "x"}, lower=("a1x", 403), note="the author only"
    ),
    ("DELETE", "/v1/channels/{channel_id}/messages/{message_id}"): Case(lower=("a1x", 403)),
    ("GET", "/v1/channels/{channel_id}/messages/{message_id}/edits"): Case(),
    ("POST", "/v1/channels/{channel_id}/read-marker"): Case(body={"seq": 0}),
    ("GET", "/v1/messages/search"): Case(
        foreign=None, note="readable channels only; another tenant's: test_messaging_search"
    ),
    ("GET", "/v1/clusters/{cluster_id}/presence"): Case(),
    # metrics: the operator fa1's owner a1 reads and imports; member fa2 gets 403
    ("GET", "/v1/clusters/{cluster_id}/indicators"): Case(lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/network"): Case(lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/classification"): Case(lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/diagnostics"): Case(lower=("a2", 403)),
    ("POST", "/v1/clusters/{cluster_id}/history"): Case(
        lower=("a2", 403), note="access is settled before the body is read (bodies: metrics tests)"
    ),
    ("GET", "/v1/clusters/{cluster_id}/indicators/history"): Case(lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/charts/radar.svg"): Case(lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/charts/network.svg"): Case(lower=("a2", 403)),
    ("GET", "/v1/clusters/{cluster_id}/metrics-visibility"): Case(
        note="the operator and every member firm read the setting"
    ),
    ("PUT", "/v1/clusters/{cluster_id}/metrics-visibility"): Case(
        body={"members": True}, lower=("a2", 403)
    ),
    ("GET", "/v1/clusters/compare"): Case(
        foreign=None, note="ids in the query; foreign and unknown ids: test_metrics_views"
    ),
}


async def _firm(client: httpx.AsyncClient, email: str, name: str, region: str) -> tuple[str, dict]:
    await sign_up(client, email)
    tokens = await login(client, email)
    firm = await client.post(
        "/v1/firms", json={"name": name, "region": region, **FIRM}, headers=bearer(tokens)
    )
    assert firm.status_code == 201, firm.text
    return firm.json()["id"], await login(client, email, firm_id=firm.json()["id"])


async def build_world(client: httpx.AsyncClient, tag: str) -> dict[str, Any]:
    """A cluster run by fa1 (owner a1, annotator a1x), member fa2 (owner a2), applicant fa3."""
    w: dict[str, Any] = {}
    w["fa1"], w["a1"] = await _firm(client, f"a1@{tag}.example", f"{tag}-1", "CN-BJ")
    w["fa2"], w["a2"] = await _firm(client, f"a2@{tag}.example", f"{tag}-2", "CN-SX")
    w["fa3"], w["a3"] = await _firm(client, f"a3@{tag}.example", f"{tag}-3", "CN-HE")
    w["free_firm"], _ = await _firm(client, f"a4@{tag}.example", f"{tag}-4", "CN-NM")
    a1 = bearer(w["a1"])
    cluster = await client.post(
        "/v1/clusters", json={"name": tag, "core_region": "CN-BJ"}, headers=a1
    )
    w["cluster_id"] = cluster.json()["id"]
    cid = w["cluster_id"]
    inv = await client.post(
        f"/v1/clusters/{cid}/invitations", json={"firm_id": w["fa2"]}, headers=a1
    )
    await client.post(
        f"/v1/clusters/{cid}/invitations/{inv.json()['id']}:accept", headers=bearer(w["a2"])
    )
    jr = await client.post(f"/v1/clusters/{cid}/join-requests", json={}, headers=bearer(w["a3"]))
    w["request_id"] = jr.json()["id"]
    cinv = await client.post(
        f"/v1/clusters/{cid}/invitations", json={"firm_id": w["fa3"]}, headers=a1
    )
    w["cluster_invitation_id"] = cinv.json()["id"]
    park = await client.post(f"/v1/clusters/{cid}/parks", json=PARK, headers=a1)
    w["park_id"] = park.json()["id"]
    finv = await client.post(
        f"/v1/firms/{w['fa1']}/invitations",
        json={"email": f"a1x@{tag}.example", "role": "annotator"},
        headers=a1,
    )
    await sign_up(client, f"a1x@{tag}.example")
    a1x = await login(client, f"a1x@{tag}.example")
    accepted = await client.post(
        f"/v1/firms/{w['fa1']}/invitations/{finv.json()['id']}:accept",
        json={"token": finv.json()["token"]},
        headers=bearer(a1x),
    )
    assert accepted.status_code == 200, accepted.text
    w["a1x"] = await login(client, f"a1x@{tag}.example", firm_id=w["fa1"])
    w["annotator_id"] = accepted.json()["user_id"]
    pending = await client.post(
        f"/v1/firms/{w['fa1']}/invitations", json={"email": f"later@{tag}.example"}, headers=a1
    )
    w["firm_invitation_id"] = pending.json()["id"]
    created = await client.post(f"/v1/firms/{w['fa1']}/clients", json=CLIENT, headers=a1)
    assert created.status_code == 201, created.text
    w["client_id"] = created.json()["client_id"]
    me = await client.get("/v1/users/me", headers=a1)
    w["a1_id"] = me.json()["id"]
    return w


def fill(path: str, w: dict[str, Any], overrides: dict[str, str] | None = None) -> str:
    params = {
        "firm_id": w["fa1"],
        "user_id": w["annotator_id"] if "/firms/" in path else w["a1_id"],
        "cluster_id": w["cluster_id"],
        "request_id": w["request_id"],
        "invitation_id": w["cluster_invitation_id"]
        if "/clusters/" in path
        else w["firm_invitation_id"],
        "park_id": w["park_id"],
        "client_id": w["client_id"],
        "task_id": w.get(
            "contract_task_id" if "/bids" in path or "/contracts" in path else "task_id", ""
        ),
        "bid_id": w.get("bid_id", ""),
        "contract_id": w.get("contract_id", ""),
        "webhook_id": w.get("webhook_id", ""),
        "delivery_id": w.get("delivery_id", ""),
        "channel_id": w.get("channel_id", ""),
        "message_id": w.get("message_id", ""),
        "account_id": w.get("account_id", ""),
    }
    if path.startswith("/v1/firms/{firm_id}/members/{user_id}"):
        params["user_id"] = w["a1_id"]  # the owner: an annotator may not touch it
    for key, ref in (overrides or {}).items():
        params[key] = w[ref]
    out = path
    for key, value in params.items():
        out = out.replace("{" + key + "}", value)
    return out


def body_for(case: Case, w: dict[str, Any]) -> dict[str, Any] | None:
    """The case's body with ``"{name}"`` strings (at any depth) replaced from the world."""
    if case.body is None:
        return None

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
            return w[value[1:-1]]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    body: dict[str, Any] = resolve(case.body)
    return body


async def build_market_world(client: httpx.AsyncClient, w: dict[str, Any]) -> None:
    """fa1 posts an open task in its cluster; fa2's owner a2 holds a lease on one item."""
    a1 = bearer(w["a1"])
    grant = {"cluster_id": w["cluster_id"], "firm_id": w["fa1"], "amount": 100}
    granted = await client.post("/v1/ledger/grants", json=grant, headers=a1)
    assert granted.status_code == 201, granted.text  # publishing escrows the rewards
    accounts = await client.get("/v1/ledger/accounts", headers=a1)
    w["account_id"] = next(a["id"] for a in accounts.json() if a["kind"] == "available")
    created = await client.post("/v1/tasks", json=body_for(Case(body=TASK), w), headers=a1)
    assert created.status_code == 201, created.text
    w["task_id"] = created.json()["id"]
    items = [{"input": {"text": "a"}}, {"input": {"text": "b"}}]
    imported = await client.post(f"/v1/tasks/{w['task_id']}/items", json=items, headers=a1)
    assert imported.status_code == 200, imported.text
    published = await client.post(f"/v1/tasks/{w['task_id']}:publish", headers=a1)
    assert published.status_code == 200, published.text
    claimed = await client.post(
        f"/v1/tasks/{w['task_id']}/assignments:claim", json={"count": 1}, headers=bearer(w["a2"])
    )
    assert claimed.status_code == 200, claimed.text
    w["assignment_id"] = claimed.json()["assignments"][0]["assignment_id"]
    hook = await client.post("/v1/webhooks", json=WEBHOOK, headers=a1)
    assert hook.status_code == 201, hook.text
    w["webhook_id"] = hook.json()["id"]
    pinged = await client.post(f"/v1/webhooks/{w['webhook_id']}:ping", headers=a1)
    assert pinged.status_code == 202, pinged.text
    w["delivery_id"] = pinged.json()["id"]
    await build_contract_world(client, w)


async def build_contract_world(client: httpx.AsyncClient, w: dict[str, Any]) -> None:
    """fa1 posts a contracted task; fa2 bids and is awarded a contract for one annotation."""
    a1 = bearer(w["a1"])
    body = {**body_for(Case(body=TASK), w), "allocation": "contracted"}
    created = await client.post("/v1/tasks", json=body, headers=a1)
    assert created.status_code == 201, created.text
    tid = w["contract_task_id"] = created.json()["id"]
    items = [{"input": {"text": "a"}}, {"input": {"text": "b"}}]
    assert (await client.post(f"/v1/tasks/{tid}/items", json=items, headers=a1)).status_code == 200
    published = await client.post(f"/v1/tasks/{tid}:publish", headers=a1)
    assert published.status_code == 200, published.text
    bid = await client.post(
        f"/v1/tasks/{tid}/bids",
        json={"price_per_annotation": 1, "daily_capacity": 5},
        headers=bearer(w["a2"]),
    )
    assert bid.status_code == 201, bid.text
    w["bid_id"] = bid.json()["id"]
    awarded = await client.post(
        f"/v1/tasks/{tid}/bids/{w['bid_id']}:award", json={"quota": 1}, headers=a1
    )
    assert awarded.status_code == 201, awarded.text
    w["contract_id"] = awarded.json()["id"]


async def build_messaging_world(client: httpx.AsyncClient, w: dict[str, Any]) -> None:
    """a1 opens a public channel and posts in it; a1x joins it; a2 stays out."""
    a1 = bearer(w["a1"])
    created = await client.post("/v1/channels", json=body_for(Case(body=CHANNEL), w), headers=a1)
    assert created.status_code == 201, created.text
    w["channel_id"] = created.json()["id"]
    joined = await client.post(f"/v1/channels/{w['channel_id']}:join", headers=bearer(w["a1x"]))
    assert joined.status_code == 200, joined.text
    posted = await client.post(
        f"/v1/channels/{w['channel_id']}/messages", json={"text": "hello"}, headers=a1
    )
    assert posted.status_code == 201, posted.text
    w["message_id"] = posted.json()["id"]
    w["a2_id"] = (await client.get("/v1/users/me", headers=bearer(w["a2"]))).json()["id"]


async def snapshot(gateway: Any) -> dict[str, set[tuple[Any, ...]]]:
    """Every membership and marketplace row, except logs that refused calls may append to."""
    from services.marketplace.models import metadata as marketplace_metadata
    from services.membership.models import metadata

    skip = {"audit_events", "idempotency_keys"}
    out: dict[str, set[tuple[Any, ...]]] = {}
    async with gateway.apps["membership"].state.db.sessionmaker() as session:
        for name, table in metadata.tables.items():
            if name in skip:
                continue
            rows = (await session.execute(sa.select(table))).all()
            out[name] = {tuple(str(v) for v in row) for row in rows}
        audit = (
            await session.execute(
                sa.text("SELECT count(*) FROM audit_events WHERE outcome = 'success'")
            )
        ).scalar()
        out["audit_success"] = {(audit,)}
    # The marketplace's relay marks its outbox rows sent in the background: not a change.
    skip_marketplace = {"idempotency_keys", "outbox", "processed_events"}
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        for name, table in marketplace_metadata.tables.items():
            if name not in skip_marketplace:
                rows = (await session.execute(sa.select(table))).all()
                out[f"marketplace.{name}"] = {tuple(str(v) for v in row) for row in rows}
        out["marketplace.outbox_count"] = {
            ((await session.execute(sa.text("SELECT count(*) FROM outbox"))).scalar(),)
        }
    from services.messaging.models import metadata as messaging_metadata

    async with gateway.apps["messaging"].state.db.sessionmaker() as session:
        for name, table in messaging_metadata.tables.items():
            if name not in skip_marketplace:
                rows = (await session.execute(sa.select(table))).all()
                out[f"messaging.{name}"] = {tuple(str(v) for v in row) for row in rows}
        out["messaging.outbox_count"] = {
            ((await session.execute(sa.text("SELECT count(*) FROM outbox"))).scalar(),)
        }
    # Metrics: the history import (its aggregates follow it) and the settings write.
    async with gateway.apps["metrics"].state.db.sessionmaker() as session:
        rows = (await session.execute(sa.text("SELECT * FROM imported_records"))).all()
        out["metrics.imported_records"] = {tuple(str(v) for v in row) for row in rows}
        rows = (await session.execute(sa.text("SELECT * FROM cluster_settings"))).all()
        out["metrics.cluster_settings"] = {tuple(str(v) for v in row) for row in rows}
    return out


def v1_routes(gateway: Any) -> set[tuple[str, str]]:
    """Every ``/v1`` operation of every service, read from the merged route table."""
    found = set()
    for path, item in gateway.openapi()["paths"].items():
        if path.startswith("/v1/"):
            found.update((method.upper(), path) for method in item)
    assert found, "no /v1 routes found"
    return found


@pytest.mark.slow
async def test_every_route_isolates_tenants_and_refuses_bad_input(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    routes = v1_routes(gateway)
    missing = routes - set(CASES) - PUBLIC
    assert not missing, f"routes without an isolation case: {sorted(missing)}"
    stale = set(CASES) - routes
    assert not stale, f"cases for routes that no longer exist: {sorted(stale)}"

    a = await build_world(client, "alpha")
    b = await build_world(client, "beta")
    await settle(gateway)  # the marketplace's read model knows both worlds
    # Webhook deliveries stay as the worlds leave them: no worker sends them meanwhile.
    await gateway.apps["marketplace"].state.webhook_worker.stop()
    await build_market_world(client, a)
    await build_market_world(client, b)
    await settle_messaging(gateway)
    await settle_metrics(gateway)  # the metrics read model knows both worlds
    await build_messaging_world(client, a)
    await build_messaging_world(client, b)
    before = await snapshot(gateway)
    failures: list[str] = []

    async def call(method: str, url: str, token: dict | None, body: Any) -> httpx.Response:
        headers = bearer(token) if token else {}
        return await client.request(method, url, headers=headers, json=body)

    for (method, path), case in sorted(CASES.items()):
        body = body_for(case, a)
        if case.foreign is not None:
            foreign_body = body_for(case, b) if case.body else None
            response = await call(method, fill(path, b), a["a1"], foreign_body)
            if response.status_code != case.foreign:
                failures.append(
                    f"foreign {method} {path}: {response.status_code} {response.text[:200]}"
                )
            if "{" in path:
                unknown = path
                for name in (
                    "firm_id",
                    "user_id",
                    "cluster_id",
                    "request_id",
                    "invitation_id",
                    "park_id",
                    "client_id",
                    "task_id",
                    "bid_id",
                    "contract_id",
                    "webhook_id",
                    "delivery_id",
                    "channel_id",
                    "message_id",
                    "account_id",
                ):
                    unknown = unknown.replace("{" + name + "}", "zzz_00000000000000000000000000")
                response = await call(method, unknown, a["a1"], body)
                if response.status_code != 404:
                    failures.append(f"unknown id {method} {path}: {response.status_code}")
        if case.lower is not None:
            who, expected = case.lower
            response = await call(method, fill(path, a, case.lower_params), a[who], body)
            if response.status_code != expected:
                failures.append(
                    f"lower role {method} {path}: {response.status_code} {response.text[:200]}"
                )
        for token in (None, {"access_token": "garbage.token.here"}):
            response = await call(method, fill(path, a), token, body)
            if response.status_code != 401 or "www-authenticate" not in response.headers:
                failures.append(f"bad token {method} {path}: {response.status_code}")
        if case.body is not None:
            malformed = await client.request(
                method,
                fill(path, a),
                headers={**bearer(a["a1"]), "content-type": "application/json"},
                content=b"{nope",
            )
            extra = await call(
                method, fill(path, a), a["a1"], {**(body or {}), "firm_id_override": "x"}
            )
            for response in (malformed, extra):
                if response.status_code not in (400, 422):
                    failures.append(f"bad body {method} {path}: {response.status_code}")
    assert not failures, "\n".join(failures)
    after = await snapshot(gateway)
    changed = {name for name in before if before[name] != after[name]}
    assert not changed, f"refused calls changed: {sorted(changed)}"
