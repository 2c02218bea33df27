"""The rendered manifests and the Containerfile through the standard offline
validators, at pinned versions: kubernetes-validate --strict against the
schemas of the oldest and the newest Kubernetes the manifests support, checkov
(kubernetes and dockerfile) with a short skip list saying why each is skipped,
and hadolint. Each validator is also shown to fail on a known mistake, so a
pass means something."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from .manifests import BIN, ROOT, every_combination, overlays

# The manifests use native gRPC probes (1.27), CronJob timeZone (1.27) and the
# preStop sleep action (on by default from 1.30).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources kubernetes-validate has no schema for (components/monitoring).
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule"}

CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
CHECKOV_K8S_SKIPS = {
    # Release tags are set per overlay (`kustomize edit set image ...@sha256:`,
    # docs/deploy.md); the base cannot know the digest of a future build.
    "CKV_K8S_43": "image digest is set at release time, not in the base",
    # With a tag or digest fixed per release, Always only adds a registry round
    # trip to every pod start (and makes restarts fail while the registry is down).
    "CKV_K8S_15": "imagePullPolicy IfNotPresent with immutable release tags",
    # pydantic-settings reads the environment; each pod gets only the keys it
    # needs through secretKeyRef, never the whole Secret (test_settings_and_commands).
    "CKV_K8S_35": "secrets as env vars from secretKeyRef, key by key",
}
CHECKOV_DOCKERFILE_SKIPS = {
    # FROM ${BASE_IMAGE}: the default is pinned (python:3.11.x-slim-bookworm);
    # checkov cannot resolve the argument.
    "CKV_DOCKER_7": "base image is a build argument with a pinned default",
    # Kubernetes ignores HEALTHCHECK; the manifests' gRPC/HTTP probes do this job.
    "CKV_DOCKER_2": "health is probed by Kubernetes, not a Dockerfile HEALTHCHECK",
}


def kubernetes_validate_cli(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_combination_validates_strictly(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process: the CLI's own validate(), strict. It re-reads the schema
    # files (megabytes of JSON) for every object; read each once.
    utils = kubernetes_validate.utils  # type: ignore[attr-defined]
    monkeypatch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
    # Most objects are the same in every combination: each distinct one once.
    distinct: dict[str, tuple[str, dict]] = {}  # type: ignore[type-arg]
    for render in every_combination() + overlays():
        for obj in render.objects:
            distinct.setdefault(json.dumps(obj, sort_keys=True), (render.name, obj))
    count = 0
    for name, obj in distinct.values():
        if True:
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                count += 1
            except kubernetes_validate.SchemaNotFoundError:
                assert obj["kind"] in CUSTOM_KINDS, where
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
    assert count > 50


def test_the_cli_passes_production(tmp_path: Path) -> None:
    path = tmp_path / "production.yaml"
    path.write_text(overlays()[1].text)
    done = kubernetes_validate_cli(path, KUBERNETES_VERSIONS[0])
    assert done.returncode == 0, done.stdout + done.stderr


def test_strict_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    text = overlays()[1].text
    assert "readOnlyRootFilesystem" in text
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1))
    assert kubernetes_validate_cli(path, KUBERNETES_VERSIONS[0]).returncode != 0


def checkov(directory: Path, framework: str, skips: dict[str, str]) -> dict:  # type: ignore[type-arg]
    assert CHECKOV.exists(), (
        f"{CHECKOV} missing: `make test` installs it (deploy/checkov-requirements.txt)"
    )
    done = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(directory),
            "--framework",
            framework,
            "--skip-download",  # offline: no guideline download
            "--compact",
            "--quiet",
            "--output",
            "json",
            *(["--skip-check", ",".join(skips)] if skips else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    reports = report if isinstance(report, list) else [report]
    failed = [
        (f["check_id"], f["check_name"], f.get("resource"))
        for r in reports
        for f in r.get("results", {}).get("failed_checks", [])
    ]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    return {"failed": failed, "passed": passed, "stderr": done.stderr[-2000:]}


def test_checkov_passes_the_rendered_overlays(tmp_path: Path) -> None:
    for render in overlays():
        (tmp_path / (render.name.replace("/", "_").replace("+", "_") + ".yaml")).write_text(
            render.text
        )
    result = checkov(tmp_path, "kubernetes", CHECKOV_K8S_SKIPS)
    assert result["passed"] > 500, result
    assert result["failed"] == [], result["failed"]


def test_checkov_catches_a_privileged_container(tmp_path: Path) -> None:
    text = overlays()[1].text.replace("privileged: false", "privileged: true", 1)
    (tmp_path / "bad.yaml").write_text(text)
    result = checkov(tmp_path, "kubernetes", CHECKOV_K8S_SKIPS)
    assert any(check == "CKV_K8S_16" for check, _, _ in result["failed"]), result


def test_checkov_passes_the_containerfile(tmp_path: Path) -> None:
    # checkov's dockerfile runner only looks at files named Dockerfile.
    shutil.copy(ROOT / "Containerfile", tmp_path / "Dockerfile")
    result = checkov(tmp_path, "dockerfile", CHECKOV_DOCKERFILE_SKIPS)
    assert result["passed"] > 10, result
    assert result["failed"] == [], result["failed"]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_hadolint_passes_the_containerfile() -> None:
    done = hadolint(ROOT / "Containerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_an_unpinned_pip_install(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text((ROOT / "Containerfile").read_text() + "RUN pip install requests\n")
    assert hadolint(bad).returncode != 0
