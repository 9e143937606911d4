"""Minix-style messages and their errors (the wire keeps to schema.py and level0.py)."""

import errno as _errno
import os

from ..errors import DrvsError
from .schema import BULK, MARKER, Bulk, fabric, pointer_index


# The type of MINIX's notify: a wake-up with no payload, which every endpoint
# accepts (the fabric acknowledges it for its servers: Fabric.deliver).
NOTIFY = 0xFFFF


class Msg:
    """type selects the handler; payload is a packed struct of the target's
    schema; replies carry status (0 or -errno) and a human error.  The
    payload may be given as a list of buffers (schema.flat_with's bulk
    data): joined only if read here, sent as they are (level 0); or as a
    view of the message it came in (level 0's large replies): view() gives
    it without a copy, payload as bytes."""

    __slots__ = ("type", "source", "_payload", "pieces", "status", "error", "node")

    def __init__(self, type: int, payload: "bytes | list" = b"", source: str = "", status: int = 0,
                 error: str = ""):
        self.type, self.source, self.status, self.error = type, source, status, error
        if isinstance(payload, (list, tuple)):
            self._payload, self.pieces = None, payload
        else:
            self._payload, self.pieces = payload, None
        # Not on the wire: the node the message came from, as its TLS
        # certificate says ("" for this node's own clients and servers).
        self.node = ""

    @property
    def payload(self) -> bytes:
        p = self._payload
        if p is None:
            p = self._payload = b"".join(self.pieces)
        elif type(p) is memoryview:
            p = self._payload = p.tobytes()
        return p

    def view(self) -> "bytes | memoryview":
        """The payload, a view of the message it came in if it is one."""
        return self._payload if self._payload is not None else self.payload

    @classmethod
    def from_capnp(cls, m, payload=None) -> "Msg":
        """fabric.Message m; payload, if given, stands for m's own (a view
        of a large one sent out of line), else m's is copied."""
        get = m._get  # (see schema.py)
        if payload is None:
            payload = bytes(get("payload"))
        return cls(get("type"), payload, get("source"), get("status"), get("error"))

    def fill(self, m, bulk: bool = False) -> "Bulk | None":
        """Set fabric.Message m.  With bulk (a level-0 connection sends m),
        a large payload is left out: m.payload is schema.MARKER, and the
        buffers it stands for are returned, for level0 to send out of line
        (None: nothing left out)."""
        m.type, m.source, m.status, m.error = self.type, self.source, self.status, self.error
        pieces = self.pieces if self._payload is None else (self._payload,)
        # (the rest of the message stays far smaller than its first segment: 8 KiB)
        if bulk and sum(map(len, pieces)) >= BULK and len(self.source.encode()) + len(self.error.encode()) < 2048:
            m.payload = MARKER
            return Bulk((_PAYLOAD,), pieces)
        m.payload = self.payload
        return None

    def fill_at(self, parent, field: str, bulk: bool = False, at: "int | None" = None) -> "Bulk | None":
        """fill() parent.field (a fabric.Message), its bulk seen from parent;
        at: the field's pointer index where the caller knows it (looking it
        up in the schema costs ~1.5 µs a call)."""
        b = self.fill(parent.init(field), bulk)
        if b is None:
            return None
        return b.under(pointer_index(parent.schema, field) if at is None else at)


_PAYLOAD = pointer_index(fabric.Message.schema, "payload")


class Later:
    """What an endpoint's fast path returns when it did the work as the
    message came but the reply must wait for something (the file server
    telling other nodes of a change): a trio task awaits finish(), a Msg,
    and replies with it."""

    __slots__ = ("finish",)

    def __init__(self, finish):
        self.finish = finish


class IpcError(DrvsError):
    """A message could not be delivered, or its server failed it."""

    exit_code = 7

    def __init__(self, message: str, errno: int = _errno.EIO):
        super().__init__(message)
        self.errno = errno


def failure(err: int, text: str = "") -> Msg:
    """A reply that reports -err.  The text may name a path that is not
    UTF-8 (os.fsdecode's surrogates), which a Cap'n Proto Text cannot
    carry: those are escaped, never the reason the reply is lost."""
    text = text or os.strerror(err)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode()
    return Msg(0, status=-err, error=text)


# The errno of a reply that says the node could not reach etcd (to find an
# endpoint, or in the endpoint's own work): the client then fails as etcd
# unreachable (exit 6), not as a message lost (7).
ETCD_AWAY = _errno.ENOLINK


def said_of(endpoint: str, text: str) -> str:
    """text, said of endpoint once (the words of an error may name it
    already: "E: ...", or "no endpoint 'E'")."""
    named = text.startswith(f"{endpoint}: ") or f"'{endpoint}'" in text
    return text if named else f"{endpoint}: {text}"


def check(reply: Msg, target: str) -> Msg:
    """The reply, or IpcError with the server's errno and words."""
    if reply.status < 0:
        text = reply.error or os.strerror(-reply.status)
        if reply.status == -ETCD_AWAY:
            from ..errors import EtcdUnavailable

            raise EtcdUnavailable(text)
        raise IpcError(said_of(target, text), -reply.status)
    return reply


def kj_reason(e) -> str:
    """One line for the user from a capnp KjException: a remote server's
    Python traceback is reduced to its last line, an empty text to the
    exception's kind."""
    text = str(getattr(e, "description", "") or "").strip().removeprefix("remote exception:").strip()
    text = text.removeprefix("message =").strip()  # (pycapnp's words for a Python exception in a server)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if any(line.startswith("Traceback") for line in lines) else (lines[0] if lines else "")
    if line in ("", "None", "message = None"):
        kind = str(getattr(e, "type", "") or "").lower()
        return "the connection was lost" if kind == "disconnected" else (kind or "unknown failure")
    return line
