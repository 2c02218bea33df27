"""The direction of imports (issue 21; docs/architecture.md, "One shape for
every service"), read from the code with ast: every import statement of
servicekit/, services/*/ and gateway/, those inside functions and
TYPE_CHECKING blocks included, relative ones resolved.

- servicekit, the ground floor, imports nothing of services, gateway,
  devtools, console or bench;
- a service imports no other service's package (services talk over gRPC and
  events), save the exceptions listed in SERVICE_EXCEPTIONS, nor anything above
  the services (gateway, devtools, console, bench);
- the gateway imports no service's package (it calls them over gRPC);
- rewards' rooms import only the rooms below them (ROOMS_BELOW) and, of the
  root, only its shared modules (ROOT_SHARED).

A failure names the file and line, the import and the rule it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ABOVE_THE_KIT = ("services", "gateway", "devtools", "console", "bench")
ABOVE_THE_SERVICES = ("gateway", "devtools", "console", "bench")

# (importing file, imported module): why it is allowed. Each must still exist.
SERVICE_EXCEPTIONS = {
    ("services/guides/seed.py", "services.rewards.seed"): (
        "demo data for `make run`: a guide and a store manager for each of rewards' demo stores"
    ),
}

# Rewards' rooms and the rooms each may import (docs/architecture.md: every
# import runs down). A room not in this table fails until it is placed.
ROOMS_BELOW: dict[str, frozenset[str]] = {
    "analytics": frozenset({"orders"}),
    "orders": frozenset({"coupons", "points"}),
    "mall": frozenset({"coupons", "points"}),
    "referral": frozenset({"mall", "points"}),
    "coupons": frozenset({"points"}),
    "points": frozenset(),
}
# What a room may take from the rewards root: the shared modules, never the
# composers above the rooms (servicer, server, cli, consumers, seed).
ROOT_SHARED = frozenset({"kernel", "members", "merges", "wire"})


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones resolved;
    `from package import module` yields the module itself."""
    rel = path.relative_to(root)
    package = list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                yield node.lineno, candidate if _is_module(root, candidate) else module


def _sources(root: Path, top: str) -> Iterator[Path]:
    for path in sorted((root / top).rglob("*.py")):
        if ".venv" not in path.parts:
            yield path


def violations(root: Path) -> list[str]:
    found: list[str] = []

    def breach(path: Path, line: int, module: str, rule: str) -> None:
        found.append(f"{path.relative_to(root)}:{line}: imports {module}: {rule}")

    for path in _sources(root, "servicekit"):
        for line, module in imports_of(root, path):
            if module.split(".")[0] in ABOVE_THE_KIT:
                breach(path, line, module, "servicekit imports nothing above it")

    for path in _sources(root, "gateway"):
        for line, module in imports_of(root, path):
            if module.split(".")[0] == "services":
                breach(
                    path, line, module, "the gateway calls services over gRPC, never imports them"
                )

    for path in _sources(root, "services"):
        rel = path.relative_to(root)
        if len(rel.parts) < 3:
            continue  # services/__init__.py
        service = rel.parts[1]
        for line, module in imports_of(root, path):
            parts = module.split(".")
            if parts[0] in ABOVE_THE_SERVICES:
                breach(path, line, module, "a service imports nothing above the services")
            elif parts[0] == "services" and len(parts) > 1 and parts[1] != service:
                if (rel.as_posix(), module) not in SERVICE_EXCEPTIONS:
                    breach(
                        path, line, module,
                        f"services talk over gRPC and events: {service} imports no other "
                        "service's package (or list it in SERVICE_EXCEPTIONS)",
                    )  # fmt: skip
            elif service == "rewards" and _is_module(root, f"services.rewards.{rel.parts[2]}"):
                room = rel.parts[2]
                # A room not yet in the table may import no other room (and
                # test_every_rewards_room_is_placed asks for its place).
                below = ROOMS_BELOW.get(room, frozenset())
                if parts[:2] != ["services", "rewards"] or len(parts) < 3:
                    continue
                target = parts[2]
                if target == room or target in below:
                    continue
                if (root / "services" / "rewards" / target / "__init__.py").is_file():
                    breach(
                        path, line, module,
                        f"rewards room {room} may import only "
                        f"{', '.join(sorted(below)) or 'no other room'}, not {target}",
                    )  # fmt: skip
                elif target not in ROOT_SHARED:
                    breach(
                        path, line, module,
                        f"rewards room {room} may take from the root only "
                        f"{', '.join(sorted(ROOT_SHARED))}, not {target}",
                    )  # fmt: skip
    return found


def test_imports_run_down() -> None:
    found = violations(ROOT)
    assert not found, "imports against the house's direction:\n" + "\n".join(found)


def test_every_rewards_room_is_placed() -> None:
    rooms = {p.parent.name for p in (ROOT / "services" / "rewards").glob("*/__init__.py")}
    assert rooms == set(ROOMS_BELOW), (
        f"rooms on disk {sorted(rooms)}, in ROOMS_BELOW {sorted(ROOMS_BELOW)}"
    )


def test_service_exceptions_still_exist() -> None:
    """An exception nobody needs any more is removed, not kept as a hole."""
    for file, module in SERVICE_EXCEPTIONS:
        seen = {m for _, m in imports_of(ROOT, ROOT / file)}
        assert module in seen, f"{file} no longer imports {module}: drop it from SERVICE_EXCEPTIONS"


def _house(tmp_path: Path, files: dict[str, str]) -> Path:
    for name in (
        "servicekit/__init__.py",
        "gateway/__init__.py",
        "devtools/__init__.py",
        "services/__init__.py",
        "services/member/__init__.py",
        "services/guides/__init__.py",
        "services/rewards/__init__.py",
        "services/rewards/kernel.py",
        "services/rewards/servicer.py",
        *(f"services/rewards/{room}/__init__.py" for room in ROOMS_BELOW),
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (
            "servicekit/db.py",
            "def f():\n    import devtools.devrun\n",
            "servicekit/db.py:2: imports devtools.devrun: servicekit imports nothing above it",
        ),
        (
            "services/guides/handlers.py",
            "from services.member import domain\n",
            "services/guides/handlers.py:1: imports services.member: services talk over "
            "gRPC and events: guides imports no other service's package",
        ),
        (
            "services/member/server.py",
            "from gateway import app\n",
            "services/member/server.py:1: imports gateway: a service imports nothing above the "
            "services",
        ),
        (
            "gateway/api.py",
            "from services.rewards import kernel\n",
            "gateway/api.py:1: imports services.rewards.kernel: the gateway calls services over gRPC",
        ),
        (
            "services/rewards/points/handlers.py",
            "from ..coupons import handlers\n",
            "services/rewards/points/handlers.py:1: imports services.rewards.coupons: rewards room "
            "points may import only no other room, not coupons",
        ),
        (
            "services/rewards/referral/handlers.py",
            "from services.rewards.orders import domain\n",
            "services/rewards/referral/handlers.py:1: imports services.rewards.orders: rewards "
            "room referral may import only mall, points, not orders",
        ),
        (
            "services/rewards/coupons/servicer.py",
            "from .. import servicer\n",
            "services/rewards/coupons/servicer.py:1: imports services.rewards.servicer: rewards "
            "room coupons may take from the root only kernel, members, merges, wire, not servicer",
        ),
    ],
)
def test_a_wrong_import_is_named(tmp_path: Path, file: str, text: str, message: str) -> None:
    found = violations(_house(tmp_path, {file: text}))
    assert len(found) == 1 and found[0].startswith(message), found


def test_imports_that_run_down_pass(tmp_path: Path) -> None:
    house = _house(
        tmp_path,
        {
            "services/rewards/orders/handlers.py": (
                "from ..coupons import handlers\nfrom services.rewards import kernel\n"
                "from servicekit import db\n"
            ),
            "services/rewards/analytics/servicer.py": "from ..orders import handlers\n",
            "services/guides/seed.py": "from services.rewards.seed import DEMO_STORES\n",
            "services/rewards/server.py": "from .points import handlers\n",
        },
    )
    assert violations(house) == []
