from __future__ import annotations

import pytest

from app.errors import BadRequest
from app.reapi.digests import (EMPTY_DIGEST, digest_from_parts, namespace_for, parse_read_resource,
                               parse_write_resource)

H = "a" * 64


def test_read_resource_with_and_without_instance() -> None:
    plain = parse_read_resource(f"blobs/{H}/12")
    assert (plain.namespace, plain.digest.hash, plain.digest.size) == ("default", H, 12)
    nested = parse_read_resource(f"team/main/blobs/{H.upper()}/12")
    assert nested.namespace == "team/main" and nested.digest.hash == H
    assert parse_read_resource(f"x/compressed-blobs/identity/{H}/3").digest.size == 3


def test_write_resource_allows_trailing_metadata() -> None:
    res = parse_write_resource(f"inst/uploads/0f9c-11/blobs/{H}/7/some/metadata")
    assert (res.namespace, res.upload_id, res.digest.size) == ("inst", "0f9c-11", 7)


@pytest.mark.parametrize("resource", [
    "", "blobs", f"blobs/{H}", f"blobs/{H}/-1", f"blobs/{H}/1x", f"blobs/{'g' * 64}/1",
    f"blobs/{H}/1/extra", f"../blobs/{H}/1", f"a//b/blobs/{H}/1", f"blobs/{H}/01",
    f"in\x00st/blobs/{H}/1", f"compressed-blobs/brotli/{H}/1", f"blobs/{H}/0",
    # Sizes are ASCII decimals: "\u0665" (ARABIC-INDIC FIVE) is a digit to str.isdigit and int().
    f"blobs/{H}/\u0665", f"blobs/{H}/\u00b2", f"blobs/{H}/{'9' * 5000}", f"blobs/{H}/9223372036854775808",
])
def test_bad_read_resources(resource: str) -> None:
    with pytest.raises(BadRequest):
        parse_read_resource(resource)


@pytest.mark.parametrize("resource", [
    f"blobs/{H}/1", f"uploads/blobs/{H}/1", f"uploads/u u/blobs/{H}/1", f"uploads/u/{H}/1",
])
def test_bad_write_resources(resource: str) -> None:
    with pytest.raises(BadRequest):
        parse_write_resource(resource)


def test_empty_digest_and_namespace_rules() -> None:
    assert digest_from_parts(EMPTY_DIGEST.hash, 0).is_empty
    assert EMPTY_DIGEST.cas_key == f"blob/{EMPTY_DIGEST.hash}/0"
    assert namespace_for("") == "default"
    for bad in ("/x", "x/", "a/../b", "a/blobs/b", "x" * 2000):
        with pytest.raises(BadRequest):
            namespace_for(bad)
