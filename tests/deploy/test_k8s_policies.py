"""Policies every rendered overlay must keep (docs/deploy.md): restricted pods,
probes on numeric ports, resources, graceful termination longer than the
drain, spread and disruption budgets, one ServiceAccount each, recommended
labels, headless internal Services that the dns:/// round_robin clients name,
a CronJob with concurrencyPolicy Forbid for every scheduled command of
docs/operations.md, and the migration Job ahead of the rollout."""

from __future__ import annotations

import re

import pytest

from servicekit.migrations import SERVICES, TOP_LEVEL_OWNERS
from servicekit.server import TASK_STOP_SECONDS

from .manifests import ROOT, WORKLOADS, Obj, Render, containers, overlays, pod_spec

RENDERS = overlays()
IDS = [r.name for r in RENDERS]
PLATFORM = ("gateway", "member", "tiering", "engagement", "rewards", "guides")
SERVICE_NAMES = ("member", "tiering", "engagement", "rewards", "guides")
RECOMMENDED = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)


def platform_workloads(render: Render) -> list[Obj]:
    """The image's workloads (the dev datastores are third-party images)."""
    return [
        o
        for o in render.of_kind(*WORKLOADS)
        if any(str(c["image"]).startswith("loyalty-platform") for c in containers(o))
    ]


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_every_pod_meets_the_restricted_pod_security_standard(render: Render) -> None:
    workloads = render.of_kind(*WORKLOADS)
    assert len(workloads) >= 14
    for obj in workloads:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] >= 10000, where
        assert isinstance(pod["runAsGroup"], int), where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        tmp = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc.get("privileged", False) is False, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if obj in platform_workloads(render):
                assert mounts.get("/tmp") in tmp, f"{where}: /tmp must be an emptyDir"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_deployments_probe_numeric_ports_and_drain_before_they_are_killed(render: Render) -> None:
    config = {**render.get("ConfigMap", "loyalty-services")["data"]}
    drain = float(config["SHUTDOWN_DELAY_SECONDS"]) + float(config["SHUTDOWN_GRACE_SECONDS"])
    deployments = {d["metadata"]["name"]: d for d in render.of_kind("Deployment")}
    assert set(PLATFORM) <= set(deployments)
    for name in PLATFORM:
        spec = pod_spec(deployments[name])
        (c,) = spec["containers"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            p = c[probe]
            port = p["grpc"]["port"] if "grpc" in p else p["httpGet"]["port"]
            assert isinstance(port, int), f"{name} {probe}: a named port"
        if name == "gateway":
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        else:
            assert "grpc" in c["readinessProbe"] and "grpc" in c["livenessProbe"]
            # Liveness never follows dependencies (servicekit.server.LIVENESS).
            assert c["livenessProbe"]["grpc"]["service"] == "liveness"
            assert "service" not in c["readinessProbe"]["grpc"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["grpc"] == int(config["GRPC_PORT"])
            assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == 9464, name
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= 3, name
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > pre_stop + drain + TASK_STOP_SECONDS, name


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_each_deployment_has_spread_a_budget_and_its_own_service_account(render: Render) -> None:
    pdbs = render.of_kind("PodDisruptionBudget")
    accounts = {sa["metadata"]["name"]: sa for sa in render.of_kind("ServiceAccount")}
    used = []
    for d in render.of_kind("Deployment", "StatefulSet"):
        name = d["metadata"]["name"]
        match = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert match.items() <= labels.items(), name
        spec = pod_spec(d)
        if d["kind"] == "Deployment":
            keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
            assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
            covering = [p for p in pdbs if p["spec"]["selector"]["matchLabels"] == match]
            assert len(covering) == 1, f"{name}: one PodDisruptionBudget"
            assert covering[0]["spec"].get("maxUnavailable") == 1, name
        sa = spec["serviceAccountName"]
        assert sa in accounts, name
        assert accounts[sa]["automountServiceAccountToken"] is False
        used.append(sa)
    assert len(used) == len(set(used)), "a ServiceAccount per workload"


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_platform_objects_carry_the_recommended_labels(render: Render) -> None:
    for obj in platform_workloads(render):
        for labels in (obj["metadata"]["labels"], pod_labels(obj)):
            missing = [k for k in RECOMMENDED if k not in labels]
            assert not missing, f"{obj['kind']}/{obj['metadata']['name']}: {missing}"


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


DNS_TARGET = re.compile(r"^dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)$")


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_internal_services_are_headless_and_every_client_dials_them_by_dns(
    render: Render,
) -> None:
    services = {s["metadata"]["name"]: s for s in render.of_kind("Service")}
    for name in SERVICE_NAMES:
        spec = services[name]["spec"]
        assert spec["clusterIP"] == "None", f"{name}: headless, so clients see every pod"
        assert [p["name"] for p in spec["ports"]] == ["grpc"]
    gateway = services["gateway"]["spec"]
    assert gateway.get("clusterIP") != "None"
    assert {p["name"] for p in gateway["ports"]} == {"http", "pos-grpc"}
    addresses = {
        (cm["metadata"]["name"], key): value
        for cm in render.of_kind("ConfigMap")
        for key, value in (cm.get("data") or {}).items()
        if key.endswith("_ADDR")
    }
    # The gateway reaches all five; engagement and guides reach member and
    # rewards; rewards reaches member.
    assert len(addresses) == 10, addresses
    for (cm, key), value in addresses.items():
        m = DNS_TARGET.match(value)
        assert m, f"{cm} {key}={value}: not a dns:/// target"
        service, namespace, port = m.group(1), m.group(2), int(m.group(3))
        assert service == key.removesuffix("_ADDR").lower(), f"{cm} {key}"
        assert namespace == services[service]["metadata"]["namespace"], f"{cm} {key}"
        assert port in [p["port"] for p in services[service]["spec"]["ports"]], f"{cm} {key}"


def scheduled_commands() -> list[tuple[str, str]]:
    """(module, command) of every row of docs/operations.md's scheduled jobs table."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Scheduled jobs and commands", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^\| `python -m (services\.\w+) ([a-z-]+)", section, re.MULTILINE)
    assert len(found) >= 8, found
    return found


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_every_scheduled_command_has_a_cronjob_that_never_overlaps(render: Render) -> None:
    cronjobs = render.of_kind("CronJob")
    runs: dict[tuple[str, str], Obj] = {}
    for cj in cronjobs:
        (c,) = containers(cj)
        runs[(c["args"][0], c["args"][1])] = cj
        spec = cj["spec"]
        name = cj["metadata"]["name"]
        assert spec["concurrencyPolicy"] == "Forbid", name
        assert spec["timeZone"] == "Asia/Shanghai", name
        assert spec["startingDeadlineSeconds"] > 0, name
        assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
        job = spec["jobTemplate"]["spec"]
        assert job["activeDeadlineSeconds"] > 0, name
        assert "backoffLimit" in job, name
        assert pod_spec(cj)["restartPolicy"] == "Never", name
    missing = [cmd for cmd in scheduled_commands() if cmd not in runs]
    assert not missing, f"scheduled commands without a CronJob: {missing}"


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_one_migration_job_migrates_every_schema_in_order_before_the_rollout(
    render: Render,
) -> None:
    (job,) = [j for j in render.of_kind("Job")]
    annotations = job["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] == "PreSync"
    order = [c["args"] for c in containers(job)]
    expected = [[s if s in TOP_LEVEL_OWNERS else f"services.{s}", "migrate"] for s in SERVICES]
    assert order == expected


def test_production_generates_no_secret_and_dev_generates_every_key() -> None:
    dev, production = RENDERS[0], RENDERS[1]
    assert not production.of_kind("Secret")
    (secret,) = dev.of_kind("Secret")
    keys = set(secret["data"])
    for obj in dev.of_kind(*WORKLOADS):
        for c in containers(obj):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in keys, ref


def callers(render: Render) -> dict[str, set[str]]:
    """Service -> the processes that dial it, read from the *_ADDR settings
    each process's ConfigMaps give it."""
    out: dict[str, set[str]] = {s: set() for s in SERVICE_NAMES}
    for d in render.of_kind("Deployment"):
        (c,) = containers(d)
        for src in c.get("envFrom", []):
            cm = render.get("ConfigMap", src["configMapRef"]["name"])
            for key in cm.get("data") or {}:
                if key.endswith("_ADDR"):
                    out[key.removesuffix("_ADDR").lower()].add(d["metadata"]["name"])
    return out


def test_network_policies_deny_by_default_and_admit_only_each_services_callers() -> None:
    render = RENDERS[1]  # production has the component
    policies = render.of_kind("NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in deny)
    expected = callers(render)
    assert expected["member"] == {"gateway", "engagement", "guides", "rewards"}, expected
    for service, who in expected.items():
        admitted: set[str] = set()
        for p in policies:
            sel = p["spec"]["podSelector"]
            names = set(sel.get("matchLabels", {}).values()) | {
                v for e in sel.get("matchExpressions", []) for v in e["values"]
            }
            if service not in names:
                continue
            for rule in p["spec"].get("ingress", []):
                if 50051 not in [port["port"] for port in rule.get("ports", [])]:
                    continue
                assert "from" in rule, f"{p['metadata']['name']}: {service} open to all"
                for peer in rule["from"]:
                    admitted.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
        assert admitted == who, f"{service}: admits {admitted}, called by {who}"
    # Only the gateway is open to everyone.
    open_to_all = {
        p["metadata"]["name"]
        for p in policies
        for rule in p["spec"].get("ingress", [])
        if "from" not in rule
    }
    assert open_to_all == {"gateway-ingress"}
