"""A check of a pickle from a peer, before any unpickler sees it.

CPython's C unpickler trusts the sizes and indices in its stream, so :mod:`molink.comm.codec`
runs :func:`check_pickle_stream` first: it parses the stream, building nothing, and refuses it
unless it is what codec's pickler writes, with every size and index within the message and what
unpickling it will allocate within a budget proportional to the message's length.
"""

from __future__ import annotations

import pickle
import pickletools
from typing import Any


class PeerDataError(pickle.UnpicklingError, ValueError):
    """Data from a peer that a decoder refused (malformed, lying about sizes, not allowed).

    Both a ``pickle.UnpicklingError`` and a ``ValueError``: every decoder in this module raises
    only this (or returns), so callers catching either one see every refusal.
    """


def clip(value: Any) -> str:
    """A short repr of a peer-chosen value, for error messages."""
    text = repr(value[:40] if isinstance(value, str | bytes) else value)
    return text if len(text) <= 80 else text[:77] + "..."


# CPython's C unpickler trusts the sizes and indices in the stream: a BINPUT/LONG_BINPUT memo index
# resizes the memo table to twice that index before anything is checked (a 9 KB message with an
# index of 2e9 asked for 32 GB), counted opcodes (BINBYTES8, BINUNICODE8, FRAME...) allocate their
# declared size before reading it, and nothing bounds how deep objects nest (hashing a tuple nested
# a million deep overflows the C stack). So the stream is parsed first, building nothing, and
# refused unless it is what _TensorPickler writes, with every size and index within the message
# and what the unpickler will allocate within a budget proportional to the message's length.

# What unpickling may allocate per byte of pickle, plus a constant. Python objects are larger than
# their opcodes (an empty set, one opcode byte, is a 216-byte object); real payloads are charged
# 15-36 bytes per byte, the most for many requests with short prompts, and allocate half that or
# less (tests/test_codec_fuzz.py keeps them under 60% of the budget).
PICKLE_ALLOC_PER_BYTE = 64
PICKLE_ALLOC_SLACK = 1024 * 1024
# Real payloads nest about 10 levels deep and MARKs about 4; a pickle has at most one opcode per
# byte, this bounds the pre-scan's work on a large (inflated) one.
_MAX_NESTING = 100
_MAX_PICKLE_OPS = 1 << 24

# What the pre-scan knows of each value: its kind ...
_SCALAR, _STR, _BYTES, _GLOBAL, _TUPLE, _FROZENSET, _OBJ, _ARRAY = range(8)
_LIST, _DICT, _SET, _DICT_OBJ = range(8, 12)  # the mutable ones
# ... and what it charges for the unpickler's allocations (or its own, whichever is larger: the
# passes run one after the other), upper bounds measured on CPython 3.11 that include object
# headers, GC links, hash-table slack and the stack and memo arrays.
_COST_COUNTED = 128  # a str, bytes or long, plus 8, 2, 2 bytes per byte (UTF-8 to UCS-4, copies)
_COST_NEW = {_LIST: 96, _DICT: 96, _SET: 256}
_COST_ITEM = {_LIST: 16, _DICT: 128, _DICT_OBJ: 320, _SET: 192}  # per item added (dict: per pair)
# A value's weight bounds what copying, iterating or repr-ing it allocates. An item of a list,
# dict, set or frozenset weighs _ITEM_WEIGHT more than its value: SamplingParams.__post_init__
# copies the fields below into a dict, a list and a set, about twice that per item.
_ITEM_WEIGHT = 128
COPIED_STRUCT_FIELDS = ("stop_token_ids", "bad_words")
_WEIGHT_CAP = 1 << 62

# What the pre-scan does for each opcode _TensorPickler writes: an action, its argument and the
# charge (when it doesn't depend on the data). Scalars are charged a stack slot, plus an int or a
# float unless they are cached ones. The 8-byte counted forms (BINBYTES8, BINUNICODE8,
# BYTEARRAY8) and LONG4 are only written for values larger than a message: they are refused with
# every other opcode (GLOBAL, INST, OBJ, BUILD, PUT/BINPUT/LONG_BINPUT, GET, EXT*, PERSID, POP,
# DUP, NEWOBJ_EX, the text opcodes).
(
    _A_REFUSE,
    _A_SCALAR,  # argument: its width
    _A_MEMOIZE,
    _A_GET,  # argument: the width of the index
    _A_STR,  # argument: the width of the length
    _A_BYTES,
    _A_LONG,
    _A_MARK,
    _A_TUPLE,  # argument: the number of items
    _A_POP_MARK,  # argument: the container filled or made from the items above the MARK
    _A_ADD,  # argument: the container (list: APPEND, dict: SETITEM)
    _A_EMPTY,  # argument: the container
    _A_EMPTY_TUPLE,
    _A_GLOBAL,
    _A_CALL,  # argument: 1 for NEWOBJ
    _A_PERSID,
    _A_FRAME,
    _A_STOP,
) = range(18)
_OPCODES: dict[bytes, tuple[int, int, int]] = {
    pickle.NONE: (_A_SCALAR, 0, 12),
    pickle.NEWTRUE: (_A_SCALAR, 0, 12),
    pickle.NEWFALSE: (_A_SCALAR, 0, 12),
    pickle.BININT1: (_A_SCALAR, 1, 12),
    pickle.BININT2: (_A_SCALAR, 2, 48),
    pickle.BININT: (_A_SCALAR, 4, 48),
    pickle.BINFLOAT: (_A_SCALAR, 8, 48),
    pickle.MEMOIZE: (_A_MEMOIZE, 0, 24),
    pickle.BINGET: (_A_GET, 1, 16),
    pickle.LONG_BINGET: (_A_GET, 4, 16),
    pickle.SHORT_BINUNICODE: (_A_STR, 1, _COST_COUNTED),
    pickle.BINUNICODE: (_A_STR, 4, _COST_COUNTED),
    pickle.SHORT_BINBYTES: (_A_BYTES, 1, _COST_COUNTED),
    pickle.BINBYTES: (_A_BYTES, 4, _COST_COUNTED),
    pickle.LONG1: (_A_LONG, 1, _COST_COUNTED),
    pickle.MARK: (_A_MARK, 0, 48),
    pickle.TUPLE1: (_A_TUPLE, 1, 136),
    pickle.TUPLE2: (_A_TUPLE, 2, 144),
    pickle.TUPLE3: (_A_TUPLE, 3, 152),
    pickle.TUPLE: (_A_POP_MARK, _TUPLE, 128),
    pickle.FROZENSET: (_A_POP_MARK, _FROZENSET, 256),
    pickle.APPENDS: (_A_POP_MARK, _LIST, 0),
    pickle.SETITEMS: (_A_POP_MARK, _DICT, 0),
    pickle.ADDITEMS: (_A_POP_MARK, _SET, 0),
    pickle.APPEND: (_A_ADD, _LIST, 0),
    pickle.SETITEM: (_A_ADD, _DICT, 0),
    pickle.EMPTY_LIST: (_A_EMPTY, _LIST, _COST_NEW[_LIST]),
    pickle.EMPTY_DICT: (_A_EMPTY, _DICT, _COST_NEW[_DICT]),
    pickle.EMPTY_SET: (_A_EMPTY, _SET, _COST_NEW[_SET]),
    pickle.EMPTY_TUPLE: (_A_EMPTY_TUPLE, 0, 16),
    pickle.STACK_GLOBAL: (_A_GLOBAL, 0, 128),
    pickle.REDUCE: (_A_CALL, 0, 0),
    pickle.NEWOBJ: (_A_CALL, 1, 0),
    pickle.BINPERSID: (_A_PERSID, 0, 512),
    pickle.FRAME: (_A_FRAME, 0, 0),
    pickle.STOP: (_A_STOP, 0, 0),
}
_OP_TABLE = [_OPCODES.get(bytes([op]), (_A_REFUSE, 0, 0)) for op in range(256)]


class _Node:
    """A value the unpickler would build: its kind, nesting depth and weight.

    ``info`` is the raw text of a short string, the length of bytes, the items of a tuple, or the
    call policy of a global. A mutable container is ``sealed`` once it is inside another value and
    may not change after that: a real pickle fills a container before using it, and changing it
    later could make a cycle or deepen what holds it.
    """

    __slots__ = ("kind", "depth", "weight", "info", "sealed")

    def __init__(self, kind: int, depth: int, weight: int, info: Any = None) -> None:
        self.kind = kind
        self.depth = depth
        self.weight = weight
        self.info = info
        self.sealed = False


_SCALAR_NODE = _Node(_SCALAR, 0, 8)
_EMPTY_TUPLE_NODE = _Node(_TUPLE, 1, 16, ())


def _refuse(pos: int, why: str) -> PeerDataError:
    return PeerDataError(f"refusing pickle at byte {pos}: {why}")


def check_pickle_stream(
    data: bytes, budget: int, global_calls: dict[tuple[str, str], tuple[str, Any]]
) -> int:
    """Check a pickle from a peer before :class:`RestrictedUnpickler` sees it.

    CPython's C unpickler preallocates memo tables and counted buffers from sizes in the stream,
    and nests objects as deep as the stream says. This parses the stream, running nothing, and
    raises :class:`PeerDataError` unless every opcode is one _TensorPickler writes, every length
    fits in what is left of the message, every memo index refers to an earlier MEMOIZE, globals
    are allowlisted and called only as _TensorPickler calls them, containers are filled before
    they are used, values nest at most ``_MAX_NESTING`` deep, and what the unpickler will
    allocate (charged per opcode) stays within ``budget`` bytes. Returns the bytes charged.
    """
    end = len(data)
    if end < 3 or data[0] != pickle.PROTO[0] or data[1] not in (4, 5):
        raise _refuse(0, "not a protocol 4/5 pickle")
    pos = 2
    stack: list[_Node] = []
    memo: list[_Node] = []
    marks: list[int] = []  # stack lengths at the open MARKs
    fence = 0  # the stack length at the last MARK: nothing below it may be popped
    cost = 0
    ops = 0
    push = stack.append
    table = _OP_TABLE
    while True:
        if pos >= end:
            raise _refuse(pos, "truncated")
        if cost > budget or ops > _MAX_PICKLE_OPS:
            raise _refuse(pos, f"would allocate more than {budget} bytes or run too long")
        start = pos
        op = data[pos]
        pos += 1
        ops += 1
        action, arg, charge = table[op]
        cost += charge
        if action == _A_SCALAR:
            pos += arg
            push(_SCALAR_NODE)
        elif action == _A_MEMOIZE:
            if len(stack) <= fence:
                raise _refuse(start, "MEMOIZE of nothing")
            memo.append(stack[-1])
        elif action == _A_GET:
            index = int.from_bytes(data[pos : pos + arg], "little")
            pos += arg
            if index >= len(memo) or pos > end:
                raise _refuse(start, f"memo index {index} of {len(memo)}")
            push(memo[index])
        elif action == _A_MARK:
            if len(marks) >= _MAX_NESTING:
                raise _refuse(start, "MARKs nested too deep")
            fence = len(stack)
            marks.append(fence)
        elif action == _A_EMPTY:
            push(_Node(arg, 1, 16))
        elif action == _A_POP_MARK:
            if not marks:
                raise _refuse(start, "no MARK")
            mark = marks.pop()
            fence = marks[-1] if marks else 0
            items = tuple(stack[mark:])
            del stack[mark:]
            if arg in (_TUPLE, _FROZENSET):
                push(_container(start, arg, items))
                cost += (8 if arg == _TUPLE else 256) * len(items)
            elif mark <= fence:
                raise _refuse(start, "stack underflow")
            elif arg == _DICT and len(items) % 2:
                raise _refuse(start, "odd number of SETITEMS items")
            else:
                cost += _add_items(start, stack[mark - 1], arg, items)
        elif action in (_A_STR, _A_BYTES, _A_LONG):
            size = int.from_bytes(data[pos : pos + arg], "little")
            pos += arg + size
            if pos > end:
                raise _refuse(start, f"length {size} runs past the end of the message")
            if action == _A_STR:  # decoding may take 4 bytes a character, and a copy or two
                push(_Node(_STR, 0, 16 + 10 * size, data[pos - size : pos] if size < 256 else None))
                cost += 8 * size
            else:
                push(_Node(_BYTES if action == _A_BYTES else _SCALAR, 0, 16 + 4 * size, size))
                cost += 2 * size
        elif action == _A_TUPLE:
            if len(stack) - arg < fence:
                raise _refuse(start, "stack underflow")
            items = tuple(stack[-arg:])
            del stack[-arg:]
            push(_container(start, _TUPLE, items))
        elif action == _A_ADD:
            n = 1 if arg == _LIST else 2
            if len(stack) - n <= fence:
                raise _refuse(start, "stack underflow")
            items = tuple(stack[-n:])
            del stack[-n:]
            cost += _add_items(start, stack[-1], arg, items)
        elif action == _A_EMPTY_TUPLE:
            push(_EMPTY_TUPLE_NODE)
        elif action == _A_GLOBAL:
            if len(stack) - 2 < fence:
                raise _refuse(start, "stack underflow")
            name, module = stack.pop(), stack.pop()
            if module.kind != _STR or name.kind != _STR or module.info is None or not name.info:
                raise _refuse(start, "STACK_GLOBAL of something other than two names")
            key = (module.info.decode("utf-8", "replace"), name.info.decode("utf-8", "replace"))
            policy = global_calls.get(key)
            if policy is None:
                raise _refuse(start, f"global {clip(key[0])}.{clip(key[1])} is not allowed")
            push(_Node(_GLOBAL, 0, 128, policy))
        elif action == _A_CALL:
            if len(stack) - 2 < fence:
                raise _refuse(start, "stack underflow")
            args = stack.pop()
            node, charge = _call(start, stack.pop(), args, arg == 1, budget)
            push(node)
            cost += charge
        elif action == _A_PERSID:
            if len(stack) - 1 < fence:
                raise _refuse(start, "stack underflow")
            push(_persistent(start, stack.pop()))
            cost += 2 * stack[-1].info
        elif action == _A_FRAME:
            size = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
            if pos + size > end:
                raise _refuse(start, f"frame of {size} bytes runs past the end of the message")
            cost += size
        elif action == _A_STOP:
            if cost > budget:
                raise _refuse(start, f"would allocate more than {budget} bytes")
            if len(stack) != 1 or marks:
                raise _refuse(start, "STOP with a malformed stack")
            if pos != end:
                raise _refuse(pos, "data after STOP")
            return cost
        else:
            known = pickletools.code2op.get(chr(op))
            raise _refuse(start, f"opcode {known.name if known else hex(op)} is not accepted")


def _container(pos: int, kind: int, items: tuple[_Node, ...]) -> _Node:
    """The node of a new tuple or frozenset of ``items`` (which are sealed)."""
    depth = 0
    weight = 16
    per_item = 0 if kind == _TUPLE else _ITEM_WEIGHT
    for item in items:
        if item.kind >= _LIST:
            item.sealed = True
        if item.depth > depth:
            depth = item.depth
        weight += per_item + item.weight
    if depth >= _MAX_NESTING:
        raise _refuse(pos, "values nested too deep")
    return _Node(kind, depth + 1, min(weight, _WEIGHT_CAP), items if kind == _TUPLE else None)


def _add_items(pos: int, target: _Node, kind: int, items: tuple[_Node, ...]) -> int:
    """``items`` appended (set, added) to ``target``; returns what the unpickler allocates."""
    if target.kind != kind and not (kind == _DICT and target.kind == _DICT_OBJ):
        raise _refuse(pos, "adding items to a value that is not a container of that kind")
    depth = 0
    weight = 0
    for item in items:
        if item.kind >= _LIST:
            item.sealed = True
        if item.depth > depth:
            depth = item.depth
        weight += _ITEM_WEIGHT + item.weight
    if target.sealed:  # also refuses adding a container to itself
        raise _refuse(pos, "container changed after it was used")
    if depth >= _MAX_NESTING:
        raise _refuse(pos, "values nested too deep")
    target.depth = max(target.depth, depth + 1)
    target.weight = min(target.weight + weight, _WEIGHT_CAP)
    return _COST_ITEM[target.kind] * (len(items) // 2 if kind == _DICT else len(items))


def _call(pos: int, func: _Node, args: _Node, newobj: bool, budget: int) -> tuple[_Node, int]:
    """The node REDUCE/NEWOBJ builds from ``func(*args)``, and what building it allocates."""
    if func.kind != _GLOBAL or args.kind != _TUPLE:
        raise _refuse(pos, "call of something other than an allowlisted global")
    if args.depth >= _MAX_NESTING:
        raise _refuse(pos, "values nested too deep")
    policy, size = func.info
    items = args.info
    node = _Node(_OBJ, args.depth + 1, min(64 + args.weight, _WEIGHT_CAP))
    if newobj:
        if policy == "namedtuple" and len(items) == size:
            return node, 128 + 16 * size
    elif policy == "rebuild":
        cls, values = items if len(items) == 2 else (_SCALAR_NODE, _SCALAR_NODE)
        if (
            cls.kind == _GLOBAL
            and cls.info[0] == "dataclass"
            and values.kind == _TUPLE
            and len(values.info) == cls.info[1]
        ):
            return node, 256 + 64 * len(values.info)
    elif policy == "enum":
        if len(items) == 1 and items[0].kind in (_SCALAR, _STR):
            return node, 128  # a member that exists (an error message repeats the value once)
    elif policy == "namedtuple":
        if len(items) == size:
            return node, 128 + 16 * size
    elif policy == "dict":
        if not items or (len(items) == 1 and items[0].kind in (_GLOBAL, _SCALAR)):
            node.kind = _DICT_OBJ
            return node, 512
    elif policy == "struct" and 4 * args.weight <= budget:
        # Its __init__ runs: it copies some fields (twice their weight), and may repr any one
        # argument in an error message (so one reached a million times over is refused).
        return node, 1024 + sum(2 * items[i].weight for i in size if i < len(items))
    raise _refuse(pos, f"{'NEWOBJ' if newobj else 'REDUCE'} of a {policy} global this way")


def _persistent(pos: int, pid: _Node) -> _Node:
    """The node of a tensor or array: ``(kind, dtype, shape, raw bytes)``, see _TensorPickler."""
    items = pid.info if pid.kind == _TUPLE else ()
    if not (
        len(items) == 4
        and items[0].kind == _STR
        and items[0].info in (b"tensor", b"ndarray")
        and items[1].kind == _STR
        and items[2].kind == _TUPLE
        and all(d.kind == _SCALAR for d in items[2].info)
        and items[3].kind == _BYTES
    ):
        raise _refuse(pos, "malformed persistent id")
    size = items[3].info
    return _Node(_ARRAY, 1, min(64 + 512 * size, _WEIGHT_CAP), size)
