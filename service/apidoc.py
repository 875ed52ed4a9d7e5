"""The API reference (docs/api-reference.md), rendered from the app's own OpenAPI schema.

``python -m service.apidoc > docs/api-reference.md`` regenerates it; a unit test fails when the committed
file differs from what the code's schema renders, so the reference cannot drift from the API.
No database is contacted: the schema is built from the routes alone.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

HEADER = """# API reference

Generated from the service's OpenAPI schema by `python -m service.apidoc > docs/api-reference.md`
(a test keeps this file equal to the schema). The guide with examples is [api.md](api.md); the live schema
is `GET /openapi.json` and the interactive one `/docs`. With authentication on, every `/v1` route needs
`Authorization: Bearer <token>` ([reliability.md](reliability.md)).
"""


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of ``create_app`` (an engine is created but never connected)."""
    from service.app import create_app
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="re-apidoc-") as d:
        settings = Settings(data_dir=Path(d), database_url="postgresql+psycopg://apidoc@127.0.0.1:1/apidoc")
        return create_app(settings, warm=False).openapi()


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    t = schema.get("type", "any")
    if t == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if t == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(t)


def _bounds(schema: dict[str, Any]) -> str:
    parts = []
    for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
                     ("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"),
                     ("maxItems", "items ≤")):
        if key in schema:
            parts.append(f"{sym} {schema[key]}")
    for sub in schema.get("anyOf", []):
        inner = _bounds(sub)
        if inner:
            parts.append(inner)
    return ", ".join(parts)


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(schema: dict[str, Any]) -> str:
    """Markdown for every operation (parameters, body, responses) and every component schema."""
    out = [HEADER, f"API version {schema['info']['version']}.", ""]
    out += ["## Operations", ""]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            out += [f"### `{method.upper()} {path}`", ""]
            if op.get("summary"):
                out += [f"**{_cell(op['summary'])}**", ""]
            if op.get("description"):
                out += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type | required | constraints | description |", "|---|---|---|---|---|---|"]
                for p in params:
                    ps = p.get("schema", {})
                    out.append(f"| `{p['name']}` | {p['in']} | {_type(ps)} | {'yes' if p.get('required') else 'no'} "
                               f"| {_bounds(ps)} | {_cell(p.get('description', ps.get('description', '')))} |")
                out.append("")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                out += [f"Request body ({media}): {_type(content.get('schema', {}))}", ""]
            out += ["| status | meaning | body |", "|---|---|---|"]
            for code, resp in op.get("responses", {}).items():
                content = resp.get("content", {})
                shape = ", ".join(_type(c.get("schema", {})) for c in content.values()) or "—"
                out.append(f"| {code} | {_cell(resp.get('description', ''))} | {shape} |")
            out.append("")
    out += ["## Schemas", ""]
    out += _schemas(schema.get("components", {}).get("schemas", {}))
    out += ["## Job specs", "",
            "The `spec` of `POST /v1/jobs` by `kind` (`ensemble_core.spec`; a method's `hyperparameters` are listed "
            "with their meanings by `GET /v1/methods`). Errors are 422 naming `spec.<field>`.", ""]
    for kind, model_schema in spec_schemas().items():
        title = model_schema.get("title", kind)
        out += [f"### kind `{kind}`: {title}", ""]
        out += _schemas({title: model_schema}, level="####")
        out += _schemas(model_schema.get("$defs", {}), level="####")
    return "\n".join(out).rstrip() + "\n"


def spec_schemas() -> dict[str, dict[str, Any]]:
    """JSON schemas of the job specs by kind (torch-free pydantic models)."""
    from ensemble_core.spec import EvaluateSpec, TrainSpec, TuneSpec

    return {"train": TrainSpec.model_json_schema(), "evaluate": EvaluateSpec.model_json_schema(),
            "tune": TuneSpec.model_json_schema()}


def _schemas(comps: dict[str, Any], level: str = "###") -> list[str]:
    out: list[str] = []
    for name, comp in sorted(comps.items()):
        out += [f"{level} {name}", ""]
        if comp.get("description"):
            out += [_cell(comp["description"]), ""]
        props = comp.get("properties", {})
        if props:
            required = set(comp.get("required", []))
            out += ["| field | type | required | default | constraints | description |", "|---|---|---|---|---|---|"]
            for field, fs in props.items():
                default = f"`{json.dumps(fs['default'])}`" if "default" in fs else ""
                out.append(f"| `{field}` | {_type(fs)} | {'yes' if field in required else 'no'} | {_cell(default)} "
                           f"| {_bounds(fs)} | {_cell(fs.get('description', ''))} |")
            out.append("")
        elif "enum" in comp:
            out += [f"One of {_type(comp)}.", ""]
    return out


def main() -> None:
    print(render(openapi_schema()), end="")


if __name__ == "__main__":
    main()
