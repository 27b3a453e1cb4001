"""HTTP Range reads (RFC 9110 §14): the one reading of a ``Range`` header and the headers
of the answer, shared by the blueprints (``app.http.bodies.artifact_response``) and the
download fast path (``app.http.fast_reads``).

What is served:

- one range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) of a GET → 206 with
  ``Content-Range: bytes first-last/size``, a last position past the end is cut to it and a
  suffix longer than the body is the whole body;
- a range that starts at or past the end (``bytes=-0`` too) → 416 with
  ``Content-Range: bytes */size`` (:class:`app.errors.RangeNotSatisfiable`);
- everything else → the whole body with 200, as RFC 9110 allows: several ranges, a header
  that does not parse, another unit, ``If-Range`` (no validator of ours can match it: we
  send neither ``ETag`` nor ``Last-Modified``), a method other than GET, an empty body asked
  for by suffix (``bytes */0`` is the only way to name its extent).

Every hit, ranged or not, says ``Accept-Ranges: bytes``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from app.errors import RangeNotSatisfiable
from app.storage.keys import decimal_value

ACCEPT_RANGES = ("Accept-Ranges", "bytes")
# A position larger than any body: longer digit strings are read as "past the end"
# without ever converting them (see app.storage.keys.decimal_value).
_FAR = 2**63 - 1
_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
_OWS = " \t"


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes from ``start`` of a body of ``size`` bytes (``length`` ≥ 1)."""

    start: int
    length: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{self.size}"


def unsatisfied_content_range(size: int) -> str:
    return f"bytes */{size}"


def _position(digits: str) -> int:
    value = decimal_value(digits.lstrip("0") or "0", _FAR)
    return _FAR if value is None else value


def select(method: str, range_header: str | None, if_range: str | None, size: int) -> ByteRange | None:
    """The single range a request asks of a body of ``size`` bytes, or None for the whole
    body; ``RangeNotSatisfiable`` when the range lies past its end (module docstring)."""
    if method != "GET" or range_header is None or if_range is not None:
        return None
    unit, sep, ranges = range_header.strip(_OWS).partition("=")
    if not sep or unit.lower() != "bytes":
        return None
    specs = [part.strip(_OWS) for part in ranges.split(",")]
    specs = [part for part in specs if part]  # empty list elements are allowed (RFC 9110 §5.6.1)
    if len(specs) != 1:
        return None
    match = _SPEC.fullmatch(specs[0])
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None  # "bytes=-": no range at all
        suffix = _position(last)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        if size == 0:
            return None
        length = min(suffix, size)
        return ByteRange(size - length, length, size)
    start = _position(first)
    end = _position(last) if last else _FAR
    if end < start:
        return None  # an invalid range-spec: the header is ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, min(end, size - 1) - start + 1, size)


def response_headers(byte_range: ByteRange | None) -> list[tuple[str, str]]:
    """The range headers of a hit: ``Accept-Ranges`` always, ``Content-Range`` on a 206."""
    if byte_range is None:
        return [ACCEPT_RANGES]
    return [ACCEPT_RANGES, ("Content-Range", byte_range.content_range)]


def status(byte_range: ByteRange | None) -> int:
    return 200 if byte_range is None else 206


def extent(byte_range: ByteRange | None, size: int) -> tuple[int, int]:
    """``(start, length)`` of the bytes an answer sends: the range, or the whole body."""
    return (0, size) if byte_range is None else (byte_range.start, byte_range.length)
