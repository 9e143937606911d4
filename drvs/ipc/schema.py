"""The Cap'n Proto schemas, loaded once (the .capnp files are the only
declaration of the fabric's message types).

On the paths every call takes, fields are read with `s._get("name")` and
unions with `s._which_str()`, not as `s.name` and `s.which()`: pycapnp's
attribute access on a struct first fails Python's generic lookup, which
formats an AttributeError it then drops (~450 ns a field here, against
~160; `which()` ~700 ns against ~120, as it builds an enum object).  A
32-byte fabric call reads some thirty fields on its two sides."""

import os
import struct as _struct

import capnp

_HERE = os.path.dirname(__file__)
capnp.remove_import_hook()

# pycapnp ships the standard schemas (/capnp/stream.capnp) in its package.
_IMPORTS = [os.path.dirname(os.path.dirname(capnp.__file__))]

fabric = capnp.load(os.path.join(_HERE, "fabric.capnp"), imports=_IMPORTS)
drvmm = capnp.load(os.path.join(_HERE, "drvmm.capnp"), imports=_IMPORTS)
pm = capnp.load(os.path.join(_HERE, "pm.capnp"), imports=_IMPORTS)
fs = capnp.load(os.path.join(_HERE, "fs.capnp"), imports=_IMPORTS)


def new(struct, **fields):
    """struct.new_message(**fields), for hot paths: pycapnp's keyword form
    takes ~10 µs for a handful of fields here, setting them one by one
    ~1.5 µs.  Values: scalars, bytes, text, lists of scalars, and dicts
    (a nested struct, one level)."""
    m = struct.new_message()
    for name, value in fields.items():
        if isinstance(value, dict):
            sub = m.init(name)
            for k, v in value.items():
                setattr(sub, k, v)
        elif isinstance(value, (list, tuple)):
            if value:
                setattr(m, name, list(value))
        else:
            setattr(m, name, value)
    return m


def to_flat(builder) -> bytes:
    """A message in Cap'n Proto's standard framing, unpacked: for payloads
    that carry bulk data (a file's blocks), as packing scans every byte
    (~600 µs per MiB of file data here, against ~190 µs to build it
    unpacked); small messages pay a few zero words more."""
    return builder.to_bytes()


_U32 = _struct.Struct("<I")
_U64 = _struct.Struct("<Q")

MAX_SEGMENTS = 512       # kj's own reader refuses more
MAX_WORDS = 8 << 20      # 64 MiB, kj's default traversal limit


def segments(frame: memoryview, sizes) -> tuple[list, int]:
    """The segments of a frame in the standard framing whose segment
    table gave these sizes (in words), as views of it; and where they end."""
    out, at = [], (4 * len(sizes) + 11) & ~7
    for size in sizes:
        out.append(frame[at:at + 8 * size])
        at += 8 * size
    return out, at


def from_flat(struct, data: bytes):
    """A reader of struct over data as to_flat makes it, without copying it
    (the reader keeps data alive).  ValueError if the framing is not whole;
    what lies inside is checked by pycapnp as it is read (KjException)."""
    view = memoryview(data)
    if len(view) < 8:
        raise ValueError("message shorter than its framing")
    count = _struct.unpack_from("<I", view)[0] + 1
    if count > MAX_SEGMENTS:
        raise ValueError(f"{count} segments")
    if len(view) < (4 * count + 11) & ~7:
        raise ValueError("message shorter than its segment table")
    parts, end = segments(view, _struct.unpack_from(f"<{count}I", view, 4))
    if end != len(view):
        raise ValueError(f"message of {len(view)} bytes, its segments say {end}")
    return struct.from_segments(parts, traversal_limit_in_words=MAX_WORDS)


# The RPC protocol's own messages, for drvs.ipc.level0.
rpc = capnp.load(os.path.join(os.path.dirname(capnp.__file__), "rpc.capnp"), imports=_IMPORTS)


# -- bulk data out of line ---------------------------------------------------------
#
# Setting a large Data field copies it into the builder's arena (zeroed
# first), and to_bytes() copies the whole message again; a file's block in
# a reply, inside the fabric's Message, inside an RPC Return, was copied four
# times and zeroed twice before TLS read it (~0.5 ms of a remote read's
# 1.4 ms per MiB on the serving node here).  Instead the field is set to
# MARKER, and out_of_line() sends the data as a second segment of the
# message, which the sender never copies: the encoding's own far pointer
# (segment 1, offset 0) replaces the field's pointer, and segment 1 is a
# landing pad followed by the data.  Readers see a standard two-segment
# message.  The field is found by its path (the pointer index of each field
# from the root), never by searching for the marker's bytes, which another
# field may hold too.

BULK = 32 * 1024            # payloads this large go out of line
MARKER = os.urandom(16)     # what the field holds until then (a check that the path is right)
_FAR_TO_SEGMENT_1 = 2 | (1 << 32)  # far pointer: segment 1, landing pad at word 0


class Bulk:
    """Buffers that a Data field holding MARKER stands for; path: the
    pointer indices from the struct being filled down to the field."""

    __slots__ = ("path", "pieces")

    def __init__(self, path: tuple, pieces):
        self.path, self.pieces = path, pieces

    def under(self, *outer: int) -> "Bulk":
        """The same, seen from further up (the struct's own path first)."""
        return Bulk(outer + self.path, self.pieces)


def pointer_index(schema, field: str) -> int:
    """Where field (a pointer: struct, list, blob, any) is in its struct's pointer section."""
    return schema.fields[field].proto.slot.offset


def out_of_line(builder, bulk: Bulk) -> list:
    """builder's message in the standard framing, as buffers to write one
    after the other, where the Data field at bulk.path (holding MARKER)
    holds the concatenation of bulk.pieces (bytes-like, not copied).
    ValueError if the rest of the message does not fit its first segment
    (callers keep that part small) or the path does not lead to MARKER."""
    segs = builder.to_segments()
    if len(segs) != 1:
        raise ValueError("message beside its bulk data spans segments")
    seg = bytearray(segs[0])
    view = memoryview(seg)
    try:
        at = _pointer(view, len(seg) // 8, bulk.path)
        p = _U64.unpack_from(view, 8 * at)[0] if at is not None else 0
        blob = 8 * (at + 1 + ((p >> 2) & 0x3FFFFFFF)) if at is not None else 0
        if p & 3 != 1 or (p >> 32) & 7 != 2 or p >> 35 != len(MARKER) or seg[blob:blob + len(MARKER)] != MARKER:
            raise ValueError("the path does not lead to a field holding MARKER")
        _U64.pack_into(view, 8 * at, _FAR_TO_SEGMENT_1)
        view[blob:blob + len(MARKER)] = bytes(len(MARKER))  # (the marker never goes out)
    finally:
        view.release()
    size = sum(len(p) for p in bulk.pieces)
    pad = -size % 8
    head = _struct.pack("<III", 1, len(seg) // 8, 1 + (size + pad) // 8) + bytes(4)
    landing = _struct.pack("<Q", 1 | (2 << 32) | (size << 35))  # the data's list pointer, offset 0
    out = [head + seg + landing, *bulk.pieces]
    if pad:
        out.append(bytes(pad))
    return out


def _pointer(seg, words: int, path: tuple) -> "int | None":
    """The word of segment seg (of that many words) holding the pointer at
    the end of path, from the root pointer (word 0): every pointer on the
    way a struct pointer forward in the segment (as a builder makes them);
    None if one is not."""
    at = 0
    for index in path:
        p = _U64.unpack_from(seg, 8 * at)[0]
        offset = (p >> 2) & 0x3FFFFFFF
        if p & 3 or offset & 0x20000000 or index >= p >> 48:
            return None  # not a struct pointer forward in the segment, or too few pointers
        at += 1 + offset + ((p >> 32) & 0xFFFF) + index
        if at >= words:
            return None
    return at


def flat_with(builder, field: str, data) -> "bytes | list":
    """to_flat(builder) with builder.field = data; a large data goes out of
    line (a list of buffers: drvs.ipc.message.Msg takes either)."""
    if len(data) < BULK:
        setattr(builder, field, data)
        return to_flat(builder)
    setattr(builder, field, MARKER)
    return out_of_line(builder, Bulk((pointer_index(builder.schema, field),), (data,)))


def bulk_of(flat, struct, field: str) -> "memoryview | None":
    """The Data field of a flat struct message laid out as flat_with sends a
    large one (the field's pointer, in the root struct, is the far pointer
    to segment 1, whose landing pad heads the data), as a view of flat: no
    copy.  None for any other layout (from_flat reads those)."""
    return bulk_at(flat, (pointer_index(struct.schema, field),))


def bulk_at(flat, path: tuple) -> "memoryview | None":
    """As bulk_of, for a Data field further down: path gives the pointer
    index of each field followed from the root struct, the last one the
    Data's (see _pointer); the caller knows the unions on the way hold
    these fields (they share their struct's sections)."""
    view = memoryview(flat)
    if len(view) < 32 or _U32.unpack_from(view)[0] != 1:
        return None
    n0, n1 = _struct.unpack_from("<II", view, 4)
    seg1 = 16 + 8 * n0
    if n0 < 1 or n1 < 1 or seg1 + 8 * n1 != len(view):
        return None
    at = _pointer(view[16:seg1], n0, path)
    if at is None or _U64.unpack_from(view, 16 + 8 * at)[0] != _FAR_TO_SEGMENT_1:
        return None
    pad = _U64.unpack_from(view, seg1)[0]
    size = pad >> 35
    if pad & 0xFFFFFFFF != 1 or (pad >> 32) & 7 != 2 or 8 + size > 8 * n1:
        return None
    return view[seg1 + 8:seg1 + 8 + size]
