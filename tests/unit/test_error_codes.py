"""Error codes match the docs: the registry (servicekit/error_codes.py) holds
every code the source raises, docs/errors.md is the registry's table, and
every code the docs name anywhere exists. Codes built at run time (f-strings,
a verdict's reason) are checked where they are raised: the suite runs with
LOYALTY_STRICT_ERROR_CODES, so DomainError refuses an unregistered one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import pytest

from servicekit import error_codes
from servicekit.error_codes import ERROR_CODES, UnregisteredErrorCode
from servicekit.errors import FailedPrecondition, InvalidArgument
from services.rewards.points.domain import check_text

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ("servicekit", "gateway", "services", "devtools", "console")
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
CODE_LIKE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z]{4,}")

# Calls whose `code` is a send's recorded outcome (engagement's Delivery), not an error.
OUTCOME_CALLS = {"Delivery"}
# Functions that take the code as a positional argument, and where.
POSITIONAL = {"problem": 1, "to_rpc_status": 2, "_no": 0}
# Text checks that take a stem and build the codes from it.
STEMS = {
    "check_text": ("{}_REQUIRED", "INVALID_{}"),  # services/rewards/points/domain.py
    "check_bounded_text": ("{}_REQUIRED", "{}_TOO_LONG", "{}_NOT_PRINTABLE"),  # rewards/kernel.py
}

# Upper-case words the docs name that are not error codes: HTTP methods, SQL,
# Redis and health words, the offline upload's per-order outcomes (a result,
# not an error), and names of constants in the code.
NOT_ERROR_CODES = {
    *("GET", "POST", "PUT", "PATCH", "DELETE"),
    *("CASE", "COPY", "CREATE", "FILTER", "HASH", "LIMIT", "MATERIALIZED", "UNLOGGED"),
    *("UPDATE", "WHERE", "INFO", "XADD", "XAUTOCLAIM", "NOGROUP", "JUNK", "DOWN"),
    # Redis Cluster's error for keys in different slots (docs/operations.md).
    "CROSSSLOT",
    # Redis's script commands and the error a script not loaded yet answers (docs/deploy.md).
    *("EVALSHA", "NOSCRIPT"),
    *("SERVING", "NOT_SERVING", "APPLIED", "REPLAYED", "REJECTED", "NOT_ATTEMPTED"),
    *("CONNECTION_ERRORS", "SH001", "REWARDS_", "UNREACHABLE"),
    # Names in the code the docs point at (rewards coupons, docs/operations.md);
    # the statements' constants (ISSUE_SQL, SETTLE_ORDER_SQL) by sql_constants().
    *("COUPONS", "MAX_VALID_DAYS"),
    # OpenTelemetry's and the fakes' own environment variables.
    *("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    "WECHAT_FAKE_PORT",
    # Reasons inside successful replies, not errors: a coupon a refund did not
    # restore, an identifier identify ignored, a send suppressed or taken back,
    # an inviter's reward recorded as refused.
    *("PARTIAL_REFUND", "NOT_RESTORABLE", "EXPIRED", "OWNED_ELSEWHERE", "PHONE_OWNED_ELSEWHERE"),
    *("PREEMPTED", "NO_CONSENT", "NO_SUBSCRIPTION_CREDIT", "NO_ADDRESS"),
    "INVITER_REWARD_CAP_REACHED",
    # A send's recorded outcome (its error_code, shown to operators; docs/journeys.md),
    # never an answer to a caller: engagement's own codes and providers' HTTP codes.
    *("CHANNEL_NOT_CONFIGURED", "NO_PROVIDER", "TOKEN_UNREACHABLE", "FAIL_LIST"),
    *("PHONE_RATE_LIMITED", "LEASE_EXPIRED", "MISSING_VARIABLE", "HTTP_401", "HTTP_429"),
    # ...and the waiting sends' reasons and settlements (SMS receipt cut-off,
    # WeCom task results, a mini-program credit WeChat voided).
    *("NO_RECEIPT", "TASK_CREATED", "SENT_BY_STAFF", "NOT_SENT_BY_STAFF", "CREDIT_VOIDED"),
    *("NOT_A_FRIEND", "CONTACT_LIMIT", "NO_WECOM_SENDER"),
    # Names of constants and make variables the docs mention.
    *(
        "VARIABLES",
        "TRIGGER_VARIABLES",
        "ANALYTICS_DEADLINE_FACTOR",
        "STORE_SCOPE",
        "DEDUPE_AHEAD_DAYS",
        "NO_EVENT_TIME",
        "PROFILE",
        "BENCH_ARGS",
        "BENCH_PROFILE_RATE",
    ),
}


def python_files() -> list[Path]:
    return [
        p
        for top in SOURCE
        for p in sorted((ROOT / top).rglob("*.py"))
        if "migrations" not in p.parts and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]


def constants(node: ast.AST) -> set[str]:
    """Code-like string constants in an expression (a literal, or each branch of
    `"A" if x else "B"`, a dict of codes...); f-strings are left to strict mode."""
    return {
        n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and CODE_LIKE.fullmatch(n.value)
        and not isinstance(node, ast.JoinedStr)
    }


def raised_codes() -> dict[str, str]:
    """Every code literal the source passes as an error code, with where."""
    trees = {p: ast.parse(p.read_text()) for p in python_files()}
    # Any function of ours with a parameter named `code` takes it there too.
    positional = dict(POSITIONAL)
    for tree in trees.values():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [a.arg for a in fn.args.args if a.arg not in ("self", "cls")]
                if "code" in names and fn.name not in positional and fn.name not in STEMS:
                    positional[fn.name] = names.index("code")
    found: dict[str, str] = {}
    for path, tree in trees.items():
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in OUTCOME_CALLS:
                continue
            args: list[ast.AST] = [kw.value for kw in call.keywords if kw.arg == "code"]
            index = positional.get(name)
            if index is not None and len(call.args) > index:
                args.append(call.args[index])
            if name in STEMS and len(call.args) > 2:
                for stem in constants(call.args[2]):
                    for pattern in STEMS[name]:
                        found.setdefault(
                            pattern.format(stem), f"{path.relative_to(ROOT)}:{call.lineno}"
                        )
            for arg in args:
                if isinstance(arg, ast.JoinedStr):
                    continue
                for code in constants(arg):
                    found.setdefault(code, f"{path.relative_to(ROOT)}:{call.lineno}")
    return found


def test_every_code_the_source_raises_is_registered() -> None:
    raised = raised_codes()
    assert len(raised) > 200  # the scan finds the codes (not a check that cannot fail)
    missing = {code: where for code, where in raised.items() if code not in ERROR_CODES}
    assert not missing, f"codes raised but not in servicekit/error_codes.py: {missing}"


def test_docs_errors_md_is_the_registry() -> None:
    text = (ROOT / "docs" / "errors.md").read_text()
    assert error_codes.markdown() in text, (
        "docs/errors.md is out of date: python -m servicekit.error_codes renders its table"
    )


def setting_names() -> set[str]:
    """Environment names of every *Settings class's fields (FOO_BAR for foo_bar)."""
    names: set[str] = set()
    for path in python_files():
        for cls in ast.walk(ast.parse(path.read_text())):
            if isinstance(cls, ast.ClassDef) and cls.name.endswith("Settings"):
                for item in cls.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id.upper())
    return names


def proto_enum_values() -> set[str]:
    values: set[str] = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        values |= set(re.findall(r"^\s+([A-Z][A-Z0-9_]+) = \d+;", proto.read_text(), re.M))
    return values


def sql_constants() -> set[str]:
    """Module-level statement constants (ISSUE_SQL, SETTLE_ORDER_SQL): the docs
    name them to say which statement does what; no error code ends in _SQL."""
    names: set[str] = set()
    for path in python_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                names |= {
                    t.id for t in node.targets if isinstance(t, ast.Name) and t.id.endswith("_SQL")
                }
    return names


def test_every_code_the_docs_name_exists() -> None:
    settings = setting_names()
    assert {"ISSUE_SQL", "SETTLE_ORDER_SQL"} <= sql_constants()  # the scan finds them
    known = (
        set(ERROR_CODES)
        | NOT_ERROR_CODES
        | {s.name for s in grpc.StatusCode}
        | proto_enum_values()
        | sql_constants()
    )
    unknown: dict[str, str] = {}
    for doc in DOCS:
        for token in re.findall(r"`([A-Z][A-Z0-9_]{2,})`", doc.read_text()):
            # A setting, under its service's prefix or not (REWARDS_HOLD_TTL_SECONDS).
            is_setting = any(token == s or token.endswith(f"_{s}") for s in settings)
            if token not in known and not is_setting:
                unknown.setdefault(token, doc.name)
    assert not unknown, f"codes the docs name that no code raises: {unknown}"


def test_strict_mode_refuses_an_unregistered_code_or_status() -> None:
    with pytest.raises(UnregisteredErrorCode):
        InvalidArgument("no such code", code="NOT_A_REGISTERED_CODE")
    # Registered, but as INVALID_ARGUMENT: raised as a precondition it is drift.
    with pytest.raises(UnregisteredErrorCode):
        FailedPrecondition("wrong status", code="INVALID_PHONE")


def test_a_nul_byte_answers_the_code_the_docs_name() -> None:
    # docs/api.md names the code a NUL byte in a text field answers; the
    # reason of a points adjustment is such a field.
    api = (ROOT / "docs" / "api.md").read_text()
    named = re.search(r"NUL byte[^|]*?\(e\.g\. `([A-Z_]+)` for a `reason`\)", api)
    assert named, "docs/api.md no longer says what a NUL byte answers"
    with pytest.raises(InvalidArgument) as caught:
        check_text("goodwill\x00", "reason", "REASON", required=True)
    assert (caught.value.code, caught.value.field) == (named.group(1), "reason")
