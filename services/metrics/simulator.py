"""A simulator of cluster life, driven only through the public HTTP API (httpx).

It builds clusters the way their firms would: people sign up and sign in (authorization
code + PKCE through the login page), register their firms, the operator creates the
cluster and invites the others, registers parks where firms sit, grants credits, and
the firms trade work on the marketplace — open tasks claimed, answered and accepted,
contracted tasks with bids and awards — and talk in direct conversations. That is the
*recent* activity, dated now by the services themselves. The *older* months come in as
the operator's history import (``POST /v1/clusters/{id}/history``), as a cluster moving
onto the platform would bring them. Nothing here touches a database.

Scenarios (:data:`SCENARIOS`):

* ``software`` — a software cluster in one city (Chengdu, CN-SC): digital-core firms, a
  university and an investor with dense local ties → digital industrialisation,
  geographic.
* ``furniture`` — a furniture manufacturing cluster (Ganzhou, CN-JX) run by its
  promotion agency and transformed by an industrial-internet platform and a shared
  service centre: manufacturers (05) matched with them on the platform, supply ties
  among themselves → industrial digitalisation, geographic.
* ``ai`` — an AI cluster whose core firms sit in Beijing, tied by annotation contracts to
  vendor bases in Shanxi, Inner Mongolia and Hebei → virtual network, network space.
  The operator publishes its metrics to the member firms.
* ``idle_park`` — a park of 20 slots with three located firms that never act on the
  platform → idle carriers.
* ``loose`` — seven firms and a single tie, no knowledge or capital actors →
  agglomerated but not clustered.
* ``thin`` — three firms and one record two days old → insufficient evidence.

The services apply each other's events asynchronously, so a call that depends on
another service's read model (the marketplace learning a new member, messaging a new
user) is retried while it answers 403/404, for a bounded time; a 429 waits for its
``Retry-After``. :func:`wait_for_metrics` then polls the metrics API until it reflects
everything the scenario did.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

WEB_CLIENT = "onecluster-web"
LABELS = ["positive", "negative", "neutral"]


class SimulationError(RuntimeError):
    """The platform answered something the scenario cannot go on from."""


# -- scenario specifications ------------------------------------------------------
@dataclass(frozen=True)
class FirmSpec:
    key: str
    name: str
    region: str
    city: str
    actor_type: str
    industries: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    """``requester`` publishes ``items`` items per vendor; every answer is accepted."""

    requester: str
    vendors: tuple[str, ...]
    items: int
    allocation: str = "open"
    complete: bool = True


@dataclass(frozen=True)
class Record:
    """An imported collaboration record ``age_days`` old."""

    a: str
    b: str
    kind: str
    weight: float
    age_days: int


@dataclass(frozen=True)
class ParkSpec:
    name: str
    region: str
    city: str
    capacity: int
    located: tuple[str, ...]


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    core_region: str
    firms: tuple[FirmSpec, ...]
    tasks: tuple[TaskSpec, ...] = ()
    conversations: tuple[tuple[str, str, int], ...] = ()
    history: tuple[Record, ...] = ()
    parks: tuple[ParkSpec, ...] = ()
    publish_to_members: bool = False

    @property
    def operator(self) -> str:
        return self.firms[0].key

    @property
    def accepted_annotations(self) -> int:
        return sum(t.items * len(t.vendors) for t in self.tasks)

    @property
    def messages(self) -> int:
        return sum(n for _, _, n in self.conversations)


def _firm(key: str, name: str, region: str, city: str, actor: str, *codes: str) -> FirmSpec:
    return FirmSpec(key, name, region, city, actor, codes)


def _pairs(pairs: list[tuple[str, str]], kind: str, weight: float, ages: list[int]) -> list[Record]:
    return [Record(a, b, kind, weight, age) for a, b in pairs for age in ages]


SOFTWARE = Scenario(
    key="software",
    name="Chengdu software cluster",
    core_region="CN-SC",
    firms=(
        _firm("soft", "Tianfu Software", "CN-SC", "Chengdu", "large_enterprise", "0301"),
        _firm(
            "chips", "Jinjiang Microelectronics", "CN-SC", "Chengdu", "medium_enterprise", "0105"
        ),
        _firm(
            "cloud", "Rongcheng Cloud", "CN-SC", "Chengdu", "technology_service_provider", "0303"
        ),
        _firm("games", "Panda Games", "CN-SC", "Chengdu", "small_micro_enterprise", "0404"),
        _firm("vision", "Shu Vision AI", "CN-SC", "Chengdu", "small_micro_enterprise", "0305"),
        _firm("uni", "Chengdu University of IT", "CN-SC", "Chengdu", "university", "0301"),
        _firm("fund", "Hi-Tech Zone Venture Fund", "CN-SC", "Chengdu", "investor", "0403"),
    ),
    tasks=(
        TaskSpec("soft", ("games",), 4),
        TaskSpec("cloud", ("vision",), 4),
        TaskSpec("chips", ("cloud",), 3, allocation="contracted"),
    ),
    conversations=(("soft", "cloud", 4), ("uni", "vision", 3)),
    history=(
        *_pairs(
            [("soft", "chips"), ("soft", "cloud"), ("cloud", "games"), ("uni", "soft")],
            "joint_project",
            1.0,
            [15, 60, 150, 240],
        ),
        *_pairs([("fund", "games"), ("fund", "vision")], "investment", 1.0, [30, 200]),
        *_pairs([("chips", "vision"), ("uni", "chips")], "contract", 0.5, [45, 120]),
    ),
)

FURNITURE = Scenario(
    key="furniture",
    name="Nankang furniture cluster",
    core_region="CN-JX",
    firms=(
        _firm(
            "agency",
            "Nankang Cluster Promotion Centre",
            "CN-JX",
            "Ganzhou",
            "service_agency",
            "0509",
        ),
        _firm("plat", "Jiaju Industrial Internet", "CN-JX", "Ganzhou", "internet_platform", "0401"),
        _firm(
            "svc",
            "Shared Design & Data Centre",
            "CN-JX",
            "Ganzhou",
            "technology_service_provider",
            "0304",
        ),
        _firm("m1", "Ganzhou Solid Wood", "CN-JX", "Ganzhou", "medium_enterprise", "0502"),
        _firm("m2", "Nankang Sofa Works", "CN-JX", "Ganzhou", "small_micro_enterprise", "0502"),
        _firm("m3", "Jiangxi Panel Furniture", "CN-JX", "Ganzhou", "medium_enterprise", "0502"),
        _firm("m4", "Gannan Logistics", "CN-JX", "Ganzhou", "small_micro_enterprise", "0504"),
    ),
    tasks=(
        TaskSpec("m1", ("plat",), 5),
        TaskSpec("m2", ("svc",), 5),
        TaskSpec("m3", ("svc",), 4, allocation="contracted"),
        TaskSpec("m4", ("plat",), 5),
    ),
    conversations=(("plat", "m1", 4),),
    history=(
        Record("m1", "m2", "supply", 1.0, 20),
        Record("m3", "m4", "supply", 1.0, 35),
        Record("m2", "m3", "supply", 1.0, 50),
        Record("m1", "m4", "supply", 0.8, 70),
        Record("plat", "m3", "training", 0.3, 40),
        Record("agency", "m1", "training", 0.2, 60),
        *_pairs([("m1", "m2"), ("m2", "m3"), ("m3", "m4")], "supply", 1.0, [150, 250]),
    ),
)

AI = Scenario(
    key="ai",
    name="Beijing AI data cluster",
    core_region="CN-BJ",
    firms=(
        _firm("core", "Zhiyuan AI", "CN-BJ", "Beijing", "large_enterprise", "0301", "0406"),
        _firm("core2", "Haidian Speech Lab", "CN-BJ", "Beijing", "medium_enterprise", "0305"),
        _firm("uni", "Beijing Institute of AI", "CN-BJ", "Beijing", "university", "0301"),
        _firm("fund", "Zhongguancun AI Fund", "CN-BJ", "Beijing", "investor", "0403"),
        _firm(
            "sx1",
            "Datong Data Annotation Base",
            "CN-SX",
            "Datong",
            "small_micro_enterprise",
            "0304",
        ),
        _firm("sx2", "Taiyuan Labelling", "CN-SX", "Taiyuan", "small_micro_enterprise", "0304"),
        _firm("nm", "Hohhot Data Valley", "CN-NM", "Hohhot", "small_micro_enterprise", "0304"),
        _firm(
            "he", "Baoding Annotation Centre", "CN-HE", "Baoding", "small_micro_enterprise", "0304"
        ),
    ),
    tasks=(
        TaskSpec("core", ("sx1", "nm", "he"), 4, allocation="contracted"),
        TaskSpec("core2", ("sx2",), 4),
    ),
    conversations=(("core", "sx1", 4), ("core", "nm", 3)),
    history=(
        *_pairs(
            [("core", "sx1"), ("core", "nm"), ("core2", "he")], "contract", 1.0, [20, 50, 140, 230]
        ),
        Record("core", "uni", "joint_project", 0.5, 15),
        Record("fund", "core", "investment", 0.5, 45),
        Record("core", "core2", "data_exchange", 0.3, 70),
    ),
    publish_to_members=True,
)

IDLE_PARK = Scenario(
    key="idle_park",
    name="Baoding equipment park",
    core_region="CN-HE",
    firms=(
        _firm("zone", "Baoding Development Zone", "CN-HE", "Baoding", "government_body", "0508"),
        _firm("e1", "Baoding Machinery", "CN-HE", "Baoding", "medium_enterprise", "0502"),
        _firm("e2", "Hebei Smart Parts", "CN-HE", "Baoding", "small_micro_enterprise", "0502"),
        _firm("e3", "Yanzhao Logistics", "CN-HE", "Baoding", "small_micro_enterprise", "0504"),
        _firm("e4", "Baoding Power Tech", "CN-HE", "Baoding", "medium_enterprise", "0104"),
    ),
    history=(
        Record("zone", "e1", "training", 0.5, 20),
        Record("e1", "e4", "supply", 1.0, 25),
        Record("e2", "e3", "supply", 1.0, 40),
        Record("e4", "e2", "supply", 0.5, 55),
    ),
    parks=(ParkSpec("Baoding Smart Equipment Park", "CN-HE", "Baoding", 20, ("e1", "e2", "e3")),),
)

LOOSE = Scenario(
    key="loose",
    name="Taiyuan logistics park firms",
    core_region="CN-SX",
    firms=(
        _firm("l1", "Jinzhong Freight", "CN-SX", "Taiyuan", "medium_enterprise", "0504"),
        _firm("l2", "Fenhe Warehousing", "CN-SX", "Taiyuan", "small_micro_enterprise", "0504"),
        _firm("l3", "Taiyuan Cold Chain", "CN-SX", "Taiyuan", "small_micro_enterprise", "0504"),
        _firm("l4", "Shanxi Packaging", "CN-SX", "Taiyuan", "small_micro_enterprise", "0502"),
        _firm("l5", "Jin Trucks", "CN-SX", "Taiyuan", "medium_enterprise", "0503"),
        _firm("l6", "Longcheng Parts", "CN-SX", "Taiyuan", "small_micro_enterprise", "0502"),
        _firm("l7", "Yingze Express", "CN-SX", "Taiyuan", "small_micro_enterprise", "0504"),
    ),
    history=(Record("l1", "l2", "supply", 1.0, 30), Record("l1", "l2", "supply", 1.0, 80)),
)

THIN = Scenario(
    key="thin",
    name="Hohhot newcomers",
    core_region="CN-NM",
    firms=(
        _firm("n1", "Hohhot Cloud", "CN-NM", "Hohhot", "medium_enterprise", "0303"),
        _firm("n2", "Grassland Data", "CN-NM", "Hohhot", "small_micro_enterprise", "0304"),
        _firm("n3", "Inner Mongolia Dairy Tech", "CN-NM", "Hohhot", "medium_enterprise", "0501"),
    ),
    history=(Record("n1", "n2", "contract", 1.0, 2),),
)

SCENARIOS: dict[str, Scenario] = {
    s.key: s for s in (SOFTWARE, FURNITURE, AI, IDLE_PARK, LOOSE, THIN)
}


# -- the HTTP side ---------------------------------------------------------------------
@dataclass
class Actor:
    """The owner of one simulated firm, signed in acting for it."""

    key: str
    firm_id: str
    user_id: str
    email: str
    tokens: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens['access_token']}"}


@dataclass
class SimulatedCluster:
    scenario: Scenario
    cluster_id: str
    actors: dict[str, Actor] = field(default_factory=dict)

    @property
    def operator(self) -> Actor:
        return self.actors[self.scenario.operator]


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action, self._inside = values.get("action", ""), True
        elif tag == "input" and self._inside and values.get("name"):
            self.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


class Api:
    """Calls with the retries a client of an eventually consistent platform needs."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        redirect_uri: str,
        password: str = "simulated cluster life",  # noqa: S107 - the simulated people's
        patience: float = 60.0,
    ) -> None:
        self.client = client
        self.redirect_uri = redirect_uri
        self.password = password
        self.patience = patience

    async def call(
        self,
        method: str,
        path: str,
        *,
        actor: Actor | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        lagging: tuple[int, ...] = (),
    ) -> Any:
        """The JSON of a 2xx answer; ``lagging`` statuses are retried until patience ends."""
        deadline = time.monotonic() + self.patience
        while True:
            response = await self.client.request(
                method, path, json=json, params=params, headers=actor.auth if actor else None
            )
            if response.is_success:
                return response.json() if response.content else None
            waiting = response.status_code == 429 or response.status_code in lagging
            if not waiting or time.monotonic() > deadline:
                raise SimulationError(
                    f"{method} {path}: {response.status_code} {response.text[:300]}"
                )
            retry_after = response.headers.get("retry-after", "")
            await asyncio.sleep(float(retry_after) if retry_after.isdigit() else 0.1)

    async def token(self, data: dict[str, str]) -> dict[str, Any]:
        deadline = time.monotonic() + self.patience
        while True:
            response = await self.client.post("/oauth/token", data=data)
            if response.status_code == 200:
                tokens: dict[str, Any] = response.json()
                return tokens
            if response.status_code != 429 or time.monotonic() > deadline:
                raise SimulationError(f"token: {response.status_code} {response.text[:300]}")
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))

    async def sign_in(self, email: str) -> dict[str, Any]:
        """Authorization code with PKCE through the login page, like a browser."""
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .decode()
            .rstrip("=")
        )
        state = secrets.token_urlsafe(12)
        page = await self.client.get(
            "/oauth/authorize",
            params={
                "response_type": "code",
                "client_id": WEB_CLIENT,
                "redirect_uri": self.redirect_uri,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )
        if page.status_code != 200:
            raise SimulationError(f"authorize: {page.status_code} {page.text[:300]}")
        form = _Form()
        form.feed(page.text)
        if form.action is None:
            raise SimulationError("the sign-in page has no form")
        form.fields.update(email=email, password=self.password)
        answer = await self.client.post(form.action, data=form.fields)
        location = answer.headers.get("location", "")
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        if answer.status_code != 302 or query.get("state") != state or "code" not in query:
            raise SimulationError(f"sign-in of {email}: {answer.status_code} {location}")
        return await self.token(
            {
                "grant_type": "authorization_code",
                "code": query["code"],
                "redirect_uri": self.redirect_uri,
                "client_id": WEB_CLIENT,
                "code_verifier": verifier,
            }
        )

    async def owner(self, spec: FirmSpec, email: str) -> Actor:
        """Sign up, sign in, register the firm; the refreshed token acts for it."""
        user = await self.call(
            "POST",
            "/v1/users",
            json={"email": email, "password": self.password, "display_name": spec.name},
        )
        tokens = await self.sign_in(email)
        firm = await self.call(
            "POST",
            "/v1/firms",
            actor=Actor(spec.key, "", user["id"], email, tokens),
            json={
                "name": spec.name,
                "region": spec.region,
                "city": spec.city,
                "actor_type": spec.actor_type,
                "industries": list(spec.industries),
            },
        )
        # A refreshed token acts for the user's earliest firm: the one just registered.
        tokens = await self.token(
            {
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": WEB_CLIENT,
            }
        )
        return Actor(spec.key, firm["id"], user["id"], email, tokens)


# -- running a scenario ------------------------------------------------------------------
def _day(age_days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=age_days)).date().isoformat()


async def simulate(api: Api, scenario: Scenario, tag: str) -> SimulatedCluster:
    """Build the scenario's cluster and its life through the API."""
    actors = {
        f.key: await api.owner(f, f"{f.key}.{scenario.key}@{tag}.example") for f in scenario.firms
    }
    operator = actors[scenario.operator]
    cluster = await api.call(
        "POST",
        "/v1/clusters",
        actor=operator,
        json={"name": f"{scenario.name} {tag}", "core_region": scenario.core_region},
    )
    sim = SimulatedCluster(scenario, cluster["id"], actors)
    base = f"/v1/clusters/{sim.cluster_id}"
    for key, actor in actors.items():
        if key == scenario.operator:
            continue
        invitation = await api.call(
            "POST", f"{base}/invitations", actor=operator, json={"firm_id": actor.firm_id}
        )
        await api.call("POST", f"{base}/invitations/{invitation['id']}:accept", actor=actor)
    for park in scenario.parks:
        created = await api.call(
            "POST",
            f"{base}/parks",
            actor=operator,
            json={
                "name": park.name,
                "region": park.region,
                "city": park.city,
                "capacity": park.capacity,
            },
        )
        for key in park.located:
            await api.call(
                "PATCH",
                f"{base}/members/{actors[key].firm_id}",
                actor=actors[key],
                json={"park_id": created["id"]},
            )
    for a, b, messages in scenario.conversations:
        await _converse(api, sim, actors[a], actors[b], messages)
    for number, task in enumerate(scenario.tasks):
        await _trade(api, sim, task, number)
    if scenario.history:
        # The import checks the firms against metrics' own view of the membership.
        await _members_known(api, sim)
        lines = [
            {
                "firm_a": actors[r.a].firm_id,
                "firm_b": actors[r.b].firm_id,
                "kind": r.kind,
                "weight": r.weight,
                "date": _day(r.age_days),
                "external_id": f"{scenario.key}-{i}",
            }
            for i, r in enumerate(scenario.history)
        ]
        await api.call("POST", f"{base}/history", actor=operator, json=lines, lagging=(404,))
    if scenario.publish_to_members:
        await api.call(
            "PUT",
            f"{base}/metrics-visibility",
            actor=operator,
            json={"members": True},
            lagging=(404,),
        )
    return sim


async def _converse(api: Api, sim: SimulatedCluster, a: Actor, b: Actor, messages: int) -> None:
    """A direct conversation between two firms' owners, taking turns."""
    lag = (403, 404)
    channel = await api.call(
        "POST",
        "/v1/conversations",
        actor=a,
        json={"cluster_id": sim.cluster_id, "user_ids": [b.user_id]},
        lagging=lag,
    )
    for i in range(messages):
        sender = a if i % 2 == 0 else b
        await api.call(
            "POST",
            f"/v1/channels/{channel['id']}/messages",
            actor=sender,
            json={
                "text": f"Message {i + 1} about our joint work",
                "client_message_id": f"{channel['id']}-{i}",
            },
            lagging=lag,
        )


async def _trade(api: Api, sim: SimulatedCluster, spec: TaskSpec, number: int) -> None:
    """A task from publication to accepted answers (and completion)."""
    lag = (403, 404)
    requester = sim.actors[spec.requester]
    reward = 2
    total = spec.items * len(spec.vendors)
    await api.call(
        "POST",
        "/v1/ledger/grants",
        actor=sim.operator,
        json={"cluster_id": sim.cluster_id, "firm_id": requester.firm_id, "amount": reward * total},
        lagging=lag,
    )
    task = await api.call(
        "POST",
        "/v1/tasks",
        actor=requester,
        json={
            "cluster_id": sim.cluster_id,
            "title": f"{sim.scenario.name}: batch {number + 1}",
            "instructions": "Pick the label that fits the record.",
            "kind": "single_label",
            "label_schema": {"labels": LABELS},
            "reward_per_annotation": reward,
            "overlap": 1,
            "lease_seconds": 3600,
            "allocation": spec.allocation,
        },
        lagging=lag,
    )
    path = f"/v1/tasks/{task['id']}"
    items = [{"input": {"text": f"record {number}-{i}"}} for i in range(total)]
    await api.call("POST", f"{path}/items", actor=requester, json=items)
    await api.call("POST", f"{path}:publish", actor=requester)
    vendors = [sim.actors[v] for v in spec.vendors]
    if spec.allocation == "contracted":
        for vendor in vendors:
            bid = await api.call(
                "POST",
                f"{path}/bids",
                actor=vendor,
                json={"price_per_annotation": reward, "daily_capacity": 1000},
                lagging=lag,
            )
            await api.call(
                "POST",
                f"{path}/bids/{bid['id']}:award",
                actor=requester,
                json={"quota": spec.items},
            )
    for i, vendor in enumerate(vendors):
        leases: list[str] = []
        while len(leases) < spec.items:
            claimed = await api.call(
                "POST",
                f"{path}/assignments:claim",
                actor=vendor,
                json={"count": spec.items - len(leases)},
                lagging=lag,
            )
            got = [a["assignment_id"] for a in claimed["assignments"]]
            if not got:
                raise SimulationError(f"{vendor.key} found nothing to claim on {task['id']}")
            leases += got
        answers = [
            {"assignment_id": a, "answer": {"label": LABELS[(i + j) % len(LABELS)]}}
            for j, a in enumerate(leases)
        ]
        await api.call(
            "POST", f"{path}/assignments:submit", actor=vendor, json={"answers": answers}
        )
        await api.call(
            "POST", f"{path}/submissions:accept", actor=requester, json={"assignment_ids": leases}
        )
    if spec.complete:
        await api.call("POST", f"{path}:complete", actor=requester)


async def _members_known(api: Api, sim: SimulatedCluster) -> None:
    deadline = time.monotonic() + api.patience
    while True:
        body = await api.call(
            "GET", f"/v1/clusters/{sim.cluster_id}/indicators", actor=sim.operator, lagging=(404,)
        )
        if body["evidence"]["members"] == len(sim.scenario.firms):
            return
        if time.monotonic() > deadline:
            raise SimulationError(f"metrics does not know the members of {sim.scenario.key}")
        await asyncio.sleep(0.1)


async def wait_for_metrics(api: Api, sim: SimulatedCluster, patience: float = 60.0) -> None:
    """Poll the metrics API until it shows the scenario's members, accepted annotations
    and conversation messages (the services apply each other's events asynchronously)."""
    base = f"/v1/clusters/{sim.cluster_id}"
    deadline = time.monotonic() + patience
    scenario = sim.scenario
    while True:
        body = await api.call("GET", f"{base}/indicators", actor=sim.operator, lagging=(403, 404))
        volume = next(i["value"] for i in body["indicators"] if i["key"] == "annotation_volume")
        network = await api.call("GET", f"{base}/network", actor=sim.operator)
        messages = sum(e["messages"] for e in network["edges"])
        if (
            body["evidence"]["members"] == len(scenario.firms)
            and volume >= scenario.accepted_annotations
            and messages >= scenario.messages
        ):
            return
        if time.monotonic() > deadline:
            raise SimulationError(f"metrics of {scenario.key} did not catch up in {patience} s")
        await asyncio.sleep(0.2)


async def run(
    client: httpx.AsyncClient,
    keys: list[str] | None = None,
    *,
    redirect_uri: str,
    tag: str | None = None,
) -> dict[str, SimulatedCluster]:
    """Every scenario asked for (all by default), each waited for in the metrics API."""
    api = Api(client, redirect_uri=redirect_uri)
    tag = tag or f"sim-{secrets.token_hex(3)}"
    out: dict[str, SimulatedCluster] = {}
    for key in keys or list(SCENARIOS):
        out[key] = await simulate(api, SCENARIOS[key], tag)
    for sim in out.values():
        await wait_for_metrics(api, sim)
    return out
