"""Unit tests of the helpers behind the probe fixes (issue #27): Host names, capped 422s, key checks."""

from __future__ import annotations

import pytest

from service.limits import MAX_VALUES, check_idempotency_key, check_storable
from service.security import allowed_host_names, docs_csp, host_name, swagger_ui_html
from service.submission import SpecError, cap_errors, error_item


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8000", "localhost"), ("LOCALHOST", "localhost"), ("127.0.0.1", "127.0.0.1"),
    ("[::1]:8000", "::1"), ("[::1]", "::1"), ("::1", "::1"), ("lab.example:80", "lab.example"), ("", ""),
])
def test_host_name_drops_the_port_and_case(header: str, name: str) -> None:
    assert host_name(header) == name


def test_allowed_host_names_are_normalised() -> None:
    assert allowed_host_names(["localhost", "[::1]", "Box.Example.:8000", " ", ""]) == {"localhost", "::1",
                                                                                          "box.example"}


def test_cap_errors_keeps_fifty_and_counts_the_rest_once() -> None:
    items = [error_item(["spec", f"k{i}"], "bad") for i in range(120)]
    capped = cap_errors(items)
    assert len(capped) == 51 and capped[-1]["msg"].startswith("... and 70 more errors")
    assert cap_errors(capped) == capped  # capping twice changes nothing
    assert cap_errors(items[:50]) == items[:50]
    assert cap_errors(items[:50], total=60)[-1]["msg"].startswith("... and 10 more errors")


@pytest.mark.parametrize("key", ["trial:x", "TRIAL:abc:def", "Trial:", "", "k" * 256, "a\x00b"])
def test_reserved_empty_long_and_nul_keys_are_refused(key: str) -> None:
    with pytest.raises(SpecError) as e:
        check_idempotency_key(key)
    assert e.value.errors[0]["field"] == "header.Idempotency-Key"


@pytest.mark.parametrize("key", [None, "k", "trials-2026", "my trial:1", "k" * 255])
def test_ordinary_keys_pass(key: str | None) -> None:
    check_idempotency_key(key)


def test_specs_with_too_many_values_are_refused_before_validation() -> None:
    check_storable({f"k{i}": i for i in range(MAX_VALUES - 10)}, ["spec"])
    with pytest.raises(SpecError) as e:
        check_storable({"a": list(range(MAX_VALUES + 1))}, ["spec"])
    assert e.value.errors == [error_item(["spec"], f"more than {MAX_VALUES} values (keys, items and leaves): "
                                                   "too large", "too_large")]


def test_the_docs_page_csp_allows_its_initialiser_by_hash_only() -> None:
    html, csp = swagger_ui_html("/openapi.json", "t")
    assert csp == docs_csp(html.split("<script>", 1)[1].split("</script>", 1)[0])
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0]
    assert html.count('integrity="sha384-') == 2
