"""What the manifests hand to the processes is what the processes read: every
environment variable a container gets (env, and each key of the ConfigMaps it
takes with envFrom) is a settings field of that process (a typo would be
silently ignored: pydantic-settings drops unknown names), every secret a
process needs comes from the Secret, and every command a manifest runs exists
(`python -m <module> <command> --help` answers)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic_settings import BaseSettings

from console.settings import ConsoleSettings
from gateway.settings import GatewaySettings
from servicekit.settings import ServiceSettings
from services.engagement.settings import EngagementSettings
from services.guides.settings import GuidesSettings
from services.member.settings import MemberSettings
from services.rewards.server import RewardsSettings
from services.tiering.cli import _parser as tiering_parser

from .manifests import ROOT, WORKLOADS, Obj, Render, containers, overlays

RENDERS = overlays()
IDS = [r.name for r in RENDERS]

# The settings classes each entry module reads (its __main__ and commands).
SETTINGS: dict[str, tuple[type[BaseSettings], ...]] = {
    "gateway": (GatewaySettings,),
    "console": (ConsoleSettings,),
    "services.member": (MemberSettings,),
    "services.tiering": (ServiceSettings,),
    "services.engagement": (EngagementSettings,),
    "services.rewards": (ServiceSettings, RewardsSettings),
    "services.guides": (GuidesSettings,),
}
# Read by the OpenTelemetry SDK itself (the otel component sets them).
OTEL_STANDARD = {
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
}
# Secrets each process cannot run without in production (the development
# defaults of these are refused or unsafe there): docs/deploy.md, Secrets.
REQUIRED_SECRETS = {
    "gateway": {"DATABASE_URL", "REDIS_URL", "AUTH_SECRET_KEY"},
    # The console's gateway keys (one client per role, docs/console.md).
    "console": {"DATABASE_URL", "REDIS_URL", "CONSOLE_GATEWAY_CLIENTS"},
    "services.member": {"DATABASE_URL", "REDIS_URL", "PII_KEY", "MEMBER_CODE_SECRET"},
    "services.tiering": {"DATABASE_URL", "REDIS_URL"},
    "services.engagement": {"DATABASE_URL", "REDIS_URL"},
    "services.rewards": {"DATABASE_URL", "REDIS_URL"},
    "services.guides": {
        "DATABASE_URL",
        "REDIS_URL",
        *("WECOM_CORP_ID", "WECOM_SECRET", "WECOM_API_BASE"),
        *("WECOM_CALLBACK_TOKEN", "WECOM_ENCODING_AES_KEY"),
        *("GUIDE_LINK_SECRET", "WORKSTATION_SECRET"),
    },
}
SECRET_KEYS = {
    "DATABASE_URL",
    "REDIS_URL",
    "PII_KEY",
    "PII_ENCRYPTION_KEYS",
    "MEMBER_CODE_SECRET",
    "AUTH_SECRET_KEY",
    "CONSOLE_GATEWAY_CLIENTS",
    # The WeCom app (docs/guides.md): required by the guides Deployment, optional in its CronJobs.
    "WECOM_CORP_ID",
    "WECOM_SECRET",
    "WECOM_API_BASE",
    # Engagement's channel credentials and the gateway's SMS report token
    # (docs/journeys.md, Channels): optional, a brand configures the channels it uses.
    "WECHAT_APP_SECRET",
    "WECOM_CORP_SECRET",
    "SMS_ACCESS_KEY_ID",
    "SMS_ACCESS_KEY_SECRET",
    "APP_PUSH_TOKEN",
    "SMS_RECEIPT_TOKEN",
    # The guides service's WeCom callback key and its own HMAC keys.
    "WECOM_CALLBACK_TOKEN",
    "WECOM_ENCODING_AES_KEY",
    "GUIDE_LINK_SECRET",
    "WORKSTATION_SECRET",
}
# References that may be absent from the Secret (where a process does not require them).
OPTIONAL_SECRETS = {
    "PII_ENCRYPTION_KEYS",
    "WECHAT_APP_SECRET",
    "WECOM_CORP_ID",
    "WECOM_CORP_SECRET",
    "SMS_ACCESS_KEY_ID",
    "SMS_ACCESS_KEY_SECRET",
    "APP_PUSH_TOKEN",
    "SMS_RECEIPT_TOKEN",
}


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix") or "")
    # A field with a validation alias is read under that name, without the prefix.
    return {
        (f.validation_alias if isinstance(f.validation_alias, str) else f"{prefix}{name}").upper()
        for name, f in cls.model_fields.items()
    }


def container_env(render: Render, c: Obj) -> dict[str, str]:
    """Name -> where it comes from, for everything a container's environment gets."""
    out: dict[str, str] = {}
    for src in c.get("envFrom", []):
        cm = render.get("ConfigMap", src["configMapRef"]["name"])
        for key in cm.get("data") or {}:
            out[key] = f"ConfigMap {cm['metadata']['name']}"
    for env in c.get("env", []):
        out[env["name"]] = "env"
    return out


def platform_containers(render: Render) -> list[tuple[str, Obj]]:
    found = []
    for obj in render.of_kind(*WORKLOADS):
        for c in containers(obj):
            if str(c["image"]).startswith("loyalty-platform"):
                found.append((f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c))
    return found


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_every_variable_a_container_gets_is_a_setting_it_reads(render: Render) -> None:
    checked = 0
    for where, c in platform_containers(render):
        module = c["args"][0]
        known = set().union(*(env_names(cls) for cls in SETTINGS[module])) | OTEL_STANDARD
        for name, source in container_env(render, c).items():
            assert name in known, f"{where}: {name} ({source}) is no setting of {module}"
            checked += 1
    assert checked > 100


def test_a_misspelt_variable_would_be_caught() -> None:
    known = env_names(ServiceSettings)
    assert "SHUTDOWN_GRACE_SECONDS" in known
    assert "SHUTDOWN_GRACE_SECOND" not in known
    assert "REWARDS_HOLD_TTL_SECONDS" in env_names(RewardsSettings)


@pytest.mark.parametrize("render", RENDERS, ids=IDS)
def test_every_serving_process_gets_its_secrets_from_the_secret(render: Render) -> None:
    for d in render.of_kind("Deployment"):
        (c,) = c_list = list(containers(d))
        assert c_list
        module = c["args"][0]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        missing = REQUIRED_SECRETS[module] - set(refs)
        assert not missing, f"{d['metadata']['name']}: {missing}"
        for name, ref in refs.items():
            assert ref["name"].startswith("loyalty-secrets"), name
            assert ref["key"] == name and name in SECRET_KEYS, name
            # Optional unless this process needs it (guides needs the WeCom app
            # that engagement's channels may do without).
            optional = name in OPTIONAL_SECRETS and name not in REQUIRED_SECRETS[module]
            assert ref.get("optional", False) is optional, name
        # Secrets never travel through a ConfigMap.
        assert not SECRET_KEYS & {
            k for k, src in container_env(render, c).items() if src.startswith("ConfigMap")
        }


def commands() -> list[list[str]]:
    seen: dict[str, list[str]] = {}
    for render in RENDERS:
        for _, c in platform_containers(render):
            seen.setdefault(" ".join(c["args"]), list(c["args"]))
    return sorted(seen.values())


def test_the_manifests_run_a_dozen_distinct_commands() -> None:
    assert len(commands()) >= 14


@pytest.mark.parametrize("args", commands(), ids=lambda a: " ".join(a))
def test_every_command_a_manifest_runs_exists(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    assert "usage" in done.stdout.lower(), done.stdout
    if args[0] == "services.tiering" and args[1:2] in (["recompute"], ["report"]):
        # Its options are parsed too (argparse stops at --help without checking them).
        tiering_parser().parse_args(args[1:])
