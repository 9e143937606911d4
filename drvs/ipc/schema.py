"""The Cap'n Proto schemas, loaded once (the .capnp files are the only
declaration of the fabric's message types)."""

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
