"""Minix-style messages and their errors, independent of the wire."""

import errno as _errno
import os

from ..errors import DrvsError


# The type of MINIX's notify: a wake-up with no payload, which every server
# accepts (a server that has nothing to do on it just acknowledges).
NOTIFY = 0xFFFF


class Msg:
    """type selects the handler; payload is a packed struct of the target's
    schema; replies carry status (0 or -errno) and a human error."""

    __slots__ = ("type", "source", "payload", "status", "error", "node")

    def __init__(self, type: int, payload: bytes = b"", source: str = "", status: int = 0, error: str = ""):
        self.type, self.payload, self.source, self.status, self.error = type, payload, source, status, error
        # Not on the wire: the node the message came from, as its TLS
        # certificate says ("" for this node's own clients and servers).
        self.node = ""

    @classmethod
    def from_capnp(cls, m) -> "Msg":
        return cls(m.type, bytes(m.payload), m.source, m.status, m.error)

    def fill(self, m) -> None:
        m.type, m.payload, m.source, m.status, m.error = self.type, self.payload, self.source, self.status, self.error


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
    """A reply that reports -err."""
    return Msg(0, status=-err, error=text or os.strerror(err))


def check(reply: Msg, target: str) -> Msg:
    """The reply, or IpcError with the server's errno and words."""
    if reply.status < 0:
        text = reply.error or os.strerror(-reply.status)
        raise IpcError(text if text.startswith(f"{target}: ") else f"{target}: {text}", -reply.status)
    return reply
