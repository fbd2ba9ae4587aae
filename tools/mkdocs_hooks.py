"""mkdocs hooks: the HTTP reference page, rendered from both apps' own OpenAPI at build time.

The page is generated, never written to disk, so it cannot drift from the code: a route or
field renamed in kv/web/schemas.py is renamed here on the next `make docs`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent  # the repository
PAGE = "api/reference.md"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, PAGE, content=reference()))
    return files


def reference() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import follower
    import leader
    from kv.settings import FollowerSettings, LeaderSettings

    apps = {
        "leader": leader.create_app(
            LeaderSettings(followers=["http://127.0.0.1:8001"], replication_secret="docs")
        ),
        "follower": follower.create_app(FollowerSettings(replication_secret="docs")),
    }
    lines = [
        "# HTTP reference",
        "",
        "Generated from each app's OpenAPI schema when the site is built; a running node serves",
        "the same as `/openapi.json`, and as Swagger UI at `/docs`. The [HTTP API](http.md) page",
        "explains the routes with examples.",
        "",
    ]
    schemas: dict[str, Any] = {}
    for role, app in apps.items():
        spec = app.openapi()
        schemas |= spec.get("components", {}).get("schemas", {})
        lines += [f"## The {role}", ""]
        for path, methods in spec["paths"].items():
            for method, operation in methods.items():
                lines += operation_lines(role, method.upper(), path, operation)
    lines += ["## Schemas", ""]
    for name in sorted(schemas):
        lines += schema_lines(name, schemas[name])
    return "\n".join(lines) + "\n"


def operation_lines(role: str, method: str, path: str, operation: dict[str, Any]) -> list[str]:
    lines = [f"### {method} `{path}` ({role})", ""]
    if operation.get("summary"):
        lines += [f"**{operation['summary']}**", ""]
    if operation.get("description"):
        lines += [operation["description"].strip(), ""]
    parameters = operation.get("parameters", [])
    if parameters:
        lines += ["| parameter | in | required | description |", "|---|---|---|---|"]
        for parameter in parameters:
            description = cell(parameter.get("description") or "")
            required = "yes" if parameter.get("required") else "no"
            name = parameter["name"]
            lines.append(f"| `{name}` | {parameter['in']} | {required} | {description} |")
        lines.append("")
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        lines += [f"Request body: {type_of(body.get('schema', {}))}", ""]
    lines += ["| status | description | body |", "|---|---|---|"]
    for status, response in operation.get("responses", {}).items():
        media: dict[str, Any] = next(iter(response.get("content", {}).values()), {})
        shown: dict[str, Any] = media.get("schema", {})
        kind = type_of(shown) if shown else ""
        lines.append(f"| {status} | {cell(response.get('description', ''))} | {kind} |")
    return [*lines, ""]


def schema_lines(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [cell(schema["description"]), ""]
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", []))
        lines += ["| field | type | required | description |", "|---|---|---|---|"]
        for field, spec in properties.items():
            mark = "yes" if field in required else "no"
            description = cell(spec.get("description", ""))
            lines.append(f"| `{field}` | {type_of(spec)} | {mark} | {description} |")
        lines.append("")
    elif "enum" in schema:
        lines += ["One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".", ""]
    return lines


def type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(type_of(part) for part in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        inner = schema["additionalProperties"]
        return f"object of {type_of(inner) if isinstance(inner, dict) else 'any'}"
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    return str(schema.get("type", "any"))


def cell(text: str) -> str:
    """One table cell: on one line, and with no stray pipe."""
    return " ".join(str(text).split()).replace("|", "\\|")
