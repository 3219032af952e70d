"""The OpenAPI document: the committed file is current, and it declares the contract's errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_service import cli
from chat_service.app import create_app
from chat_service.openapi_export import REGENERATE_COMMAND, render_openapi
from chat_service.settings import Settings

COMMITTED = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
TOKEN_URL = "/api/v1/auth/token"
SCHEMAS = "#/components/schemas/"
ERROR_BODY = SCHEMAS + "ErrorBody"
VALIDATION_ERROR_BODY = SCHEMAS + "ValidationErrorBody"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def rendered() -> str:
    """Exactly what `chat-service openapi` writes (see cli._openapi)."""
    return render_openapi(create_app(Settings(jwt_secret="x" * 32)))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(rendered())
    return schema


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield f"{method.upper()} {path}", operation


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def json_schema(response: dict[str, Any]) -> dict[str, Any] | None:
    schema: dict[str, Any] | None = (
        response.get("content", {}).get("application/json", {}).get("schema")
    )
    return schema


def test_committed_document_is_current() -> None:
    assert COMMITTED.is_file(), f"{COMMITTED} is missing: run `{REGENERATE_COMMAND}`"
    committed = COMMITTED.read_text()
    assert committed == rendered(), (
        f"openapi/openapi.json is out of date with the code: run `{REGENERATE_COMMAND}` "
        "and commit the result"
    )


def test_cli_writes_the_rendered_document(tmp_path: Path) -> None:
    output = tmp_path / "openapi.json"
    with pytest.raises(SystemExit) as exited:
        cli.main(["openapi", "--output", str(output)])
    assert exited.value.code == 0
    assert output.read_text() == rendered()


def test_every_4xx_answer_is_declared_with_the_error_body(document: dict[str, Any]) -> None:
    checked = 0
    for name, operation in operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith("4"):
                continue
            schema = json_schema(response)
            expected = VALIDATION_ERROR_BODY if status == "422" else ERROR_BODY
            assert schema == {"$ref": expected}, f"{name} {status}: {schema}"
            checked += 1
    assert checked, "no operation declares any 4xx response"


def test_every_error_schema_has_detail_and_code(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            schema = json_schema(response)
            assert schema is not None, f"{name} {status} declares no JSON body"
            assert schema.get("$ref", "").startswith(SCHEMAS), f"{name} {status}: {schema}"
            target = schemas[schema["$ref"].removeprefix(SCHEMAS)]
            assert {"detail", "code"} <= set(target.get("required", [])), (name, status, target)


def test_inputs_declare_422_and_secured_operations_declare_401(document: dict[str, Any]) -> None:
    secured = 0
    for name, operation in operations(document):
        responses = operation["responses"]
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in responses, f"{name} takes input but declares no 422"
        if operation.get("security"):
            secured += 1
            assert "401" in responses, f"{name} needs a token but declares no 401"
    assert secured, "no operation requires a bearer token"


def test_fastapi_stock_validation_error_is_absent(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    assert "HTTPValidationError" not in text
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "ValidationError" not in schemas
    all_refs = set(refs(document))
    assert SCHEMAS + "ValidationError" not in all_refs
    assert VALIDATION_ERROR_BODY in all_refs
    dangling = {ref for ref in all_refs if ref.removeprefix(SCHEMAS) not in schemas}
    assert not dangling, f"references to undefined schemas: {sorted(dangling)}"


def test_oauth2_password_flow_points_at_the_token_endpoint(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    password_flows = [
        scheme["flows"]["password"]
        for scheme in schemes.values()
        if scheme.get("type") == "oauth2" and "password" in scheme.get("flows", {})
    ]
    assert password_flows, schemes
    assert all(flow["tokenUrl"] == TOKEN_URL for flow in password_flows), password_flows
    # What Swagger's Authorize sends: a form with username and password.
    token = document["paths"][TOKEN_URL]["post"]
    form = token["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    body = document["components"]["schemas"][form["$ref"].removeprefix(SCHEMAS)]
    assert {"username", "password"} <= set(body["required"]), body
    for name, operation in operations(document):
        for requirement in operation.get("security", []):
            assert set(requirement) <= set(schemes), f"{name}: unknown scheme {requirement}"


def test_every_operation_is_documented(document: dict[str, Any]) -> None:
    names = []
    for name, operation in operations(document):
        names.append(name)
        assert operation.get("summary", "").strip(), f"{name} has no summary"
        assert operation.get("description", "").strip(), f"{name} has no docstring/description"
    assert len(names) >= 2, names
    ids = [operation["operationId"] for _, operation in operations(document)]
    assert len(ids) == len(set(ids)), f"duplicate operationId: {sorted(ids)}"
