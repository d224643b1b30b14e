"""douane.headerfields reads and strips headers as mitmproxy's `Headers` does, in one pass."""

from __future__ import annotations

import pytest
from mitmproxy.http import Headers

from douane import headerfields

FIELDS = [(b"Host", b"api.example"), (b"Authorization", b"Bearer a"), (b"X-Api-Key", b"k1"),
          (b"authorization", b"Bearer b"), (b"Content-Type", b"application/json"),
          (b"X-Odd", b"caf\xc3\xa9 \xff")]


@pytest.mark.parametrize("name", ["authorization", "x-api-key", "content-type", "x-odd",
                                  "absent"])
def test_get_is_mitmproxys_get(name):
    headers = Headers(FIELDS)
    assert headerfields.get(headers, name.encode()) == headers.get(name)
    assert headerfields.get(headers, name.encode(), "dflt") == headers.get(name, "dflt")


def test_pop_is_mitmproxys_pop_for_each_name_and_leaves_the_rest_in_order():
    names = {b"authorization", b"x-api-key", b"proxy-authorization"}
    ours, theirs = Headers(FIELDS), Headers(FIELDS)
    removed = headerfields.pop(ours, names)
    assert removed == {name: v for name in names
                       if (v := theirs.pop(name.decode(), None)) is not None}
    assert removed[b"authorization"] == "Bearer a, Bearer b"  # every field of a name, folded
    assert ours.fields == theirs.fields


def test_pop_of_absent_names_leaves_the_fields_untouched():
    headers = Headers(FIELDS)
    before = headers.fields
    assert headerfields.pop(headers, {b"proxy-authorization"}) == {}
    assert headers.fields is before


def test_present_names_each_once_in_field_order():
    headers = Headers(FIELDS)
    assert headerfields.present(headers, {b"x-api-key", b"authorization", b"absent"}) == \
        [b"authorization", b"x-api-key"]


def test_a_read_after_a_change_sees_the_change():
    headers = Headers(FIELDS)
    assert headerfields.get(headers, b"x-api-key") == "k1"  # indexed
    headers["X-Api-Key"] = "k2"
    assert headerfields.get(headers, b"x-api-key") == "k2"
    headerfields.pop(headers, {b"x-api-key"})
    assert headerfields.get(headers, b"x-api-key") is None
    headers.add("x-api-key", "k3")
    assert headerfields.present(headers, {b"x-api-key"}) == [b"x-api-key"]
    headers.fields = ((b"Host", b"other"),)
    assert headerfields.get(headers, b"authorization") is None
    assert headerfields.get(headers, b"host") == "other"


@pytest.mark.parametrize("name", ["Authorization", "x-api-key", "X-New", "host"])
def test_put_is_mitmproxys_setitem(name):
    ours, theirs = Headers(FIELDS), Headers(FIELDS)
    headerfields.get(ours, b"host")  # indexed before the change
    headerfields.put(ours, name, "v\udcff")
    theirs[name] = "v\udcff"
    assert ours.fields == theirs.fields
    assert headerfields.get(ours, name.lower().encode()) == theirs.get(name)


def test_reads_after_puts_and_pops_are_mitmproxys_reads():
    """`put` and `pop` carry the index over to the fields they write: every read after them is
    what mitmproxy reads in the same fields."""
    ours = Headers(FIELDS)
    headerfields.put(ours, "X-New", "1")
    headerfields.pop(ours, {b"authorization"})
    headerfields.put(ours, "x-api-key", "k2")
    headerfields.put(ours, "Authorization", "Bearer c")
    headerfields.pop(ours, {b"x-odd", b"absent"})
    theirs = Headers(ours.fields)
    for name in ["host", "authorization", "x-api-key", "content-type", "x-odd", "x-new", "absent"]:
        assert headerfields.get(ours, name.encode()) == theirs.get(name)
    assert headerfields.present(ours, {b"x-new", b"authorization", b"host"}) == \
        headerfields.present(theirs, {b"x-new", b"authorization", b"host"})


def test_the_index_of_single_valued_fields_is_not_tracked_by_the_garbage_collector():
    """Every flow's headers are indexed; a tracked index (a list per name) was ~10 objects a
    request for each young collection to traverse until the flow's cycle is collected."""
    import gc

    headers = Headers(FIELDS[:3] + FIELDS[4:])
    assert headerfields.get(headers, b"content-type") == "application/json"
    indexes = [v for v in vars(headers).values() if isinstance(v, dict)]
    assert indexes and not any(gc.is_tracked(index) for index in indexes)
    headerfields.put(headers, "accept-encoding", "identity")
    assert not any(gc.is_tracked(v) for v in vars(headers).values() if isinstance(v, dict))
    assert headerfields.get(headers, b"accept-encoding") == "identity"
    many = Headers(FIELDS)  # a name given twice: its values folded as mitmproxy folds them
    assert headerfields.get(many, b"authorization") == many.get("authorization")
