"""The gateway's OpenAPI examples (issue 8): integrators copy them, so every
success response has a whole example, and every example is a body the spec
accepts, with no key the response does not have.

The validator is jsonschema_rs, the one schemathesis checks the live
responses with (tests/e2e/test_gateway_contract.py); it comes with
schemathesis, so no dependency of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, cast

import jsonschema_rs
import pytest
from fastapi import FastAPI
from fastapi._compat import get_definitions, get_flat_models_from_fields, get_model_name_map
from fastapi.openapi.utils import get_fields_from_routes

from gateway.clients import Downstreams
from gateway.http import create_app

Spec = dict[str, Any]
Operation = tuple[str, str, str]  # method, path, status


def declared_schemas(app: FastAPI) -> dict[str, Any]:
    """The component schemas as pydantic declares them: FastAPI's last step,
    `jsonable_encoder(..., exclude_none=True)`, drops every null of the spec,
    the examples' too (fastapi#5559), so `"sku": null` vanishes from a
    response example. The same calls as fastapi.openapi.utils.get_openapi."""
    fields = get_fields_from_routes(app.routes)
    names = get_model_name_map(get_flat_models_from_fields(fields, known_models=set()))
    _, definitions = get_definitions(
        fields=fields, model_name_map=names, separate_input_output_schemas=True
    )
    return definitions


APP = create_app(cast(Downstreams, None), traced=False)
SERVED: Spec = APP.openapi()
# The spec with its examples whole, made here independently of gateway/http.py,
# so test_the_served_spec_keeps_examples_whole can compare /openapi.json with it.
SPEC: Spec = copy.deepcopy(SERVED)
SPEC["components"]["schemas"].update(declared_schemas(APP))


def strict(spec: Spec) -> Spec:
    """The spec's components with every object schema closed to keys it does
    not name: a misspelt key in an example is an error, not an extra."""
    components = copy.deepcopy(spec["components"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(components["schemas"])
    return components


def validator(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    # `#/components/...` references resolve against this root document.
    return jsonschema_rs.Draft202012Validator(
        {**schema, "components": components}, validate_formats=True
    )


def problems(example: Any, schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    return [
        f"{e.message} at /{'/'.join(map(str, e.instance_path))}"
        for e in validator(schema, components).iter_errors(example)
    ]


def ref_name(schema: dict[str, Any]) -> str:
    """The component a schema refers to ("" when it is inline)."""
    return str(schema.get("$ref", "")).removeprefix("#/components/schemas/")


def referenced(schema: dict[str, Any], spec: Spec) -> dict[str, Any]:
    name = ref_name(schema)
    return cast(dict[str, Any], spec["components"]["schemas"][name]) if name else {}


def success_responses(spec: Spec) -> Iterator[tuple[Operation, dict[str, Any]]]:
    """(operation, its application/json media object) for every 2xx response."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                media = response.get("content", {}).get("application/json")
                if status.startswith("2") and media is not None:
                    yield (method.upper(), path, status), media


def examples_of(media: dict[str, Any], spec: Spec) -> list[Any]:
    """Every whole-response example: on the media object, on its schema, or on
    the component the schema names."""
    found: list[Any] = []
    if "example" in media:
        found.append(media["example"])
    found += [e["value"] for e in media.get("examples", {}).values() if "value" in e]
    schema = media.get("schema", {})
    for node in (schema, referenced(schema, spec)):
        if "example" in node:
            found.append(node["example"])
        found += node.get("examples", [])
    return found


def schema_examples(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(location, schema, example) for every example inside a schema, nested too."""
    if not isinstance(node, dict):
        return
    for example in node.get("examples", []) if isinstance(node.get("examples"), list) else []:
        yield where, node, example
    for name, sub in node.get("properties", {}).items():
        yield from schema_examples(sub, f"{where}.{name}")
    for key in ("items", "additionalProperties", "not"):
        yield from schema_examples(node.get(key), f"{where}[{key}]")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for n, sub in enumerate(node.get(key, [])):
            yield from schema_examples(sub, f"{where}[{key}{n}]")


COMPONENTS = strict(SPEC)


def invalid_examples(media: dict[str, Any]) -> list[str]:
    return [
        f"example {n}: {problem}"
        for n, example in enumerate(examples_of(media, SPEC))
        for problem in problems(example, media["schema"], COMPONENTS)
    ]


def test_every_success_example_is_a_valid_response() -> None:
    checked, failures = 0, []
    for op, media in success_responses(SPEC):
        checked += len(examples_of(media, SPEC))
        failures += [f"{' '.join(op)} {problem}" for problem in invalid_examples(media)]
    assert checked >= 40, f"only {checked} examples found: is the walk still finding them?"
    assert not failures, "\n".join(failures)


def test_every_schema_example_matches_its_schema() -> None:
    """Request models' and fields' examples too: they are what schemathesis
    sends first and what integrators copy."""
    failures = [
        f"{where}: {problem}"
        for name, schema in SPEC["components"]["schemas"].items()
        for where, node, example in schema_examples(schema, name)
        for problem in problems(example, node, COMPONENTS)
    ]
    assert not failures, "\n".join(failures)


def test_the_served_spec_keeps_examples_whole() -> None:
    """fastapi#5559: get_openapi drops the examples' nulls; gateway/http.py's
    openapi() puts back the component schemas as pydantic declares them."""
    served = SERVED["components"]["schemas"]
    mangled = sorted(
        name
        for name, schema in SPEC["components"]["schemas"].items()
        if list(schema_examples(schema, name)) != list(schema_examples(served[name], name))
    )
    assert not mangled, f"/openapi.json serves these examples without their nulls: {mangled}"


def test_no_success_response_lacks_a_whole_example() -> None:
    """A new route needs an example of its success body on its response model
    (model_config json_schema_extra "examples"), whole and valid."""
    missing = sorted(
        " ".join(op)
        for op, media in success_responses(SPEC)
        if not examples_of(media, SPEC) or invalid_examples(media)
    )
    assert not missing, "success responses without a whole, valid example:\n" + "\n".join(missing)
    assert len(list(success_responses(SPEC))) >= 65, "is the walk still finding the operations?"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda e: e.pop("points"), '"points" is a required property'),
        (lambda e: e.update(points="800"), 'is not of type "integer"'),
        (lambda e: e.update(created_at="2026-05-01 12:00"), 'is not a "date-time"'),
        (lambda e: e.update(point=800), "Additional properties are not allowed"),
    ],
)
def test_the_check_refuses_a_wrong_example(change: Any, expected: str) -> None:
    """The checker itself: references resolve, and a missing, mistyped,
    malformed or misspelt key is reported."""
    (media,) = [
        m
        for op, m in success_responses(SPEC)
        if op == ("POST", "/v1/admin/mall/exchanges/{exchange_id}/ship", "200")
    ]
    example = copy.deepcopy(examples_of(media, SPEC)[0])
    assert problems(example, media["schema"], COMPONENTS) == []
    change(example)
    found = problems(example, media["schema"], COMPONENTS)
    assert any(expected in p for p in found), found
