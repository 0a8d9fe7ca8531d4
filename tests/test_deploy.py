"""The deployment, checked offline: image, docker-compose, Kubernetes, edge routing, alerts.

There is no container engine or cluster here, so every check is on the files: the
compose file against the compose specification, both kustomize overlays rendered and
validated against the Kubernetes schemas of a pinned version in strict mode, a policy
checker over the rendered objects, and the routing of every gateway route through the
nginx edge and the Ingress to the service that serves it.

``kubectl`` (for ``kubectl kustomize``) and ``checkov`` are tools of the run, installed by
``.ci/run``; on a machine without them these tests are skipped, and under CI they fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.gateway import create_gateway, service_factories
from services.kit.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.32.0"
OVERLAYS = ("dev", "prod")
SERVICES = tuple(service_factories())
# Names the containers read that are not platform settings.
NON_SETTINGS_ENV = {"SERVICE", "PORT", "FORWARDED_ALLOW_IPS"}
UVICORN_GRACEFUL_SHUTDOWN = 20  # api/cli.py: timeout_graceful_shutdown


def tool(name: str) -> str:
    found = shutil.which(name) or (
        str(Path.home() / ".local/bin" / name)
        if (Path.home() / ".local/bin" / name).exists()
        else None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed")
    return found


def setting_env_names() -> set[str]:
    return {f"ONECLUSTER_{name.upper()}" for name in Settings.model_fields} | {
        "ONECLUSTER_SECRETS_DIR"
    }


# -- routes -----------------------------------------------------------------------------
@cache
def gateway_routes() -> dict[str, str]:
    """Every path the gateway serves (OpenAPI), with the service that serves it."""
    gateway = create_gateway(Settings(data_dir=Path("/nonexistent")))
    owners: dict[str, str] = {}
    for name, app in gateway.apps.items():
        for path in app.openapi()["paths"]:
            if path not in ("/healthz", "/readyz"):
                owners.setdefault(path, name)
    assert owners
    return owners


def sample(path: str) -> str:
    """A concrete request path for a path template (``{id}`` → an id-shaped value)."""
    return re.sub(r"\{[^}]+\}", "abc_01JB6X0000000000000000000", path)


# -- nginx edge -------------------------------------------------------------------------
@cache
def nginx_locations() -> list[tuple[str, str, str]]:
    """(modifier, pattern, upstream) for each ``location`` of the edge's nginx.conf."""
    text = (ROOT / "infra/nginx/nginx.conf").read_text()
    text = re.sub(r"#[^\n]*", "", text)
    found = []
    for modifier, pattern, body in re.findall(
        r"location\s+(=|\^~|~\*|~)?\s*(\S+)\s*\{([^}]*)\}", text
    ):
        upstream = re.search(r"proxy_pass\s+https?://([\w-]+)", body)
        found.append((modifier, pattern, upstream.group(1) if upstream else ""))
    return found


def nginx_route(path: str) -> str | None:
    """The upstream nginx picks for ``path``: exact, then regex unless the longest
    prefix is ``^~``, then the longest prefix (nginx's documented order)."""
    locations = nginx_locations()
    for modifier, pattern, upstream in locations:
        if modifier == "=" and pattern == path:
            return upstream
    prefixes = [
        (pattern, modifier, upstream)
        for modifier, pattern, upstream in locations
        if modifier in ("", "^~") and path.startswith(pattern)
    ]
    longest = max(prefixes, key=lambda p: len(p[0]), default=None)
    if longest is None or longest[1] != "^~":
        for modifier, pattern, upstream in locations:
            flags = re.IGNORECASE if modifier == "~*" else 0
            if modifier in ("~", "~*") and re.search(pattern, path, flags):
                return upstream
    return longest[2] if longest else None


def test_the_edge_routes_every_gateway_route_to_its_service() -> None:
    wrong = {
        path: (nginx_route(sample(path)), owner)
        for path, owner in gateway_routes().items()
        if nginx_route(sample(path)) != owner
    }
    assert not wrong, f"path → (nginx upstream, serving service): {wrong}"
    conf = (ROOT / "infra/nginx/nginx.conf").read_text()
    upstreams = set(re.findall(r"upstream\s+([\w-]+)", conf))
    assert upstreams == set(SERVICES)
    # The WebSocket endpoint is not in OpenAPI: routed by hand, upgraded, kept open.
    if "messaging" in SERVICES:
        assert nginx_route("/v1/ws") == "messaging"
        assert "proxy_http_version 1.1;" in conf
        assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", conf)
        assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", conf)
        ws = re.search(r"location = /v1/ws \{(.*?)\}", conf, re.S)
        assert ws and int(re.findall(r"proxy_read_timeout (\d+)s;", ws.group(1))[0]) >= 3600


def test_the_nginx_route_emulation_follows_nginx_precedence() -> None:
    # The regex for a firm's reputation beats the plain /v1/firms prefix; the prefix
    # still wins for the firm itself.
    assert nginx_route("/v1/firms/abc/reputation") == "marketplace"
    assert nginx_route("/v1/firms/abc") == "membership"
    assert nginx_route("/nowhere") is None


# -- Kubernetes -------------------------------------------------------------------------
@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = tool("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s/overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_kubernetes(overlay: str) -> None:
    import kubernetes_validate

    docs = rendered(overlay)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {"onecluster" if overlay == "prod" else "onecluster-dev"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_the_objects_operators_expect(overlay: str) -> None:
    deployments = objects(overlay, "Deployment")
    assert set(deployments) == set(SERVICES)
    services = objects(overlay, "Service")
    hpas = objects(overlay, "HorizontalPodAutoscaler")
    pdbs = objects(overlay, "PodDisruptionBudget")
    accounts = objects(overlay, "ServiceAccount")
    jobs = objects(overlay, "Job")
    for name, deployment in deployments.items():
        assert name in services and name in pdbs and name in accounts, name
        assert hpas[name]["apiVersion"] == "autoscaling/v2"
        assert hpas[name]["spec"]["scaleTargetRef"]["name"] == name
        assert f"migrate-{name}" in jobs
        job = jobs[f"migrate-{name}"]["spec"]["template"]["spec"]["containers"][0]
        assert job["command"] == ["onecluster", "migrate", name]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert {"name": "SERVICE", "value": name} in container["env"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["requests"]["memory"]
        # Liveness never depends on the database; readiness does.
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + UVICORN_GRACEFUL_SHUTDOWN
    if overlay == "prod":
        assert all(d["spec"]["replicas"] >= 2 for d in deployments.values())
        assert all(h["spec"]["minReplicas"] >= 2 for h in hpas.values())
        assert not objects(overlay, "StatefulSet"), "prod uses managed datastores"
        assert objects(overlay, "Ingress")["onecluster"]["spec"]["tls"]
    else:
        assert all(d["spec"]["replicas"] == 1 for d in deployments.values())
        assert set(objects(overlay, "StatefulSet")) == {"postgres", "redis"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_committed(overlay: str) -> None:
    assert not objects(overlay, "Secret")
    text = json.dumps(rendered(overlay))
    assert "postgresql://" not in text and "redis://" not in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # Nothing else opens ingress to every pod, or egress to everywhere on every port.
    for name, policy in policies.items():
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{name} admits every source"
        for rule in policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{name} opens every port"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_are_settings_the_code_reads(overlay: str) -> None:
    known = setting_env_names() | NON_SETTINGS_ENV
    config = objects(overlay, "ConfigMap")["onecluster-config"]["data"]
    unknown = set(config) - known
    for kind in ("Deployment", "Job"):
        for obj in objects(overlay, kind).values():
            pod = obj["spec"]["template"]["spec"]
            for container in pod["containers"]:
                if container["image"].startswith("onecluster"):
                    unknown |= {e["name"] for e in container.get("env", [])} - known
            for volume in pod.get("volumes", []):
                if volume.get("secret", {}).get("secretName") == "onecluster-secrets":
                    unknown |= {i["path"] for i in volume["secret"]["items"]} - known
    assert not unknown


def ingress_route(overlay: str, path: str) -> str | None:
    """The backend ingress-nginx picks with ``use-regex``: every path is a
    case-insensitive regex anchored at the start, tried longest first."""
    ingress = objects(overlay, "Ingress")["onecluster"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/use-regex"] == "true"
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for entry in sorted(paths, key=lambda p: len(p["path"]), reverse=True):
        if re.match(entry["path"], path, re.IGNORECASE):
            return str(entry["backend"]["service"]["name"])
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_routes_every_gateway_route_to_its_service(overlay: str) -> None:
    wrong = {
        path: (ingress_route(overlay, sample(path)), owner)
        for path, owner in gateway_routes().items()
        if ingress_route(overlay, sample(path)) != owner
    }
    assert not wrong, f"path → (ingress backend, serving service): {wrong}"
    if "messaging" in SERVICES:
        assert ingress_route(overlay, "/v1/ws") == "messaging"
    annotations = objects(overlay, "Ingress")["onecluster"]["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600


def test_the_policy_checker_finds_nothing(tmp_path: Path) -> None:
    checkov = tool("checkov")
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered(overlay)))
    result = subprocess.run(
        [checkov, "--config-file", str(ROOT / "k8s/.checkov.yaml"), "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", result.stdout)


# -- docker-compose ---------------------------------------------------------------------
def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME-default}``."""

    def value(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:-|-)([^}]*))?\}", value, text)


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it: interpolated, merge keys resolved."""
    loaded: dict[str, Any] = yaml.safe_load(
        interpolate((ROOT / "docker-compose.yml").read_text(), {})
    )
    return loaded


def test_compose_file_follows_the_compose_specification() -> None:
    from compose_spec import PyCompose

    parsed = PyCompose.from_yaml(yaml.safe_dump(compose()))
    names = set(parsed.service_names())
    assert {"postgres", "redis", "edge"} <= names
    for service in SERVICES:
        assert {service, f"migrate-{service}"} <= names
    # The parser holds the file to the specification: unknown keys and wrong types fail.
    for path, bad in ((("edge", "bogus_key"), 1), (("edge", "depends_on"), 5)):
        broken = copy.deepcopy(compose())  # compose() is cached: never change it
        broken["services"][path[0]][path[1]] = bad
        with pytest.raises(ValueError, match=path[1]):
            PyCompose.from_yaml(yaml.safe_dump(broken))


def test_compose_starts_things_in_order_and_checks_their_health() -> None:
    services = compose()["services"]
    for name in ("postgres", "redis", "edge", *SERVICES):
        assert services[name].get("healthcheck"), name
    for service in SERVICES:
        migrate = services[f"migrate-{service}"]
        assert migrate["entrypoint"] == ["onecluster", "migrate", service]
        assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
        waits = services[service]["depends_on"]
        assert waits["postgres"]["condition"] == "service_healthy"
        assert waits["redis"]["condition"] == "service_healthy"
        assert waits[f"migrate-{service}"]["condition"] == "service_completed_successfully"
        assert services[service]["environment"]["SERVICE"] == service
        assert services[service]["environment"]["ONECLUSTER_AUTO_MIGRATE"] == "false"
        assert services["edge"]["depends_on"][service]["condition"] == "service_healthy"
    assert services["onecluster"]["profiles"] == ["all-in-one"]
    assert services["onecluster"]["environment"]["SERVICE"] == "all"


def test_compose_environment_names_are_settings_the_code_reads() -> None:
    known = setting_env_names() | NON_SETTINGS_ENV
    for name, service in compose()["services"].items():
        image = str(service.get("image", ""))
        if image.startswith("onecluster"):
            unknown = set(service.get("environment", {})) - known
            assert not unknown, f"{name}: {unknown}"


# -- image ------------------------------------------------------------------------------
def test_the_image_runs_the_cli_as_an_unprivileged_user() -> None:
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", dockerfile, re.MULTILINE)
    assert stages == ["build", "runtime"]
    runtime = dockerfile.split("AS runtime", 1)[1]
    user = re.search(r"^USER\s+(\d+)", runtime, re.MULTILINE)
    assert user and int(user.group(1)) >= 10000
    assert "uv sync --frozen --no-dev" in dockerfile
    assert re.search(r'^ENTRYPOINT .*onecluster serve \\"\$SERVICE\\"', runtime, re.MULTILINE)
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored[0] == "*" and "!services/" in ignored and "!tests/" not in ignored


def test_the_image_is_pinned_and_carries_no_secrets() -> None:
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, re.MULTILINE))
    for image in re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        # a version tag (python:3.11-slim-bookworm) or a digest; never bare or latest
        assert re.search(r":\d+(\.\d+)+[\w.-]*$|@sha256:[0-9a-f]{64}$", image), image
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["UV_VERSION"])
    # nothing secret is baked in: no credentials in ENV/ARG, no env files or keys copied
    baked = re.findall(r"^(?:ENV|ARG)\s+(.*(?:\n\s+.*)*)", dockerfile, re.MULTILINE)
    names = re.findall(r"([A-Z_][A-Z0-9_]*)=", "\n".join(baked))
    assert names and not [n for n in names if re.search("SECRET|PASSWORD|TOKEN|_KEY$", n)]
    copied = re.findall(r"^COPY\s+(?!--from)(.*)$", dockerfile, re.MULTILINE)
    assert not [c for c in copied if re.search(r"\.env|\.pem|id_rsa|secret", c)], copied


# -- observability ----------------------------------------------------------------------
def exported_metrics() -> set[str]:
    from prometheus_client import REGISTRY

    create_gateway(Settings(data_dir=Path("/nonexistent")))  # every service's metrics

    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
    }
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


def used_metrics(expr: str) -> set[str]:
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b\s*(?:\{|\[|\))", expr))
    functions = {
        "rate", "sum", "max", "increase", "histogram_quantile", "by", "le",
    }  # fmt: skip
    return {w for w in words if w not in functions and "_" in w}


def test_alert_rules_and_dashboard_use_metrics_that_exist() -> None:
    exported = exported_metrics() | {"up", "kube_pod_status_ready"}
    rules = yaml.safe_load((ROOT / "infra/prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"OneClusterHighErrorRate", "OneClusterOutboxStuck", "OneClusterConsumerLag"} <= alerts
    dashboard = json.loads((ROOT / "infra/grafana/onecluster-dashboard.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(used_metrics(e) for e in exprs))
    assert used, "no metric found in the expressions"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"
    scrape = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    targets = {
        t.split(":")[0]
        for job in scrape["scrape_configs"]
        for group in job["static_configs"]
        for t in group["targets"]
    }
    assert targets == set(SERVICES)


# -- operator guide ---------------------------------------------------------------------
def test_the_operator_guide_lists_every_setting() -> None:
    guide = (ROOT / "OPERATIONS.md").read_text()
    missing = {name for name in setting_env_names() if f"`{name}`" not in guide}
    assert not missing, f"OPERATIONS.md does not list {sorted(missing)}"
