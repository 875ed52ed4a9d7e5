"""docs/api-reference.md is the rendering of the app's own OpenAPI schema and job-spec schemas."""

from __future__ import annotations

from pathlib import Path

from service.apidoc import openapi_schema, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"


def test_the_committed_reference_equals_the_rendered_schema() -> None:
    assert DOC.read_text() == render(openapi_schema()), (
        "docs/api-reference.md is stale: run `python -m service.apidoc > docs/api-reference.md`")


def test_every_operation_and_spec_field_is_in_the_reference() -> None:
    schema = openapi_schema()
    text = render(schema)
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f"### `{method.upper()} {path}`" in text
    for field in ("`members`", "`epochs`", "`target_job`", "`search_space`", "`n_examples`"):
        assert field in text
    assert "| `members` | integer | no | `3` | ≥ 1, ≤ 16 |" in text  # bounds are rendered
