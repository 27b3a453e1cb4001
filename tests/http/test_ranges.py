"""The Range header parser (``app.http.ranges.select``): RFC 9110 §14 for one range,
everything else the whole body."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from app.errors import RangeNotSatisfiable
from app.http.ranges import ByteRange, response_headers, select

SIZE = 1000


@pytest.mark.parametrize("header,expected", [
    ("bytes=0-499", (0, 500)),
    ("bytes=500-999", (500, 500)),
    ("bytes=500-5000", (500, 500)),
    ("bytes=999-", (999, 1)),
    ("bytes=-1", (999, 1)),
    ("bytes=-1000", (0, 1000)),
    ("bytes=-99999999999999999999999999", (0, 1000)),
    ("Bytes=10-10", (10, 1)),
    ("bytes=,10-10,", (10, 1)),
    (" bytes=10-19 , ", (10, 10)),
    ("bytes=0-0", (0, 1)),
    ("bytes=00010-00019", (10, 10)),
    ("bytes=" + "0" * 40 + "-" + "0" * 40 + "1", (0, 2)),
])
def test_one_range(header: str, expected: tuple[int, int]) -> None:
    assert select("GET", header, None, SIZE) == ByteRange(*expected, SIZE)


@pytest.mark.parametrize("header", [
    "bytes=0-1,2-3", "bytes=10-5", "bytes=-", "bytes=", "bytes", "items=0-1", "bytes=a-b", "bytes=1-2-3",
    "bytes=0x1-2", "bytes=\u0661-2", "bytes = 0-1", "bytes=+1-2", "bytes=1 -2", "",
])
def test_whole_body(header: str) -> None:
    assert select("GET", header, None, SIZE) is None


@pytest.mark.parametrize("header,size", [
    ("bytes=1000-", 1000), ("bytes=1000-1000", 1000), ("bytes=-0", 1000), ("bytes=0-", 0),
    ("bytes=-0", 0), ("bytes=" + "9" * 5000 + "-", 1000),
])
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        select("GET", header, None, size)
    assert caught.value.http_status == 416 and caught.value.size == size


def test_only_get_and_no_if_range() -> None:
    assert select("HEAD", "bytes=0-1", None, SIZE) is None
    assert select("GET", "bytes=0-1", '"etag"', SIZE) is None
    assert select("GET", None, None, SIZE) is None
    assert select("GET", "bytes=-5", None, 0) is None  # an empty body has no suffix to name


def test_response_headers() -> None:
    assert response_headers(None) == [("Accept-Ranges", "bytes")]
    assert response_headers(ByteRange(10, 5, 100)) == [("Accept-Ranges", "bytes"),
                                                       ("Content-Range", "bytes 10-14/100")]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="bytes=-,0123456789 \t\u0661xB", max_size=30), st.integers(0, 10_000))
def test_any_header_is_whole_a_range_inside_or_416(header: str, size: int) -> None:
    try:
        chosen = select("GET", header, None, size)
    except RangeNotSatisfiable:
        return
    if chosen is not None:
        assert 0 <= chosen.start and chosen.length >= 1 and chosen.start + chosen.length <= size


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 3000), st.one_of(st.none(), st.integers(0, 3000)), st.integers(0, 2000))
def test_first_last_agrees_with_the_rfc(first: int, last: int | None, size: int) -> None:
    header = f"bytes={first}-{'' if last is None else last}"
    if last is not None and last < first:
        assert select("GET", header, None, size) is None
    elif first >= size:
        with pytest.raises(RangeNotSatisfiable):
            select("GET", header, None, size)
    else:
        end = size - 1 if last is None else min(last, size - 1)
        assert select("GET", header, None, size) == ByteRange(first, end - first + 1, size)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 2000))
def test_suffix_agrees_with_the_rfc(suffix: int, size: int) -> None:
    header = f"bytes=-{suffix}"
    if suffix == 0:
        with pytest.raises(RangeNotSatisfiable):
            select("GET", header, None, size)
    elif size == 0:
        assert select("GET", header, None, size) is None
    else:
        length = min(suffix, size)
        assert select("GET", header, None, size) == ByteRange(size - length, length, size)
