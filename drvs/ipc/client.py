"""A local client of this node's drvmmd, over its root-only unix socket.

Commands are short-lived and not trio programs: they use pycapnp on a plain
asyncio loop, one connection per command."""

import asyncio
import errno
import os

from .message import IpcError, Msg, kj_reason


def socket_path(state_dir: str) -> str:
    return f"{state_dir}/run/drvmmd.sock"


def daemon_answers(state_dir: str, settle: float = 0.0) -> bool:
    """Whether this node's drvmmd takes connections (a dead one's socket
    file stays, refusing them): to tell its silence from other nodes'.
    settle: ask again after this long (a daemon dying this moment closes
    its connections before its listening socket)."""
    import socket
    import time

    for attempt in range(2 if settle else 1):
        if attempt:
            time.sleep(settle)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect(socket_path(state_dir))
            except OSError:
                return False
    return True


def sendrec(state_dir: str, target: str, msg: Msg, timeout: float = 5.0) -> Msg:
    """Deliver msg to endpoint target through the local drvmmd; its reply."""
    return asyncio.run(_call(socket_path(state_dir), target, msg, timeout))


async def connect(path: str):
    """(client, Node capability) of the drvmmd listening at path; call inside
    capnp.kj_loop(), and keep the client referenced while using the Node."""
    import capnp

    from . import wire
    from .schema import fabric

    if not os.path.exists(path):
        raise IpcError(f"drvmmd is not running on this node (no {path})", errno.ENOENT)
    try:
        stream = await wire.connect(path=path)
    except OSError as e:
        raise IpcError(f"drvmmd at {path}: {e.strerror}", e.errno or errno.EIO) from None
    client = capnp.TwoPartyClient(stream)
    return client, client.bootstrap().cast_as(fabric.Node)


async def _call(path: str, target: str, msg: Msg, timeout: float) -> Msg:
    import capnp

    async with capnp.kj_loop():
        client, node = await connect(path)
        req = node.sendrec_request()
        req.target = target
        msg.fill(req.init("msg"))
        req.timeoutMs = min(int(timeout * 1000), 0xFFFFFFFF)
        try:
            result = await asyncio.wait_for(req.send(), timeout + 2)
        except asyncio.TimeoutError:
            raise IpcError(f"{target}: no reply within {timeout:g} s", errno.ETIMEDOUT) from None
        except capnp.KjException as e:
            raise IpcError(f"drvmmd: {kj_reason(e)}", errno.EIO) from None
        return Msg.from_capnp(result.reply)
