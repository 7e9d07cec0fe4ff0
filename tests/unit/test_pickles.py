"""The restricted pickles of the ``result`` column (resultstore_backend.pickles).

What these prove: every value a JSON result can hold (plus kombu's datetime, date, time,
Decimal, UUID and bytes, and the types older rows may hold) round-trips; pickles that
allocate by a number instead of by content are refused before they allocate, with a
clear error and without the memory (tracemalloc peak); a control shows the same
measurement does see the allocation when the guard is not there, so the memory
assertions can fail.
"""

from __future__ import annotations

import collections
import enum
import math
import pickle
import struct
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from kombu.exceptions import EncodeError

from resultstore_backend.pickles import (
    SAFE_GLOBALS,
    UnsafePickleError,
    check_opcodes,
    dump_restricted,
    is_pickle,
    load_restricted,
)

MB = 1024 * 1024


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yield a list that receives the tracemalloc peak (bytes) of the block."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def refused(payload: bytes) -> tuple[str, int]:
    """Load ``payload``; it must be refused. Return (message, peak bytes)."""
    with peak_memory() as peak:
        with pytest.raises(UnsafePickleError) as info:
            load_restricted(payload)
    return str(info.value), peak[0]


# ----------------------------------------------------------------------------- legit values


class Color(enum.IntEnum):
    RED = 1


class Tag(str):
    pass


Point = collections.namedtuple("Point", "x y")

JSON_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**70, -(2**100), 1.5, -0.0, 1e308, "", "héllo ✓ 日本",
    "x" * 100_000, [], {}, [1, [2, [3, [4]]]], {"a": {"b": [None, 1.0, "c"]}},
    {"k": [{"deep": [[[]]]}] * 3}, list(range(1000)), {str(i): i for i in range(500)},
]
KOMBU_VALUES: list[Any] = [
    datetime(2026, 12, 1, 23, 59, 59, 123456), datetime.now(UTC),
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    date(2026, 2, 28), time(23, 0, 1, 5), time(1, 2, tzinfo=UTC),
    Decimal("3.14159265358979323846264338327950288"), Decimal("-1E+999999"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.uuid4(), b"", b"\x00\xff" * 500,
]
OLD_ROW_VALUES: list[Any] = [
    {1, 2, 3}, frozenset({"a"}), 1 + 2j, bytearray(b"abc"), bytearray(),
    collections.OrderedDict([("b", 1), ("a", 2)]), timedelta(days=3, microseconds=7),
    (1, (2, 3)), [set(), frozenset()],
]


@pytest.mark.parametrize("value", JSON_VALUES + KOMBU_VALUES + OLD_ROW_VALUES,
                         ids=lambda v: type(v).__name__)
def test_values_round_trip(value: Any) -> None:
    payload = dump_restricted(value)
    assert is_pickle(payload)
    back = load_restricted(payload)
    assert back == value and type(back) is type(value), f"{value!r:.80} came back as {back!r:.80}"


@pytest.mark.parametrize("protocol", [3, 4, 5])
@pytest.mark.parametrize("value", JSON_VALUES[:19] + KOMBU_VALUES + OLD_ROW_VALUES,
                         ids=lambda v: type(v).__name__)
def test_rows_pickled_by_stock_pickle_are_read(value: Any, protocol: int) -> None:
    """Rows written with plain pickle (older versions, stock clients) of safe types."""
    assert load_restricted(pickle.dumps(value, protocol=protocol)) == value


def test_nan_and_infinities_round_trip() -> None:
    back = load_restricted(dump_restricted([math.inf, -math.inf, math.nan]))
    assert back[:2] == [math.inf, -math.inf] and math.isnan(back[2])


def test_subclasses_are_stored_as_their_json_base_type() -> None:
    value = {"color": Color.RED, "tag": Tag("t"), "point": Point(1, 2),
             "counts": collections.defaultdict(int, a=1), "ids": collections.Counter("aa")}
    back = load_restricted(dump_restricted(value))
    assert back == {"color": 1, "tag": "t", "point": (1, 2), "counts": {"a": 1},
                    "ids": {"a": 2}}
    assert [type(back[k]) for k in ("color", "tag", "point", "counts", "ids")] == [
        int, str, tuple, dict, dict]


def test_shared_references_are_kept_and_cost_nothing_extra() -> None:
    inner = Point(1, 2)
    value = [inner] * 10_000  # memoised once: one tuple(...) call for 10 000 references
    back = load_restricted(dump_restricted(value))
    assert back == [(1, 2)] * 10_000 and back[0] is back[-1]


@pytest.mark.parametrize("value", [object(), print, type("X", (), {})(), pickle.Pickler,
                                   range(3), {1: object()}])
def test_other_objects_cannot_be_stored(value: Any) -> None:
    with pytest.raises(EncodeError, match="json result_serializer"):
        dump_restricted(value)


# ----------------------------------------------------------------------------- refused globals


def global_call(module: str, name: str, *args: bytes) -> bytes:
    """A protocol-2 pickle calling ``module.name(*args)``; args are opcode snippets."""
    body = b"".join(args)
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n(" + body
            + b"tR.")


def int_op(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def str_op(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("copyreg", "_reconstructor"), ("subprocess", "Popen"),
    ("builtins", "range"), ("builtins", "memoryview"), ("collections", "defaultdict"),
])
def test_globals_outside_the_allow_list_are_refused(module: str, name: str) -> None:
    message, _ = refused(global_call(module, name, str_op("id")))
    assert f"{module}.{name}" in message and "does not accept pickle content" in message


def test_the_allow_list_is_what_the_reader_resolves() -> None:
    assert ("builtins", "bytearray") in SAFE_GLOBALS
    assert not any(module in ("os", "subprocess", "posix") for module, _ in SAFE_GLOBALS)


# ----------------------------------------------------------------------------- size-driven calls

#: bytearray(500000000) through REDUCE: GLOBAL, BININT, TUPLE1, REDUCE, STOP
BOMB = b"\x80\x02cbuiltins\nbytearray\n" + int_op(500_000_000) + b"\x85R."


def test_the_30_byte_bytearray_bomb_is_refused_without_allocating() -> None:
    assert len(BOMB) <= 30, len(BOMB)
    message, peak = refused(BOMB)
    assert "builtins.bytearray(int)" in message and "never sizes" in message, message
    assert peak < 1 * MB, f"refusing the bomb traced {peak} bytes"


def test_control_the_measurement_sees_an_allocation_when_unguarded() -> None:
    """An unpickler that only allow-lists names (the old reader) allocates the size."""

    class NamesOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            assert (module, name) in SAFE_GLOBALS
            return super().find_class(module, name)

    import io
    payload = global_call("builtins", "bytearray", int_op(20 * MB))
    with peak_memory() as peak:
        value = NamesOnly(io.BytesIO(payload)).load()
        del value
    assert peak[0] >= 20 * MB, peak[0]


@pytest.mark.parametrize("module,name,args", [
    ("builtins", "bytes", [int_op(500_000_000)]),
    ("builtins", "bytearray", [str_op("x" * 10), str_op("utf-16")]),
    ("builtins", "str", [int_op(500_000_000)]),
    ("builtins", "str", [b"C\x03abc", str_op("utf-8")]),
    ("builtins", "int", [str_op("9" * 4000)]),
    ("builtins", "float", [str_op("1e5")]),
    ("builtins", "list", [int_op(10**8)]),
    ("builtins", "tuple", [str_op("abc")]),
    ("builtins", "set", [b"C\x03abc"]),
    ("builtins", "frozenset", [int_op(5)]),
    ("builtins", "dict", [int_op(5)]),
    ("builtins", "complex", [str_op("1+2j")]),
    ("collections", "OrderedDict", [int_op(5)]),
    ("decimal", "Decimal", [b"(K\x00(K\x01tK\x00t"]),
    ("uuid", "SafeUUID", [str_op("x")]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_constructors_take_values_not_sizes_or_conversions(module: str, name: str,
                                                           args: list[bytes]) -> None:
    message, peak = refused(global_call(module, name, *args))
    assert f"{module}.{name}(" in message, message
    assert peak < 1 * MB, peak


def test_reusing_one_memoised_value_in_many_copies_runs_out_of_budget() -> None:
    """list(L) a thousand times over one 20 000-element L: quadratic, refused."""
    items = b"]q\x00(" + b"K\x01" * 20_000 + b"e"          # L = [1] * 20000, memo 0
    call = b"cbuiltins\nlist\nq\x01"                        # memo 1: list constructor
    calls = (b"h\x01h\x00\x85R0") * 1000                    # list(L), pop; 1000 times
    payload = b"\x80\x02" + items + b"0" + call + b"0" + calls + b"N."
    message, peak = refused(payload)
    assert "would copy more data than the pickle holds" in message, message
    assert peak < 4 * MB, peak
    # the same list copied once is fine
    once = b"\x80\x02" + items + b"0" + call + b"0" + b"h\x01h\x00\x85R."
    assert load_restricted(once) == [1] * 20_000


# ----------------------------------------------------------------------------- declared sizes


def declared(op: bytes, size: int, width: int) -> bytes:
    return b"\x80\x05" + op + size.to_bytes(width, "little") + b"."


@pytest.mark.parametrize("name,payload", [
    ("BINBYTES", declared(b"B", 500_000_000, 4)),
    ("BINBYTES8", declared(b"\x8e", 500_000_000, 8)),
    ("BYTEARRAY8", declared(b"\x96", 500_000_000, 8)),
    ("BINUNICODE8", declared(b"\x8d", 2**62, 8)),
    ("BINSTRING", b"\x80\x02T" + struct.pack("<i", -5) + b"."),
    ("LONG_BINPUT", b"\x80\x04N" + b"r" + struct.pack("<I", 50_000_000) + b"."),
    ("PUT", b"\x80\x04Np50000000\n."),
    ("FRAME", b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N."),
])
def test_declared_sizes_beyond_the_payload_are_refused_before_allocating(
        name: str, payload: bytes) -> None:
    """CPython 3.11's C unpickler allocates these sizes (or a 2x memo) before reading."""
    message, peak = refused(payload)
    assert ("exceeds" in message or "declared length" in message), message
    assert peak < 1 * MB, f"{name}: {peak} bytes"


def test_control_plain_unpickler_allocates_declared_memo_and_bytes() -> None:
    """Shows the guard above is needed (and that the peak assertion can fail)."""
    for payload in (b"\x80\x04N" + b"r" + struct.pack("<I", 2_000_000) + b".",
                    declared(b"\x8e", 20 * MB, 8)):
        with peak_memory() as peak:
            try:
                pickle.loads(payload)
            except pickle.UnpicklingError:
                pass
        assert peak[0] >= 16 * MB, peak[0]


@pytest.mark.parametrize("payload", [b"\x80\x04N", b"\x80\x04\xff.", b"\x80\x04\x8c\x05ab",
                                     b"\x80\x02cbuiltins\nlist", b"\x80\x04X\x01\x00"])
def test_truncated_or_unknown_opcodes_are_refused(payload: bytes) -> None:
    with pytest.raises(UnsafePickleError):
        check_opcodes(payload)


def test_error_messages_never_quote_the_content() -> None:
    secret = "sk_live_do_not_print"
    payload = global_call("os", "system", str_op(secret))
    message, _ = refused(payload)
    assert secret not in message
    message, _ = refused(global_call("builtins", "int", str_op(secret)))
    assert secret not in message


def test_check_walks_every_legit_payload() -> None:
    for value in JSON_VALUES + KOMBU_VALUES + OLD_ROW_VALUES:
        check_opcodes(dump_restricted(value))
        for protocol in range(0, 6):
            check_opcodes(pickle.dumps(value, protocol=protocol))


