from __future__ import annotations

import pytest

from app.errors import BadRequest
from app.reapi.digests import (EMPTY_DIGEST, digest_from_parts, namespace_for, parse_digests,
                               parse_read_resource, parse_write_resource)
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

H = "a" * 64


def test_read_resource_with_and_without_instance() -> None:
    plain = parse_read_resource(f"blobs/{H}/12")
    assert (plain.namespace, plain.digest.hash, plain.digest.size) == ("default", H, 12)
    nested = parse_read_resource(f"team/main/blobs/{H.upper()}/12")
    assert nested.namespace == "team/main" and nested.digest.hash == H
    assert parse_read_resource(f"x/compressed-blobs/identity/{H}/3").digest.size == 3


def test_resource_digest_function_and_compressor_segments() -> None:
    """REAPI: ``blobs/{digest_function/}{hash}/{size}`` and ``compressed-blobs/{compressor}/...``;
    a BLAKE3 blob is keyed apart from the SHA256 blob with the same hex."""
    b3 = parse_read_resource(f"ci/blobs/blake3/{H}/5")
    assert (b3.namespace, b3.digest.function, b3.compressor) == ("ci", "blake3", "identity")
    assert b3.digest.cas_key == f"blob/blake3/{H}/5" and b3.digest.ac_key == f"action_cache/blake3/{H}/5"
    sha = parse_read_resource(f"ci/blobs/{H}/5")
    assert sha.digest.function == "sha256" and sha.digest.cas_key == f"blob/{H}/5"
    assert parse_read_resource(f"ci/blobs/sha256/{H}/5").digest == sha.digest
    zstd = parse_write_resource(f"ci/uploads/u1/compressed-blobs/zstd/blake3/{H}/5/meta")
    assert (zstd.compressor, zstd.digest) == ("zstd", b3.digest)
    # Kept bytes are uncompressed: the identity and zstd uploads of one id share them.
    assert zstd.upload_name == parse_write_resource(f"ci/uploads/u1/blobs/blake3/{H}/5").upload_name
    assert zstd.upload_name != parse_write_resource(f"ci/uploads/u1/blobs/{H}/5").upload_name


def test_write_resource_allows_trailing_metadata() -> None:
    res = parse_write_resource(f"inst/uploads/0f9c-11/blobs/{H}/7/some/metadata")
    assert (res.namespace, res.upload_id, res.digest.size) == ("inst", "0f9c-11", 7)


@pytest.mark.parametrize("resource", [
    "", "blobs", f"blobs/{H}", f"blobs/{H}/-1", f"blobs/{H}/1x", f"blobs/{'g' * 64}/1",
    f"blobs/{H}/1/extra", f"../blobs/{H}/1", f"a//b/blobs/{H}/1", f"blobs/{H}/01",
    f"in\x00st/blobs/{H}/1", f"compressed-blobs/brotli/{H}/1", f"blobs/{H}/0",
    f"blobs/md5/{H}/1", f"blobs/sha1/{H}/1", f"blobs/blake3/{H}", f"compressed-blobs/zstd/blake3/{H}",
    f"blobs/blake3/{H}/0",
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


@pytest.mark.parametrize("bad_hash", [H + "\n", H[:-1] + " ", " " + H[1:], H[:62] + "\u00e9a",
                                      "g" * 64, H[:63], H + "a", ""])
def test_digest_hash_is_64_hex_digits_and_nothing_else(bad_hash: str) -> None:
    """A trailing newline passed the old ``^...$`` pattern (``$`` matches before it)."""
    with pytest.raises(BadRequest):
        digest_from_parts(bad_hash, 1)
    with pytest.raises(BadRequest):
        parse_digests([re_pb2.Digest(hash=bad_hash, size_bytes=1)])


def test_parse_digests_lowers_hashes_and_keeps_the_empty_blob() -> None:
    parsed = parse_digests([re_pb2.Digest(hash=H.upper(), size_bytes=3),
                            re_pb2.Digest(hash=EMPTY_DIGEST.hash, size_bytes=0)])
    assert parsed == [digest_from_parts(H, 3), EMPTY_DIGEST]
    with pytest.raises(BadRequest):
        parse_digests([re_pb2.Digest(hash=H, size_bytes=0)])  # size 0 is the empty blob only
