"""One checked walk over a pickle's opcodes: nothing is built, imported or run, and the walk is linear in the
stream. It is the first step for every pickle normcli reads (the reader's :func:`normcli.safe_pickle.safe_load`)
and the whole of what the trust verdict reads (:mod:`normcli.trust`), so both see the same opcodes with the
same checks:

- the nesting depth of containers, tuples and marks (``pickle_depth``), checked here so that no unpickler
  (whose C code hashes a deeply nested tuple recursively) ever sees a stream nested past it;
- memo indices: read only after they were written, written densely (no sparse memo to confuse readers);
- a budget of objects and references the stream would build, growing with its length (``pickle_items_base``
  plus ``pickle_items_per_byte`` per byte), so a few bytes of memo references cannot become gigabytes;
- the opcodes: no extension registry (EXT*), no out-of-band buffers, no text persistent ids, no INST/OBJ
  (torch writes none of these);
- every global the stream names, and how it is used (kept as a value, called by REDUCE, instantiated by
  NEWOBJ/INST/OBJ, given state by BUILD, the result of a call called again, or named through something that
  is not two constant strings), for :func:`normcli.trust.classify`.

Speed: the opcodes are decoded from one table indexed by the opcode byte (argument sizes from pickletools'
descriptions), the symbolic stack holds integers in compact arrays (no object per opcode), and a run of one
opcode repeated (a memo reference, an empty container, a mark), the shape of every expansion bomb, is taken
in one step. No torch, no numpy.
"""

from __future__ import annotations

import array
import codecs
import hashlib
import io
import pickletools
from typing import Any

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits


class PickleRefused(NormcliError):
    """A pickle that torch never writes: the message says what was found; the reader adds the file name."""


# Opcodes no torch format needs: the extension registry (EXT*: copyreg lookups by number), out-of-band
# buffers (protocol 5), text persistent ids (torch writes BINPERSID), and protocol-0/1 instantiation.
FORBIDDEN_OPCODES = {
    "EXT1": "extension-registry", "EXT2": "extension-registry", "EXT4": "extension-registry",
    "NEXT_BUFFER": "out-of-band buffer", "READONLY_BUFFER": "out-of-band buffer",
    "PERSID": "text persistent id", "INST": "INST instantiation", "OBJ": "OBJ instantiation",
}
DYNAMIC = "<computed global>"
# What one new object costs against the budget, in references (a container is ~8 pointers of memory).
_OBJECT_COST = 8


class PickleWalk:
    """What one opcode walk found: the globals in order of first appearance, how each is used, and the
    stream's span."""

    __slots__ = ("globals", "start", "end", "persistent_ids", "uses")

    def __init__(self, globals_: list[str], start: int, end: int, persistent_ids: int, uses: dict):
        self.globals, self.start, self.end, self.persistent_ids, self.uses = globals_, start, end, persistent_ids, uses


# Categories of opcodes, one table entry per opcode byte
(_GENERIC, _GET, _PUT, _MEMOIZE, _MARK, _POP_MARK, _DUP, _FRAME, _MODIFY, _STACK_GLOBAL, _STOP, _GLOBAL,
 _PROTO, _CALL, _POP, _BUILD, _INST, _OBJ, _EXT, _OTHER_FORBIDDEN) = range(20)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
_NAMED = {"MEMOIZE": _MEMOIZE, "MARK": _MARK, "POP_MARK": _POP_MARK, "DUP": _DUP, "FRAME": _FRAME,
          "STACK_GLOBAL": _STACK_GLOBAL, "STOP": _STOP, "GLOBAL": _GLOBAL, "PROTO": _PROTO, "REDUCE": _CALL,
          "NEWOBJ": _CALL, "NEWOBJ_EX": _CALL, "POP": _POP, "BUILD": _BUILD, "INST": _INST, "OBJ": _OBJ,
          "EXT1": _EXT, "EXT2": _EXT, "EXT4": _EXT, "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
          "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "APPEND": _MODIFY, "APPENDS": _MODIFY,
          "SETITEM": _MODIFY, "SETITEMS": _MODIFY, "ADDITEMS": _MODIFY}
_TABLE: list = [None] * 256
for _op in pickletools.opcodes:
    _before = [s.name for s in _op.stack_before]
    _n_pop = sum(1 for s in _before if s not in ("mark", "stackslice"))
    _cat = _NAMED.get(_op.name, _OTHER_FORBIDDEN if _op.name in FORBIDDEN_OPCODES else _GENERIC)
    _TABLE[ord(_op.code)] = (
        _op.name, _cat, _op.arg.n if _op.arg is not None else None, _n_pop, "stackslice" in _before,
        len(_op.stack_after), _op.name in _STRING_OPS, _op.name in ("APPENDS", "SETITEMS", "ADDITEMS"),
        2 if _op.name == "SETITEM" else 1,
        # a run of this opcode with the same argument can be taken in one step: it pushes one new leaf (or the
        # same memo entry, or a mark) and reads nothing from the stack
        _cat in (_GET, _MARK) or (_cat == _GENERIC and _n_pop == 0 and "stackslice" not in _before
                                  and len(_op.stack_after) == 1 and _op.name not in _STRING_OPS
                                  and (_op.arg is None or _op.arg.n >= 0)))
_LENGTH_BYTES = {-2: 1, -3: 4, -4: 4, -5: 8}
_USE_OF = {"REDUCE": "reduce", "NEWOBJ": "newobj", "NEWOBJ_EX": "newobj", "OBJ": "inst", "INST": "inst"}
_NEVER = 1 << 62
_LEAF1 = frozenset(b"N)]}\x88\x89\x8f")  # NONE, EMPTY_TUPLE/LIST/DICT, NEWTRUE, NEWFALSE, EMPTY_SET
_PERIOD_CHECK = 256   # ops between two looks for a repeating stretch of bytes
_MAX_PERIOD = 16      # bytes
_TOP = 64             # stack entries compared to tell that a period left the stack as it found it


def _run_end(buf, pos: int, end: int, chunk: bytes) -> int:
    """Where the run of ``chunk`` repeated from ``pos`` ends: compared a block at a time (blocks of up to
    64 KiB, then halving), so the cost is a few slice comparisons and the memory one block."""
    width = len(chunk)
    block = chunk * max(1, (1 << 16) // width)
    while len(block) >= width:
        size = len(block)
        while pos + size <= end and buf[pos:pos + size] == block:
            pos += size
        block = block[:(size // width // 2) * width]
    return pos


def _buffer(stream) -> tuple[Any, int, int]:
    """(bytes-like view of the whole stream, position, length) without copying where the stream allows."""
    pos = stream.tell()
    if isinstance(stream, io.BytesIO):
        buf = stream.getvalue()  # one copy of the pickle: bytes can be searched and sliced cheaply
        return buf, pos, len(buf)
    mm = getattr(stream, "mm", None)  # the readers' mmap-backed streams
    if mm is not None:
        return mm, pos, len(mm)
    data = stream.read()
    stream.seek(pos)
    return data, 0, len(data)


# The last few walks that succeeded, by the pickle's bytes and the limits: inspect judges a file's pickles
# (the verdict) and then reads them (the reader), and the second walk over the same bytes is not done again.
_CACHE: dict[tuple, PickleWalk] = {}
_CACHE_MIN_BYTES = 1 << 16


def walk_pickle(stream, limits: Limits = DEFAULT_LIMITS, size: int | None = None,
                uses: dict[str, set[str]] | None = None) -> PickleWalk:
    """Check one pickle from ``stream``'s position to its STOP without building anything; leave the stream
    at the STOP's end. Raises PickleRefused or LimitExceeded naming what was wrong; the globals named and
    their uses up to that point are in ``uses`` when the caller passes a dict (a real unpickler would have
    run every REDUCE it reached before failing)."""
    buf, pos, end = _buffer(stream)
    base_offset = stream.tell() - pos  # 0 except for streams read into a copy
    key = None
    if isinstance(stream, io.BytesIO) and pos == 0 and end >= _CACHE_MIN_BYTES:
        key = (hashlib.blake2b(buf, digest_size=16).digest(), end, limits.pickle_depth, limits.pickle_items_base,
               limits.pickle_items_per_byte)
        hit = _CACHE.get(key)
        if hit is not None:
            if uses is not None:
                for name, u in hit.uses.items():
                    uses.setdefault(name, set()).update(u)
            stream.seek(hit.end)
            return PickleWalk(list(hit.globals), hit.start, hit.end, hit.persistent_ids, hit.uses)
    walk = _walk(buf, pos, end, limits, base_offset, {} if uses is None else uses)
    stream.seek(walk.end)
    if key is not None:
        if len(_CACHE) >= 4:
            _CACHE.clear()
        _CACHE[key] = walk
    return walk


def _decode_string(name: str, raw: bytes) -> str:
    if name == "UNICODE":
        return raw.decode("raw-unicode-escape", "replace")
    if name == "STRING":  # a repr: quotes and escapes
        raw = raw.strip()
        if len(raw) >= 2 and raw[:1] == raw[-1:] and raw[:1] in (b"'", b'"'):
            raw = raw[1:-1]
        try:
            return codecs.escape_decode(raw)[0].decode("latin-1")
        except ValueError:
            return raw.decode("latin-1")
    return raw.decode("utf-8", "replace") if name.endswith("UNICODE") or name == "BINUNICODE8" else \
        raw.decode("latin-1")


def _walk(buf, pos: int, end: int, limits: Limits, base_offset: int, uses: dict[str, set[str]]) -> PickleWalk:
    # compact arrays: the walk's own memory stays a few bytes per object the pickle would build
    depth = array.array("l")      # node -> nesting depth
    strings: dict[int, str] = {}  # node -> value, for short strings (what STACK_GLOBAL may take)
    gname: dict[int, str] = {}    # node -> the global it is
    origin: dict[int, str] = {}   # node -> the global whose call made it
    stack = array.array("l")
    marks: list[int] = []
    memo = array.array("l")       # memo index -> node (indices are dense: a write past the end is refused)
    mine: dict[str, set[str]] = {}  # this stream's globals and uses, in order of first appearance
    cost = 0
    pids = 0
    start = pos
    max_depth = limits.pickle_depth
    per_byte = limits.pickle_items_per_byte
    allowance = limits.pickle_items_base - per_byte * start  # cost may not pass allowance + per_byte * pos
    table = _TABLE
    from_bytes = int.from_bytes
    depth_of = depth.__getitem__
    GENERIC, GET, PUT, MEMOIZE, MARK, POP_MARK, DUP, FRAME, MODIFY, STACK_GLOBAL, STOP, GLOBAL, PROTO, CALL, POP, \
        BUILD, INST, OBJ, EXT = (_GENERIC, _GET, _PUT, _MEMOIZE, _MARK, _POP_MARK, _DUP, _FRAME, _MODIFY,
                                 _STACK_GLOBAL, _STOP, _GLOBAL, _PROTO, _CALL, _POP, _BUILD, _INST, _OBJ, _EXT)

    def note(name: str, use: str) -> None:
        uses.setdefault(name, set()).add(use)
        mine.setdefault(name, set()).add(use)

    def too_deep():
        return LimitExceeded("the pickle nests containers deeper than allowed", "pickle_depth", max_depth)

    def malformed(why: str):
        return PickleRefused(f"the pickle is malformed ({why} at byte {pos - start})")

    def call(target: int, use: str) -> str | None:
        """Note what calling node ``target`` means; the origin of the result."""
        if target in gname:
            note(gname[target], use)
            return gname[target]
        if target in origin:
            note(origin[target], "called-result")
            return origin[target]
        note(DYNAMIC, "dynamic")
        return DYNAMIC

    # A stretch of bytes repeating with a short period (every expansion or busy-work bomb is one) is walked
    # once; if that left the walk's state exactly as it found it (stack length and top, marks, memo), every
    # further repetition would too, and they are skipped with their cost added (clipped at the budget).
    # Two nodes are interchangeable when both are plain leaves (depth 1, no string, global or call attached):
    # a stretch that replaces one such leaf by a new one (in the memo or on the stack) also counts as unchanged.
    watch_end, countdown, bumps = _NEVER, _PERIOD_CHECK, 0
    memo_log: list = []  # (index, previous node) of memo writes while a stretch is watched
    w_start = w_len = w_memo = w_cost = w_bumps = 0
    w_top = w_marks = None

    def plain(node: int) -> bool:
        return depth[node] == 1 and node not in strings and node not in gname and node not in origin

    def unchanged() -> bool:
        if len(stack) != w_len or len(memo) != w_memo or bumps != w_bumps or marks != w_marks:
            return False
        top = stack[-_TOP:]
        if top != w_top and not all(a == b or (plain(a) and plain(b)) for a, b in zip(top, w_top)):
            return False
        before: dict = {}
        for index, old in memo_log:
            before.setdefault(index, old)
        return all(memo[i] == old or (plain(memo[i]) and plain(old)) for i, old in before.items())

    while True:
        if pos >= watch_end:
            if pos == watch_end and unchanged():
                period = watch_end - w_start
                k = (_run_end(buf, pos, end, bytes(buf[w_start:watch_end])) - pos) // period
                delta = cost - w_cost
                if delta > per_byte * period:
                    k = min(k, max(0, (allowance + per_byte * pos - cost) // (delta - per_byte * period) + 1))
                pos += k * period
                cost += k * delta
                if cost - per_byte * pos > allowance:
                    raise LimitExceeded(f"the pickle builds {cost} objects and references from {pos - start} "
                                        "bytes", "pickle_items_per_byte", per_byte)
            else:  # not a fixed point from this opcode on: look again later, from another phase of the stretch
                countdown = _PERIOD_CHECK + (w_start % 7)
            watch_end = _NEVER
        if watch_end == _NEVER:
            # the fast lane: the opcodes every bomb is made of, one or two bytes each, taken with the least work
            # per opcode; anything else, or anything these do not allow, falls through to the full decoding
            fence = marks[-1] if marks else 0
            while countdown > 1 and pos + 1 < end:
                b = buf[pos]
                if b in _LEAF1:
                    depth.append(1)
                    stack.append(len(depth) - 1)
                    cost += _OBJECT_COST
                    pos += 1
                elif b == 0x68:  # BINGET
                    i = buf[pos + 1]
                    if i >= len(memo):
                        break
                    stack.append(memo[i])
                    cost += 1
                    pos += 2
                elif b == 0x30 and len(stack) > fence:  # POP
                    stack.pop()
                    pos += 1
                elif b == 0x71 and len(stack) > fence:  # BINPUT
                    i = buf[pos + 1]
                    if i < len(memo):
                        memo[i] = stack[-1]  # (the fast lane runs only while no stretch is watched)
                    elif i == len(memo):
                        memo.append(stack[-1])
                    else:
                        break
                    cost += 1
                    pos += 2
                elif b == 0x94 and len(stack) > fence:  # MEMOIZE
                    memo.append(stack[-1])
                    cost += 1
                    pos += 1
                elif b == 0x32 and len(stack) > fence:  # DUP
                    stack.append(stack[-1])
                    cost += 1
                    pos += 1
                elif b == 0x28 and len(marks) < max_depth:  # MARK
                    fence = len(stack)
                    marks.append(fence)
                    pos += 1
                elif b == 0x85 and len(stack) > fence:  # TUPLE1
                    d = depth[stack[-1]] + 1
                    if d > max_depth:
                        break
                    depth.append(d)
                    stack[-1] = len(depth) - 1
                    cost += 1 + _OBJECT_COST
                    pos += 1
                elif b == 0x61 and len(stack) - fence >= 2:  # APPEND
                    d = depth[stack[-1]] + 1
                    if d > max_depth:
                        break
                    stack.pop()
                    if d > depth[stack[-1]]:
                        depth[stack[-1]] = d
                    cost += 1
                    pos += 1
                elif b == 0x4B:  # BININT1
                    depth.append(1)
                    stack.append(len(depth) - 1)
                    cost += _OBJECT_COST
                    pos += 2
                else:
                    break
                countdown -= 1
                if cost - per_byte * pos > allowance:
                    raise LimitExceeded(f"the pickle builds {cost} objects and references from {pos - start} "
                                        "bytes", "pickle_items_per_byte", per_byte)
        countdown -= 1
        if not countdown:
            countdown = _PERIOD_CHECK
            for period in range(1, _MAX_PERIOD + 1):
                if pos + 4 * period <= end and buf[pos:pos + period] * 4 == buf[pos:pos + 4 * period]:
                    watch_end, w_start, w_len, w_memo, w_cost, w_bumps = (pos + period, pos, len(stack), len(memo),
                                                                          cost, bumps)
                    w_top, w_marks = stack[-_TOP:], list(marks)
                    memo_log.clear()
                    break
        if pos >= end:
            raise PickleRefused("the pickle ends before its STOP opcode; the file is truncated")
        op_pos = pos
        entry = table[buf[pos]]
        if entry is None:
            raise malformed(f"unknown opcode {buf[pos]:#04x}")
        name, cat, argn, n_pop, slice_, n_push, is_string, pops_mark, n_modify, runnable = entry
        pos += 1
        # ---- the argument
        arg = None
        if argn is not None:
            if argn >= 0:
                if pos + argn > end:
                    raise malformed(f"{name} argument past the end")
                if cat in (GET, PUT, PROTO, FRAME, EXT):
                    arg = from_bytes(buf[pos:pos + argn], "little")
                pos += argn
            elif argn == -1:
                eol = buf.find(b"\n", pos, end)
                if eol < 0:
                    raise malformed(f"{name} line without an end")
                if cat == GLOBAL or cat == INST:
                    eol2 = buf.find(b"\n", eol + 1, end)
                    if eol2 < 0:
                        raise malformed(f"{name} without its second line")
                    arg = (bytes(buf[pos:eol]).decode("utf-8", "replace") + "."
                           + bytes(buf[eol + 1:eol2]).decode("utf-8", "replace"))
                    eol = eol2
                elif cat == GET or cat == PUT:
                    try:
                        arg = int(bytes(buf[pos:eol]))
                    except ValueError:
                        raise malformed(f"{name} index is not a number") from None
                elif is_string and eol - pos <= 1024:
                    arg = _decode_string(name, bytes(buf[pos:eol]))
                pos = eol + 1
            else:
                width = _LENGTH_BYTES[argn]
                if pos + width > end:
                    raise malformed(f"{name} length past the end")
                length = from_bytes(buf[pos:pos + width], "little", signed=argn == -3)
                pos += width
                if length < 0 or pos + length > end:
                    raise malformed(f"{name} of {length} bytes past the end")
                if is_string and length <= 1024:
                    arg = _decode_string(name, bytes(buf[pos:pos + length]))
                pos += length
        # ---- a run of the same opcode and argument: all of it at once (clipped where the budget runs out)
        repeat = 1
        if runnable and pos < end and buf[pos] == buf[op_pos]:
            width = pos - op_pos
            chunk = bytes(buf[op_pos:pos])
            if bytes(buf[pos:pos + width]) == chunk:
                repeat += (_run_end(buf, pos, end, chunk) - pos) // width
                unit = 1 if cat == GET else 0 if cat == MARK else _OBJECT_COST
                if unit > per_byte * width:
                    room = allowance + per_byte * pos - cost
                    repeat = max(1, min(repeat, room // (unit - per_byte * width) + 2))
                pos = op_pos + repeat * width
        # ---- what it does to the stack
        fence = marks[-1] if marks else 0
        if cat == GET:
            if not 0 <= arg < len(memo):
                raise PickleRefused(f"the pickle reads memo entry {arg} before writing it; it is crafted or "
                                    "corrupt")
            if repeat == 1:
                stack.append(memo[arg])
            else:
                stack.extend(array.array("l", [memo[arg]]) * repeat)
            cost += repeat
        elif cat == GENERIC:
            if n_pop > len(stack) - fence:
                raise malformed(f"{name} takes more than the stack holds")
            if repeat > 1:  # n_pop == 0, n_push == 1: that many new leaves
                first = len(depth)
                depth.extend(array.array("l", [1]) * repeat)
                stack.extend(array.array("l", range(first, first + repeat)))
                cost += _OBJECT_COST * repeat
            else:
                if n_pop:
                    items = stack[len(stack) - n_pop:]
                    del stack[len(stack) - n_pop:]
                else:
                    items = ()
                if slice_:
                    if not marks:
                        raise malformed(f"{name} without a mark")
                    items = stack[marks[-1]:] + array.array("l", items)
                    del stack[marks.pop():]
                if name == "BINPERSID":
                    pids += 1
                d = max(map(depth_of, items)) + 1 if items else 1
                if d > max_depth:
                    raise too_deep()
                for _ in range(n_push):
                    depth.append(d)
                    node = len(depth) - 1
                    if arg is not None and is_string:
                        strings[node] = arg
                    stack.append(node)
                cost += len(items) + _OBJECT_COST * n_push
        elif cat == MARK:
            if len(marks) + repeat > max_depth:
                raise LimitExceeded("the pickle nests marks deeper than allowed", "pickle_depth", max_depth)
            marks.extend([len(stack)] * repeat)
        elif cat == POP_MARK:
            if not marks:
                raise malformed("POP_MARK without a mark")
            del stack[marks.pop():]
        elif cat == PUT or cat == MEMOIZE:
            if len(stack) <= fence:
                raise malformed("a memo write with nothing to write")
            index = len(memo) if cat == MEMOIZE else arg
            if index > len(memo) or index < 0:
                raise PickleRefused(f"the pickle writes memo entry {index} after only {len(memo)} entries; "
                                    "it is crafted or corrupt")
            if index == len(memo):
                memo.append(stack[-1])
            elif memo[index] != stack[-1]:
                if watch_end != _NEVER:
                    memo_log.append((index, memo[index]))
                memo[index] = stack[-1]
            cost += 1
        elif cat == MODIFY or cat == BUILD:
            if pops_mark:
                if not marks:
                    raise malformed(f"{name} without a mark")
                items = stack[marks[-1]:]
                del stack[marks.pop():]
            else:
                if n_modify > len(stack) - fence:
                    raise malformed(f"{name} takes more than the stack holds")
                items = stack[len(stack) - n_modify:]
                del stack[len(stack) - n_modify:]
            if not stack or (marks and len(stack) <= marks[-1]):
                raise malformed(f"{name} has no object to add to")
            target = stack[-1]
            if cat == BUILD:
                if target in gname:
                    note(gname[target], "build-global")
                elif target in origin:
                    note(origin[target], "build")
            if items:
                deepest = max(map(depth_of, items)) + 1
                if deepest > depth[target]:
                    if deepest > max_depth:
                        raise too_deep()
                    depth[target] = deepest
                    bumps += 1
            cost += len(items)
        elif cat == CALL or cat == OBJ:
            if cat == OBJ:
                if not marks or len(stack) <= marks[-1]:
                    raise malformed("OBJ without a class")
                items = stack[marks[-1]:]
                del stack[marks.pop():]
            else:
                if n_pop > len(stack) - fence:
                    raise malformed(f"{name} takes more than the stack holds")
                items = stack[len(stack) - n_pop:]
                del stack[len(stack) - n_pop:]
            made = call(items[0], _USE_OF[name])
            if cat == OBJ:
                raise PickleRefused(f"the pickle uses OBJ ({FORBIDDEN_OPCODES['OBJ']}), which no torch file "
                                    "needs; the file is crafted")
            d = max(map(depth_of, items)) + 1
            if d > max_depth:
                raise too_deep()
            depth.append(d)
            node = len(depth) - 1
            origin[node] = made
            stack.append(node)
            cost += len(items) + _OBJECT_COST
        elif cat == POP:
            if len(stack) > fence:
                stack.pop()
            elif marks:
                marks.pop()  # as pickle does: POP with nothing above the mark discards the mark
            else:
                raise malformed("POP of an empty stack")
        elif cat == DUP:
            if len(stack) <= fence:
                raise malformed("DUP of nothing")
            stack.append(stack[-1])
            cost += 1
        elif cat == STACK_GLOBAL:
            if len(stack) - fence < 2:
                raise malformed("STACK_GLOBAL takes more than the stack holds")
            module, qual = stack[-2], stack[-1]
            del stack[-2:]
            if module not in strings or qual not in strings:
                note(DYNAMIC, "dynamic")
                raise PickleRefused("the pickle names a global through something other than two strings; "
                                    "it is crafted")
            g = f"{strings[module]}.{strings[qual]}"
            note(g, "value")
            depth.append(1)
            gname[len(depth) - 1] = g
            stack.append(len(depth) - 1)
            cost += _OBJECT_COST
        elif cat == GLOBAL:
            note(arg, "value")
            depth.append(1)
            gname[len(depth) - 1] = arg
            stack.append(len(depth) - 1)
            cost += _OBJECT_COST
        elif cat == FRAME:
            if arg > end - pos:
                raise PickleRefused(f"the pickle declares a frame of {arg} bytes past its end; it is corrupt")
        elif cat == PROTO:
            if arg > 5:
                raise PickleRefused(f"the pickle claims protocol {arg}; it is corrupt")
        elif cat == STOP:
            if len(stack) <= fence:
                raise malformed("STOP with an empty stack")
            break
        elif cat == INST:
            note(arg, "inst")
            raise PickleRefused(f"the pickle uses INST ({FORBIDDEN_OPCODES['INST']}), which no torch file "
                                "needs; the file is crafted")
        elif cat == EXT:
            note(f"copyreg.extension_registry[{arg}]", "dynamic")
            raise PickleRefused(f"the pickle uses {name} ({FORBIDDEN_OPCODES[name]}), which no torch file "
                                "needs; the file is crafted")
        else:  # _OTHER_FORBIDDEN
            raise PickleRefused(f"the pickle uses {name} ({FORBIDDEN_OPCODES[name]}), which no torch file "
                                "needs; the file is crafted")
        if cost - per_byte * pos > allowance:
            raise LimitExceeded(f"the pickle builds {cost} objects and references from {pos - start} bytes",
                                "pickle_items_per_byte", per_byte)
    return PickleWalk(list(mine), base_offset + start, base_offset + pos, pids, mine)
