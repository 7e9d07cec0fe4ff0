"""Pickles of the ``result`` column: what may be written, and what may be read back.

The column holds a pickle because stock Celery's ``PickleType`` column always did, so
stock clients of every 5.x version read our rows. A pickle is a program, though: unless
the app accepts pickle content, a row is only as trusted as everyone who can write to the
store. So, without pickle content:

- :func:`dump_restricted` pickles only what a JSON result could hold (plus the types
  kombu's JSON carries: datetime, date, time, Decimal, UUID, bytes);
- :func:`load_restricted` reads a pickle in two steps. :func:`check_opcodes` first walks
  the opcode stream and refuses *declared* sizes the payload does not carry: CPython
  3.11's C unpickler allocates ``BINBYTES``/``BINBYTES8``/``BYTEARRAY8`` buffers of the
  declared length before reading them, and grows its memo array to twice any
  ``PUT``/``LONG_BINPUT`` index, so a 15-byte pickle can cost 500-800 MB. Then the C
  unpickler runs with a :meth:`find_class` that hands out *value-only* constructors:
  ``bytearray(500000000)`` (a 30-byte pickle through ``REDUCE``), ``bytes(n)``,
  ``int("9" * n)``, ``set(range)``-like calls are refused because every constructor
  accepts only the value types the pickler itself passes (``bytearray(bytes)``,
  ``tuple(tuple)``, ...), and every copy a constructor makes is charged against a budget
  of the payload's own size, so re-using one memoised value in many calls cannot
  multiply memory either.

Everything here is pure (no I/O) and independent of Celery, so it is tested on its own.

Why one module: the writer (:class:`_JsonSafePickler`), the opcode pre-check and the
restricted reader (:class:`_JsonSafeUnpickler` and its constructor table) are one trust
boundary. The reader's allow-list must accept exactly what the writer emits, and the
opcode check must know which opcodes the reader lets through; kept side by side, a change
to one is reviewed against the other.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from datetime import time as dtime
from decimal import Decimal
from functools import partial
from typing import Any
from uuid import UUID, SafeUUID

from kombu.exceptions import EncodeError

__all__ = [
    "PICKLE_CONTENT_TYPE",
    "PICKLE_PROTOCOL",
    "UnsafePickleError",
    "check_opcodes",
    "dump_full",
    "dump_restricted",
    "is_pickle",
    "load_full",
    "load_restricted",
]

PICKLE_CONTENT_TYPE = "application/x-python-serialize"
PICKLE_PROTOCOL = 4


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle the restricted reader refuses (a type, a size or a memo index).

    The message names what was refused, never the payload's content.
    """


# ----------------------------------------------------------------------------- writing

#: Types pickled by their own reduction (exact types only; subclasses are refused).
_SAFE_TYPES: frozenset[type] = frozenset({
    set, frozenset, complex, bytearray, datetime, date, dtime, timedelta, timezone, UUID,
    Decimal, OrderedDict,
})

#: (module, name) pairs the restricted pickler may reference and the reader may resolve.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("builtins", n) for n in (
        "set", "frozenset", "complex", "bytearray", "int", "float", "str", "bytes", "dict",
        "list", "tuple", "bool")
} | {
    ("datetime", n) for n in ("datetime", "date", "time", "timedelta", "timezone")
} | {("uuid", "UUID"), ("uuid", "SafeUUID"), ("decimal", "Decimal"),
     ("collections", "OrderedDict")})


class _JsonSafePickler(pickle.Pickler):
    """Pickles only what a JSON result could hold (plus the types kombu's JSON adds).

    Subclasses of builtin containers/scalars (IntEnum, namedtuple, defaultdict)
    are stored as their base type, as JSON would; anything else is refused with
    the EncodeError Celery expects from a serializer.
    """

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _SAFE_TYPES:
            return NotImplemented
        if isinstance(obj, type):
            # classes referenced by the reductions above (set, int, dict, UUID, ...)
            if (obj.__module__, obj.__qualname__) in SAFE_GLOBALS:
                return NotImplemented
            raise EncodeError(f"cannot store the class {obj.__module__}.{obj.__qualname__} "
                              "with the json result_serializer")
        if isinstance(obj, bool):
            return bool, (bool(obj),)
        if isinstance(obj, int):
            return int, (int(obj),)
        if isinstance(obj, float):
            return float, (float(obj),)
        if isinstance(obj, str):
            return str, (str(obj),)
        if isinstance(obj, bytes):
            return bytes, (bytes(obj),)
        if isinstance(obj, tuple):
            return tuple, (tuple(obj),)
        if isinstance(obj, list):
            return list, (), None, iter(obj)
        if isinstance(obj, dict):
            return dict, (), None, None, iter(obj.items())
        if isinstance(obj, UUID):
            return UUID, (str(obj),)
        raise EncodeError(
            f"result of type {cls.__module__}.{cls.__qualname__} cannot be stored with "
            "the json result_serializer (accept pickle content to store arbitrary objects)"
        )


def dump_restricted(value: Any) -> bytes:
    """Pickle ``value`` with only JSON-able types (EncodeError for anything else)."""
    buf = io.BytesIO()
    _JsonSafePickler(buf, protocol=PICKLE_PROTOCOL).dump(value)
    return buf.getvalue()


def dump_full(value: Any) -> bytes:
    """Pickle anything (the app accepts pickle content)."""
    return pickle.dumps(value, protocol=PICKLE_PROTOCOL)


def load_full(payload: bytes) -> Any:
    """Unpickle anything (the app accepts pickle content, so it trusts its writers)."""
    return pickle.loads(payload)


def is_pickle(payload: bytes) -> bool:
    """Whether ``payload`` is a protocol 2-5 pickle (rather than serializer bytes)."""
    # protocol 2+ pickles start with PROTO <n>; msgpack maps start with 0x80..0x8f too,
    # but never with 0x80 followed by a small protocol number as a whole payload.
    return len(payload) > 2 and payload[0] == 0x80 and 2 <= payload[1] <= 5


# ----------------------------------------------------------------------------- opcode walk

# How to skip each opcode's argument: >= 0 fixed bytes (the common case, kept fastest);
# the negative kinds below need a look at the argument.
_NL = -1        # up to and including a newline
_NL2 = -2       # two newline-terminated lines (GLOBAL, INST)
_LEN1 = -3      # 1-byte length, then that many bytes
_LEN4 = -4      # 4-byte signed little-endian length (BINSTRING), then bytes
_LEN4U = -5     # 4-byte unsigned little-endian length, then bytes
_LEN8 = -6      # 8-byte unsigned little-endian length, then bytes
_BOUNDED = -7   # a fixed-size number that must not exceed the payload (LONG_BINPUT, FRAME)
_PUT_NL = -8    # PUT: a memo index in text, same bound
_STOP_OP = -9
_UNKNOWN = -100

_STOP = ord(".")
_LONG_BINPUT = ord("r")
_FRAME = 0x95

_ARG_KIND: list[int] = [_UNKNOWN] * 256
for _op in pickletools.opcodes:
    _arg = _op.arg
    _code = ord(_op.code.encode("latin-1"))
    if _arg is None:
        _ARG_KIND[_code] = 0
    elif _arg.name == "stringnl_noescape_pair":
        _ARG_KIND[_code] = _NL2
    elif _arg.n >= 0:
        _ARG_KIND[_code] = _arg.n
    elif _arg.n == pickletools.UP_TO_NEWLINE:
        _ARG_KIND[_code] = _NL
    elif _arg.n == pickletools.TAKEN_FROM_ARGUMENT1:
        _ARG_KIND[_code] = _LEN1
    elif _arg.n == pickletools.TAKEN_FROM_ARGUMENT4:
        _ARG_KIND[_code] = _LEN4
    elif _arg.n == pickletools.TAKEN_FROM_ARGUMENT4U:
        _ARG_KIND[_code] = _LEN4U
    elif _arg.n == pickletools.TAKEN_FROM_ARGUMENT8U:
        _ARG_KIND[_code] = _LEN8
del _op, _arg, _code
_ARG_KIND[_STOP] = _STOP_OP
_ARG_KIND[ord("p")] = _PUT_NL
_ARG_KIND[_LONG_BINPUT] = _BOUNDED
_ARG_KIND[_FRAME] = _BOUNDED
_BOUNDED_WIDTH = {_LONG_BINPUT: 4, _FRAME: 8}


def check_opcodes(data: bytes) -> None:
    """Refuse a pickle whose declared lengths or memo indices exceed what it carries.

    Walks the opcode stream without building anything (the arguments are skipped, not
    decoded). Raises :class:`UnsafePickleError` for an unknown opcode, a length running
    past the end, a memo index larger than the payload (each memoised object takes at
    least one byte, so a legitimate index never is), or a missing STOP.

    The common opcodes (fixed-size and 1-byte-length arguments) are skipped inline; the
    rarer kinds that need checks go through one helper each, which returns the offset
    after the argument (or -1 when the payload ends inside it).
    """
    n = len(data)
    kinds = _ARG_KIND
    i = 0
    while 0 <= i < n:
        kind = kinds[data[i]]
        i += 1
        if kind >= 0:
            i += kind
        elif kind == _LEN1:
            i = i + 1 + data[i] if i < n else -1
        elif kind == _STOP_OP:
            return
        elif kind <= _LEN4 and kind >= _LEN8:
            i = _skip_sized(data, i, kind)
        elif kind == _BOUNDED:
            i = _skip_bounded(data, i)
        elif kind == _UNKNOWN:
            raise UnsafePickleError(
                f"unknown pickle opcode 0x{data[i - 1]:02x} at offset {i - 1}")
        else:
            i = _skip_lines(data, i, kind)
    raise UnsafePickleError("pickle data was truncated (no STOP opcode)")


def _skip_sized(data: bytes, i: int, kind: int) -> int:
    """Skip a 4- or 8-byte length and its bytes, refusing a length the payload lacks."""
    n = len(data)
    width = 8 if kind == _LEN8 else 4
    size = int.from_bytes(data[i:i + width], "little", signed=(kind == _LEN4))
    i += width
    if size < 0 or size > n - i:
        raise UnsafePickleError(
            f"declared length {size} at offset {i - width - 1} exceeds the "
            f"{max(0, n - i)} bytes left in the payload")
    return i + size


def _skip_bounded(data: bytes, i: int) -> int:
    """Skip a LONG_BINPUT index or FRAME length, refusing one larger than the payload."""
    n = len(data)
    op = data[i - 1]
    width = _BOUNDED_WIDTH[op]
    value = int.from_bytes(data[i:i + width], "little")
    if value > n:
        what = "memo index" if op == _LONG_BINPUT else "frame length"
        raise UnsafePickleError(
            f"{what} {value} at offset {i - 1} exceeds the payload size {n}")
    return i + width


def _skip_lines(data: bytes, i: int, kind: int) -> int:
    """Skip newline-terminated arguments (two for GLOBAL/INST); check a PUT's memo index."""
    end = data.find(b"\n", i)
    if end < 0:
        return -1
    if kind == _PUT_NL:
        try:
            index = int(data[i:end])
        except ValueError:
            raise UnsafePickleError(f"bad PUT index at offset {i - 1}") from None
        if index > len(data):
            raise UnsafePickleError(
                f"memo index {index} at offset {i - 1} exceeds the payload size {len(data)}")
    if kind == _NL2:
        end = data.find(b"\n", end + 1)
        if end < 0:
            return -1
    return end + 1


# ----------------------------------------------------------------------------- reading


class _Budget:
    """Copies the value-only constructors may still make, in elements or bytes.

    A pickle written by :func:`dump_restricted` passes each constructor a value it has
    just written, so the sum of their sizes never exceeds the payload's length; a
    crafted one that feeds one memoised value to many copying calls runs out.
    """

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def charge(self, size: int, what: str) -> None:
        self.left -= size
        if self.left < 0:
            raise UnsafePickleError(
                f"refusing to unpickle: {what} would copy more data than the pickle holds")


def _refuse(what: str, args: tuple[Any, ...]) -> UnsafePickleError:
    kinds = ", ".join(type(a).__name__ for a in args)
    return UnsafePickleError(
        f"refusing to unpickle {what}({kinds}): only values, never sizes or conversions, "
        "may build an object when the app does not accept pickle content")


_CONTAINERS = (list, tuple, set, frozenset)


class _Scalar:
    """``cls()`` or ``cls(number)``: fixed-size results, nothing to charge."""

    __slots__ = ("name", "build", "accepts")

    def __init__(self, name: str, build: Callable[..., Any], accepts: tuple[type, ...]
                 ) -> None:
        self.name, self.build, self.accepts = name, build, accepts

    def __call__(self, budget: _Budget, *args: Any) -> Any:
        if not args:
            return self.build()
        if len(args) != 1 or type(args[0]) not in self.accepts:
            raise _refuse(self.name, args)
        self._charge(budget, args[0])
        return self.build(args[0])

    def _charge(self, budget: _Budget, value: Any) -> None:
        """Nothing: the result's size does not depend on the argument's."""


class _Sized(_Scalar):
    """``cls()`` or ``cls(value)`` where value is one of ``accepts``; the copy is charged."""

    __slots__ = ()

    def _charge(self, budget: _Budget, value: Any) -> None:
        budget.charge(len(value), self.name)


def _bytearray(budget: _Budget, *args: Any) -> bytearray:
    # protocol 3+: bytearray(b"..."); protocol 0-2: bytearray("...", "latin-1")
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        budget.charge(len(args[0]), "builtins.bytearray")
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] == "latin-1":
        budget.charge(len(args[0]), "builtins.bytearray")
        return bytearray(args[0], "latin-1")
    raise _refuse("builtins.bytearray", args)


def _complex(budget: _Budget, *args: Any) -> complex:
    if len(args) <= 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)
    raise _refuse("builtins.complex", args)


def _mapping(name: str, build: Callable[..., Any]) -> Callable[..., Any]:
    def construct(budget: _Budget, *args: Any) -> Any:
        if not args:
            return build()
        if len(args) == 1 and type(args[0]) in (dict, list, tuple):
            budget.charge(len(args[0]), name)
            return build(args[0])
        raise _refuse(name, args)
    return construct


def _decimal(budget: _Budget, *args: Any) -> Decimal:
    if len(args) == 1 and type(args[0]) in (str, int, float):
        value = args[0]
        budget.charge(len(value) if isinstance(value, str) else 8, "decimal.Decimal")
        return Decimal(value)
    raise _refuse("decimal.Decimal", args)


def _safe_uuid(budget: _Budget, *args: Any) -> SafeUUID:
    if len(args) == 1 and (args[0] is None or type(args[0]) is int):
        return SafeUUID(args[0])
    raise _refuse("uuid.SafeUUID", args)


#: The value-only constructors, called with the load's budget first.
_CONSTRUCTORS: dict[tuple[str, str], Callable[..., Any]] = {
    ("builtins", "bytes"): _Sized("builtins.bytes", bytes, (bytes,)),
    ("builtins", "str"): _Sized("builtins.str", str, (str,)),
    ("builtins", "list"): _Sized("builtins.list", list, _CONTAINERS),
    ("builtins", "tuple"): _Sized("builtins.tuple", tuple, _CONTAINERS),
    ("builtins", "set"): _Sized("builtins.set", set, _CONTAINERS),
    ("builtins", "frozenset"): _Sized("builtins.frozenset", frozenset, _CONTAINERS),
    ("builtins", "int"): _Scalar("builtins.int", int, (int, bool)),
    ("builtins", "bool"): _Scalar("builtins.bool", bool, (bool, int)),
    ("builtins", "float"): _Scalar("builtins.float", float, (float, int)),
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): _complex,
    ("builtins", "dict"): _mapping("builtins.dict", dict),
    ("collections", "OrderedDict"): _mapping("collections.OrderedDict", OrderedDict),
    ("decimal", "Decimal"): _decimal,
    ("uuid", "SafeUUID"): _safe_uuid,
}

#: Classes returned as themselves: their constructors and ``__new__`` build fixed-size
#: objects whatever the arguments (UUID needs a real class for NEWOBJ + BUILD).
_FIXED_SIZE_CLASSES: dict[tuple[str, str], type] = {
    ("datetime", "datetime"): datetime,
    ("datetime", "date"): date,
    ("datetime", "time"): dtime,
    ("datetime", "timedelta"): timedelta,
    ("datetime", "timezone"): timezone,
    ("uuid", "UUID"): UUID,
}
assert set(_CONSTRUCTORS) | set(_FIXED_SIZE_CLASSES) == SAFE_GLOBALS


class _JsonSafeUnpickler(pickle.Unpickler):
    """Resolves only :data:`SAFE_GLOBALS`, each to a value-only constructor."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(io.BytesIO(payload))
        self._size = len(payload)
        self._budget: _Budget | None = None

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        fixed = _FIXED_SIZE_CLASSES.get(key)
        if fixed is not None:
            return fixed
        construct = _CONSTRUCTORS.get(key)
        if construct is None:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: the app does not accept pickle "
                "content")
        if self._budget is None:
            self._budget = _Budget(self._size + 64)
        return partial(construct, self._budget)


def load_restricted(payload: bytes) -> Any:
    """Unpickle ``payload`` allowing only JSON-able values (see the module docstring).

    Raises :class:`UnsafePickleError` (a ``pickle.UnpicklingError``) for anything else.
    """
    check_opcodes(payload)
    return _JsonSafeUnpickler(payload).load()
