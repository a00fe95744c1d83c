"""normcli's own zip reader: one mapped buffer, every byte range checked, nothing two readers could see apart.

torch writes its checkpoints (``torch.save``, TorchScript, ``torch.export``) as zip archives with stored
entries, one per name, starting at offset 0, with a zip64 end record. Python's ``zipfile`` and torch's
reader (miniz) do not agree on every archive: with two entries of one name Python takes the last and torch
the first (miniz also compares names without regard to ASCII case); with bytes prepended Python shifts every
offset and miniz does not; with a second end record or central directory each may find a different one. A
file can therefore show one reader a harmless ``data.pkl`` and the other a payload. This reader refuses, as
unreadable with the reason, every archive where such a difference is possible:

- exactly one end-of-central-directory record, at the end of the file (after it only its own comment, with no
  further record signature in it); a zip64 end record and locator, when present, right before it and agreeing
  with it; one disk only;
- the central directory ends exactly where the end records begin, and its records fill it exactly;
- entry names unique, also after UTF-8/cp437 decoding and ASCII case folding; no NUL in a name;
- every local header agrees with its central record (name, flags, method, CRC and sizes, the latter two
  allowed to be zero when the data-descriptor flag says they follow the data);
- the entries, each with its header, data and data descriptor, tile the file from offset 0 to the central
  directory without gaps or overlaps; nothing lies past the real end of the file;
- no encryption, no patched-data or masked-header flags; methods stored, deflate, bzip2 or LZMA only.

Stored entries are served as views of the mapped file (zero copy); compressed entries are inflated
incrementally with an explicit output cap (the caller's, from what the entry is for, and a per-archive budget
from :class:`normcli.limits.Limits`), and corrupt compressed data ends in a one-line error naming the entry.

No torch and no numpy at import time.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits

STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
METHOD_NAMES = {STORED: "stored", DEFLATED: "deflate", BZIP2: "bzip2", LZMA: "LZMA"}

_LOCAL = struct.Struct("<4sHHHHHIIIHH")       # 30 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<4sHHHHIIH")           # 22 bytes
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")   # 56 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")      # 20 bytes
_SIG_LOCAL, _SIG_CENTRAL, _SIG_EOCD = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
_SIG_ZIP64_EOCD, _SIG_ZIP64_LOCATOR, _SIG_DESCRIPTOR = b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08"
_MAX16, _MAX32 = 0xFFFF, 0xFFFFFFFF
_ZIP64_EXTRA = 0x0001

# flag bits: 0 encrypted, 3 data descriptor, 5 compressed patched data, 6 strong encryption, 11 UTF-8 names,
# 13 masked local headers. Only 3 and 11 (and the compression-option bits 1-2, 4) have a meaning we accept.
_FLAG_DESCRIPTOR, _FLAG_UTF8, _FLAG_LZMA_EOS = 1 << 3, 1 << 11, 1 << 1
_FLAGS_REFUSED = {1 << 0: "encrypted", 1 << 5: "compressed patched data", 1 << 6: "strongly encrypted",
                  1 << 13: "masked local headers"}

# A small record (archive_format, version, byteorder, ...) is a few bytes; anything near this is not one.
SMALL_RECORD_BYTES = 4096
# CRC of a stored entry is checked when the entry is read whole and is at most this long; larger stored
# entries (tensor storages) are served as a map of the file and checking them would read every byte.
CRC_CHECK_MAX_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 16


class ZipError(NormcliError):
    """The archive is unreadable: damaged, or built so that two zip readers could see different entries."""


@dataclass(slots=True)
class ZipEntry:
    """One entry of a checked archive."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int                # uncompressed
    header_offset: int       # of the local header, from the start of the archive
    data_offset: int         # of the entry's (possibly compressed) bytes
    end: int                 # past the entry's data descriptor, where the next entry starts

    @property
    def stored(self) -> bool:
        return self.method == STORED


class ZipArchive:
    """A checked zip archive over a buffer (an mmap of the file, or a view of an entry of an outer archive).

    ``where`` names the archive in messages (the file's path, or ``path:entry`` for a nested one).
    Construction parses and checks everything; afterwards only :meth:`read`, :meth:`view` and
    :meth:`read_prefix` touch the bytes, always inside the ranges checked here.
    """

    def __init__(self, buf, where: str, limits: Limits = DEFAULT_LIMITS, *, budget: "_InflateBudget | None" = None):
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
        self.size = len(self.buf)
        self.where = where
        self.limits = limits
        self.budget = budget or _InflateBudget(limits, self.size)
        self.entries: dict[str, ZipEntry] = {}
        self._crc_checked: set[str] = set()
        self._parse()
        self.names: list[str] = list(self.entries)

    # ------------------------------------------------------------------------------------------- queries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> ZipEntry | None:
        return self.entries.get(name)

    @property
    def prefix(self) -> str:
        """The top-level folder torch puts every entry under: the first entry's, as torch's reader takes it."""
        first = self.names[0] if self.names else ""
        return first.split("/", 1)[0] + "/" if "/" in first else ""

    def entry(self, name: str, what: str | None = None) -> ZipEntry:
        e = self.entries.get(name)
        if e is None:
            raise ZipError(f"{self.where}: {what or 'entry ' + repr(name)} is missing from the archive; "
                           "the file is incomplete or corrupt")
        return e

    def view(self, name: str) -> memoryview:
        """The bytes of a stored entry, as a view of the buffer (nothing copied)."""
        e = self.entry(name)
        if not e.stored:
            raise ZipError(f"{self.where}: entry {name!r} is compressed; it cannot be mapped")
        return self.buf[e.data_offset:e.data_offset + e.size]

    def read(self, name: str, limit: int, what: str | None = None, limit_name: str = "max_record_bytes") -> bytes:
        """The whole entry, at most ``limit`` bytes (else :class:`LimitExceeded` naming ``limit_name``);
        compressed entries are inflated under that cap and the archive's budget; the CRC is checked."""
        e = self.entry(name, what)
        label = what or f"entry {name!r}"
        if e.size > limit:
            if limit_name:
                raise LimitExceeded(f"{self.where}: {label} is {e.size} bytes", limit_name, limit)
            raise ZipError(f"{self.where}: {label} is {e.size} bytes, more than such a record can be "
                           f"({limit}); the file is corrupt or hostile")
        if e.stored:
            data = bytes(self.buf[e.data_offset:e.data_offset + e.size])
        else:
            data = self._inflate(e, e.size, whole=True)
        self._check_crc(e, data)
        return data

    def read_prefix(self, name: str, nbytes: int, what: str | None = None):
        """The first ``nbytes`` of an entry (a tensor storage): a view for stored entries (CRC checked when
        the entry is at most CRC_CHECK_MAX_BYTES), else inflated up to exactly that many bytes."""
        e = self.entry(name, what)
        label = what or f"entry {name!r}"
        if nbytes > e.size:
            raise ZipError(f"{self.where}: {label} holds {e.size} bytes but its tensors need {nbytes}; "
                           "the file is corrupt")
        if e.stored:
            if e.size <= CRC_CHECK_MAX_BYTES and name not in self._crc_checked:
                self._check_crc(e, self.buf[e.data_offset:e.data_offset + e.size])
            return self.buf[e.data_offset:e.data_offset + nbytes]
        whole = nbytes == e.size
        data = self._inflate(e, nbytes, whole=whole)
        if whole:
            self._check_crc(e, data)
        return data

    def nested(self, name: str, limit: int, what: str | None = None) -> "ZipArchive":
        """A zip archive stored as an entry of this one (a torch.save'd file inside a .pt2), checked the
        same way; a stored entry is read in place, a compressed one inflated under ``limit``."""
        e = self.entry(name, what)
        inner = self.view(name) if e.stored else self.read(name, limit, what)
        return ZipArchive(inner, f"{self.where}:{name}", self.limits, budget=self.budget)

    # ----------------------------------------------------------------------------------------- parsing

    def _fail(self, reason: str) -> ZipError:
        return ZipError(f"{self.where}: unreadable zip archive: {reason}")

    def _parse(self) -> None:
        size, buf = self.size, self.buf
        if size < _EOCD.size:
            raise self._fail("the file is too short to hold an end-of-directory record (truncated)")
        # Both Python's zipfile and miniz take the LAST end-record signature in the last 64 KiB; there must be
        # exactly one there that is not inside our own central directory.
        tail_start = max(0, size - (_MAX16 + _EOCD.size))
        tail = bytes(buf[tail_start:])
        eocd = tail.rfind(_SIG_EOCD, 0, len(tail) - _EOCD.size + 4)
        if eocd < 0:
            raise self._fail("no end-of-central-directory record (the file is truncated or not a zip)")
        eocd += tail_start
        (_sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len) = _EOCD.unpack_from(buf, eocd)
        end = eocd + _EOCD.size + comment_len
        if end > size:
            raise self._fail("the end-of-directory record's comment runs past the end of the file (truncated)")
        if end < size:
            raise self._fail(f"{size - end} bytes of data after the end-of-directory record (appended data)")
        comment = bytes(buf[eocd + _EOCD.size:end])
        if any(sig in comment for sig in (_SIG_EOCD, _SIG_ZIP64_EOCD, _SIG_ZIP64_LOCATOR, _SIG_CENTRAL)):
            raise self._fail("the archive comment holds another end-of-directory record")
        if disk != 0 or cd_disk != 0 or n_disk != n_total:
            raise self._fail("it spans several disks (a multi-part archive)")
        cd_end_limit = eocd
        zip64 = eocd >= _ZIP64_LOCATOR.size and bytes(buf[eocd - _ZIP64_LOCATOR.size:eocd - 16]) == _SIG_ZIP64_LOCATOR
        if zip64:
            loc = eocd - _ZIP64_LOCATOR.size
            _s, loc_disk, z64_offset, n_disks = _ZIP64_LOCATOR.unpack_from(buf, loc)
            if loc_disk != 0 or n_disks > 1:
                raise self._fail("it spans several disks (a multi-part archive)")
            if z64_offset + _ZIP64_EOCD.size > loc:
                raise self._fail("the zip64 end record lies outside the file")
            (s64, rec_size, _made, _need, d64, cd_d64, n_disk64, n_total64, cd_size64,
             cd_offset64) = _ZIP64_EOCD.unpack_from(buf, z64_offset)
            if s64 != _SIG_ZIP64_EOCD:
                raise self._fail("the zip64 locator points at no zip64 end record")
            if z64_offset + 12 + rec_size != loc:
                raise self._fail("bytes between the zip64 end record and its locator")
            if d64 != 0 or cd_d64 != 0 or n_disk64 != n_total64:
                raise self._fail("it spans several disks (a multi-part archive)")
            for name, small, big, sentinel in (("entry count", n_total, n_total64, _MAX16),
                                               ("directory size", cd_size, cd_size64, _MAX32),
                                               ("directory offset", cd_offset, cd_offset64, _MAX32)):
                if small != sentinel and small != big:
                    raise self._fail(f"the zip64 and classic end records disagree on the {name}")
            n_total, cd_size, cd_offset = n_total64, cd_size64, cd_offset64
            cd_end_limit = z64_offset
        if cd_offset + cd_size != cd_end_limit:
            between = bytes(buf[min(max(cd_offset + cd_size, 0), cd_end_limit):cd_end_limit])
            if _SIG_EOCD in between or _SIG_ZIP64_EOCD in between:
                raise self._fail("more than one end-of-directory record (a second archive appended, or a "
                                 "second directory)")
            if cd_offset + cd_size < cd_end_limit:
                raise self._fail(f"the end records say the central directory ends at {cd_offset + cd_size} but "
                                 f"they start at {cd_end_limit} (data prepended to the archive, or a second "
                                 "directory)")
            raise self._fail("the central directory runs into the end records (a damaged archive)")
        if n_total * _CENTRAL.size > cd_size:
            raise self._fail(f"{n_total} entries cannot fit in a {cd_size}-byte central directory")
        self._parse_central(cd_offset, cd_size, n_total)

    def _parse_central(self, cd_offset: int, cd_size: int, count: int) -> None:
        buf = self.buf
        pos, cd_end = cd_offset, cd_offset + cd_size
        seen_raw: set[bytes] = set()
        seen_folded: dict[str, str] = {}
        entries: list[ZipEntry] = []
        for _ in range(count):
            if pos + _CENTRAL.size > cd_end:
                raise self._fail("the central directory is shorter than its entry count says")
            (sig, _made, _need, flags, method, _time, _date, crc, csize, usize, nlen, xlen, klen, disk_start,
             _iattr, _eattr, offset) = _CENTRAL.unpack_from(buf, pos)
            if sig != _SIG_CENTRAL:
                raise self._fail(f"a damaged central directory (no entry record at offset {pos})")
            rec_end = pos + _CENTRAL.size + nlen + xlen + klen
            if rec_end > cd_end:
                raise self._fail("a central directory record runs past the directory's end")
            raw = bytes(buf[pos + _CENTRAL.size:pos + _CENTRAL.size + nlen])
            extra = bytes(buf[pos + _CENTRAL.size + nlen:pos + _CENTRAL.size + nlen + xlen])
            name = self._decode_name(raw, flags)
            usize, csize, offset, disk_start = self._zip64_values(extra, name, usize, csize, offset, disk_start)
            if disk_start != 0:
                raise self._fail(f"entry {name!r} lives on another disk (a multi-part archive)")
            for bit, what in _FLAGS_REFUSED.items():
                if flags & bit:
                    raise self._fail(f"entry {name!r} is {what}")
            if method not in METHOD_NAMES:
                raise self._fail(f"entry {name!r} uses compression method {method}, which normcli does not read "
                                 "(torch writes stored entries)")
            if method == STORED and csize != usize:
                raise self._fail(f"stored entry {name!r} has different compressed ({csize}) and uncompressed "
                                 f"({usize}) sizes")
            folded = _fold(name)
            if raw.lower() in seen_raw or folded in seen_folded:
                other = seen_folded.get(folded, name)
                why = "" if other == name else f" (torch's reader does not tell {other!r} and {name!r} apart)"
                raise self._fail(f"duplicate entry name {name!r}{why}: Python's zipfile would read the last "
                                 "copy and torch the first")
            seen_raw.add(raw.lower())
            seen_folded[folded] = name
            entries.append(self._check_local(name, raw, flags, method, crc, csize, usize, offset))
            pos = rec_end
        if pos != cd_end:
            raise self._fail(f"{cd_end - pos} bytes in the central directory beyond its {count} entries "
                             "(a hidden second directory)")
        self._check_layout(entries, cd_offset)
        self.entries = {e.name: e for e in entries}

    def _decode_name(self, raw: bytes, flags: int) -> str:
        if b"\0" in raw:
            raise self._fail(f"an entry name holds a NUL byte ({raw[:60]!r})")
        if not raw:
            raise self._fail("an entry has an empty name")
        try:
            return raw.decode("utf-8") if flags & _FLAG_UTF8 or raw.isascii() else raw.decode("cp437")
        except UnicodeDecodeError:
            raise self._fail(f"entry name {raw[:60]!r} is flagged UTF-8 but is not valid UTF-8") from None

    def _zip64_values(self, extra: bytes, name: str, usize: int, csize: int, offset: int, disk: int,
                      local: bool = False) -> tuple[int, int, int, int]:
        blocks = self._extra_blocks(extra, name)
        z64 = [data for kind, data in blocks if kind == _ZIP64_EXTRA]
        if len(z64) > 1:
            raise self._fail(f"entry {name!r} has two zip64 extra fields")
        # Only fields set to their 32/16-bit maximum come from the zip64 field (torch's writer also puts other
        # values there in local headers: sizes next to zeros, its own offset; no reader uses them).
        wanted = [usize == _MAX32, csize == _MAX32] + ([] if local else [offset == _MAX32, disk == _MAX16])
        if not any(wanted):
            return usize, csize, offset, disk
        if not z64:
            raise self._fail(f"entry {name!r} needs a zip64 extra field and has none")
        data, pos, values = z64[0], 0, [usize, csize, offset, disk]
        for i, need in enumerate(wanted):
            if not need:
                continue
            width = 4 if i == 3 else 8
            if pos + width > len(data):
                raise self._fail(f"entry {name!r} has a zip64 extra field that is too short")
            values[i] = int.from_bytes(data[pos:pos + width], "little")
            pos += width
        return values[0], values[1], values[2], values[3]

    def _extra_blocks(self, extra: bytes, name: str) -> list[tuple[int, bytes]]:
        blocks, pos = [], 0
        while pos < len(extra):
            if pos + 4 > len(extra):
                raise self._fail(f"entry {name!r} has a malformed extra field")
            kind, length = struct.unpack_from("<HH", extra, pos)
            if pos + 4 + length > len(extra):
                raise self._fail(f"entry {name!r} has a malformed extra field")
            blocks.append((kind, extra[pos + 4:pos + 4 + length]))
            pos += 4 + length
        return blocks

    def _check_local(self, name: str, raw: bytes, flags: int, method: int, crc: int, csize: int, usize: int,
                     offset: int) -> ZipEntry:
        buf, size = self.buf, self.size
        if offset + _LOCAL.size > size:
            raise self._fail(f"entry {name!r} starts past the end of the file (offset {offset}, file size {size})")
        (sig, _need, lflags, lmethod, _time, _date, lcrc, lcsize, lusize, nlen, xlen) = _LOCAL.unpack_from(buf, offset)
        if sig != _SIG_LOCAL:
            raise self._fail(f"entry {name!r} has no local header at offset {offset}")
        data_offset = offset + _LOCAL.size + nlen + xlen
        if data_offset > size:
            raise self._fail(f"entry {name!r}'s local header runs past the end of the file")
        lraw = bytes(buf[offset + _LOCAL.size:offset + _LOCAL.size + nlen])
        if lraw != raw:
            raise self._fail(f"entry {name!r} is named {lraw[:60]!r} in its local header (the local header "
                             "and the central directory disagree)")
        if lflags != flags:
            raise self._fail(f"entry {name!r} has flags {lflags:#06x} in its local header and {flags:#06x} in "
                             "the central directory")
        if lmethod != method:
            raise self._fail(f"entry {name!r} is {METHOD_NAMES.get(lmethod, lmethod)} in its local header and "
                             f"{METHOD_NAMES[method]} in the central directory")
        lextra = bytes(buf[offset + _LOCAL.size + nlen:data_offset])
        lusize, lcsize, _o, _d = self._zip64_values(lextra, name, lusize, lcsize, 0, 0, local=True)
        descriptor = bool(flags & _FLAG_DESCRIPTOR)
        for field, local, central in (("CRC", lcrc, crc), ("compressed size", lcsize, csize),
                                      ("size", lusize, usize)):
            if local != central and not (descriptor and local == 0):
                raise self._fail(f"entry {name!r} has {field} {local} in its local header and {central} in the "
                                 "central directory")
        data_end = data_offset + csize
        if data_end > size:
            raise self._fail(f"entry {name!r}'s data ({csize} bytes at offset {data_offset}) runs past the end "
                             f"of the file ({size} bytes)")
        return ZipEntry(name, method, flags, crc, csize, usize, offset, data_offset, data_end)

    def _check_layout(self, entries: list[ZipEntry], cd_offset: int) -> None:
        """Entries tile [0, central directory): no prepended bytes, gaps or overlaps; data descriptors where
        the flag says, and agreeing with the central directory."""
        ordered = sorted(entries, key=lambda e: e.header_offset)
        pos, previous = 0, None
        for i, e in enumerate(ordered):
            if e.header_offset < pos:
                raise self._fail(f"entries {previous.name!r} and {e.name!r} overlap")
            if e.header_offset > pos:
                if previous is None:
                    raise self._fail(f"{e.header_offset} bytes before the first entry (data prepended to the "
                                     "archive)")
                raise self._fail(f"{e.header_offset - pos} unaccounted bytes between entries {previous.name!r} "
                                 f"and {e.name!r}")
            following = ordered[i + 1].header_offset if i + 1 < len(ordered) else cd_offset
            if following < e.end:
                other = ordered[i + 1].name if i + 1 < len(ordered) else None
                raise self._fail(f"entries {e.name!r} and {other!r} overlap" if other else
                                 f"entry {e.name!r} runs into the central directory")
            end = e.end
            if e.flags & _FLAG_DESCRIPTOR:
                end = self._descriptor_end(e, following)
            e.end = end
            pos, previous = end, e
        if pos != cd_offset:
            if previous is None:
                raise self._fail(f"{cd_offset} bytes before the central directory and no entry (data prepended "
                                 "to the archive)")
            raise self._fail(f"{cd_offset - pos} unaccounted bytes between entry {previous.name!r} and the "
                             "central directory")

    def _descriptor_end(self, e: ZipEntry, following: int) -> int:
        """A data descriptor is crc + sizes (4 or 8 bytes each), optionally after a signature; the one that
        ends exactly where the next entry begins must agree with the central directory."""
        start, gap = e.end, following - e.end
        for sig_len in (4, 0):
            for width in (4, 8):
                n = sig_len + 4 + 2 * width
                if n != gap:
                    continue
                body = bytes(self.buf[start:start + n])
                if sig_len and body[:4] != _SIG_DESCRIPTOR:
                    continue
                crc = int.from_bytes(body[sig_len:sig_len + 4], "little")
                csize = int.from_bytes(body[sig_len + 4:sig_len + 4 + width], "little")
                usize = int.from_bytes(body[sig_len + 4 + width:], "little")
                if (crc, csize, usize) == (e.crc, e.compressed_size, e.size):
                    return start + n
                raise self._fail(f"entry {e.name!r}'s data descriptor disagrees with the central directory")
        if gap == 0:
            raise self._fail(f"entry {e.name!r} says a data descriptor follows its data, and none does")
        raise self._fail(f"{gap} unaccounted bytes after entry {e.name!r}")

    # --------------------------------------------------------------------------------------- inflating

    def _check_crc(self, e: ZipEntry, data) -> None:
        if zlib.crc32(data) != e.crc:
            raise ZipError(f"{self.where}: entry {e.name!r} fails its CRC check; the file is corrupt")
        self._crc_checked.add(e.name)

    def _inflate(self, e: ZipEntry, want: int, whole: bool) -> bytearray:
        """Inflate the first ``want`` bytes of a compressed entry; with ``whole``, also check that the stream
        ends exactly at the declared size and uses all of its compressed bytes."""
        self.budget.spend(want, self.where, e.name)
        stream = _Decompressor(e, self)
        out = bytearray(want)
        pos = 0
        src, src_end = e.data_offset, e.data_offset + e.compressed_size
        label = f"{self.where}: entry {e.name!r}"
        try:
            while True:
                if stream.eof or (pos == want and not whole):
                    break
                if pos == want and src >= src_end and stream.needs_input and e.method == LZMA \
                        and not e.flags & _FLAG_LZMA_EOS:
                    break  # an LZMA stream without an end marker ends with its data
                chunk = b""
                if stream.needs_input:
                    if src >= src_end:
                        raise ZipError(f"{label}: its {METHOD_NAMES[e.method]} data ends early; the file is "
                                       "truncated or corrupt")
                    chunk = bytes(self.buf[src:min(src + _CHUNK, src_end)])
                    src += len(chunk)
                room = want - pos
                piece = stream.feed(chunk, room + 1 if whole else room)
                if len(piece) > room:
                    raise ZipError(f"{label} inflates to more than the {e.size} bytes it declares; the file is "
                                   "corrupt or a decompression bomb")
                out[pos:pos + len(piece)] = piece
                pos += len(piece)
                if not piece and not chunk and not stream.eof and not stream.needs_input:
                    raise ZipError(f"{label}: its {METHOD_NAMES[e.method]} stream makes no progress; the file "
                                   "is corrupt")
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            raise ZipError(f"{label}: corrupt {METHOD_NAMES[e.method]} data ({_one_line(exc)}); the file is "
                           "damaged") from None
        if pos < want:
            raise ZipError(f"{label} inflates to {pos} bytes, fewer than the {want} needed; the file is corrupt")
        if whole and (src < src_end or stream.unused):
            raise ZipError(f"{label} has bytes after the end of its {METHOD_NAMES[e.method]} stream; the file "
                           "is corrupt")
        return out  # a bytearray: copying it to bytes would double the peak


class _Decompressor:
    """zlib, bz2 and lzma behind one incremental interface: feed(input, max_out) -> output."""

    def __init__(self, e: ZipEntry, archive: ZipArchive):
        self.tail = b""
        self.offset_consumed = 0
        self.kind = e.method
        if e.method == DEFLATED:
            self.d = zlib.decompressobj(-15)
        elif e.method == BZIP2:
            self.d = bz2.BZ2Decompressor()
        else:
            self.d = None  # LZMA: needs its 4-byte zip header and 5-byte properties first
            self.header = b""
            self.archive, self.entry = archive, e

    @property
    def eof(self) -> bool:
        return self.d is not None and self.d.eof

    @property
    def needs_input(self) -> bool:
        if self.d is None:
            return True
        if self.kind == DEFLATED:
            return not self.tail
        return self.d.needs_input

    @property
    def unused(self) -> bytes:
        return b"" if self.d is None else self.d.unused_data

    def feed(self, data: bytes, max_out: int) -> bytes:
        if self.d is None:
            self.header += data
            if len(self.header) < 4:
                return b""
            (psize,) = struct.unpack_from("<H", self.header, 2)
            if psize != 5:
                raise lzma.LZMAError(f"LZMA properties of {psize} bytes, not 5")
            if len(self.header) < 4 + psize:
                return b""
            self.d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[self._lzma_filter(self.header[4:9])])
            data, self.header = self.header[9:], b""
        if self.kind == DEFLATED:
            out = self.d.decompress(self.tail + data, max_out)
            self.tail = self.d.unconsumed_tail
            return out
        return self.d.decompress(data, max_out)

    def _lzma_filter(self, props: bytes) -> dict:
        d = props[0]
        if d >= 9 * 5 * 5:
            raise lzma.LZMAError("bad LZMA properties")
        lc, rest = d % 9, d // 9
        lp, pb = rest % 5, rest // 5
        (dict_size,) = struct.unpack("<I", props[1:5])
        # the dictionary never needs to exceed what the entry decodes to: a huge declared one would only make
        # liblzma allocate it
        dict_size = max(4096, min(dict_size, max(self.entry.size, 4096)))
        return {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}


class _InflateBudget:
    """How many bytes the compressed entries of one file may inflate to, together."""

    def __init__(self, limits: Limits, file_size: int):
        self.limits = limits
        self.total = limits.max_inflated_bytes + limits.max_inflate_ratio * file_size
        self.spent = 0

    def spend(self, n: int, where: str, name: str) -> None:
        if self.spent + n > self.total:
            raise LimitExceeded(
                f"{where}: inflating entry {name!r} ({n} bytes) would take the file's compressed entries to "
                f"{self.spent + n} bytes, over max_inflated_bytes + max_inflate_ratio x file size ({self.total})",
                "max_inflate_ratio", self.limits.max_inflate_ratio)
        self.spent += n


def _fold(name: str) -> str:
    """miniz (torch's zip reader) compares names after lowering ASCII letters only."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__
