"""`drvs ipc ping`, `drvs lock ...`, `drvs election ...`: the fabric's message
passing and the DRVMM's lock and election services, from the command line."""

import argparse
import errno
import os
import time

from .. import config
from ..cluster.context import cluster_info, no_cluster
from ..errors import Conflict, NotFound, UsageError

MAX_SECONDS = 30 * 86400


def _number(text: str) -> float:
    import math

    try:
        return float(text)
    except ValueError:
        return math.nan


def _seconds(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= MAX_SECONDS:  # (nan too; a call carries it in ms, as a UInt32)
        raise argparse.ArgumentTypeError(f"not a number of seconds (0 to {MAX_SECONDS}): {text!r}")
    return value


def _bound(text: str) -> float:
    """A wait in seconds: more than 0 (0 would be no bound at all)."""
    value = _number(text)
    if not 0 < value <= 86400:  # (nan too)
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0 (up to 86400): {text!r}")
    return value


def _at_least_0(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count of 0 or more: {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a count of 1 or more: {text!r}")
    return int(text)


def _endpoint(text: str) -> str:
    from ..ipc.fabric import check_name
    from ..ipc.message import IpcError

    try:
        return check_name(text)
    except IpcError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _group(text: str) -> str:
    if not text or "/" in text or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"invalid group name {text!r} (not empty, no '/')")
    return text


def _checked(name: str, watch: bool = False) -> str:
    from ..ipc.services import name_problem

    problem = name_problem(name, watch)
    if problem:
        raise UsageError(problem)
    return name


def add_parsers(sub) -> None:
    ipc = sub.add_parser("ipc", help="message passing between endpoints")
    verbs = ipc.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("ping", help="sendrec round trips to an endpoint (e.g. drvmm@n2)")
    p.add_argument("target", type=_endpoint, metavar="ENDPOINT", help="SERVICE@NODE or SERVICE@VM")
    p.add_argument("-c", "--count", type=_count, default=1)
    p.add_argument("--timeout", type=_bound, default=5.0, help="seconds to wait for each reply (default: 5)")
    p.set_defaults(func=ping)

    lock = sub.add_parser("lock", help="cluster-wide locks, held by this node")
    verbs = lock.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("acquire", help="wait for the lock NAME; print its key")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=_seconds, default=0, help="seconds (default: wait as long as it takes)")
    p.set_defaults(func=lock_acquire)
    p = verbs.add_parser("release", help="release a lock by its key")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(func=lock_release)

    el = sub.add_parser("election", help="leader election among nodes")
    verbs = el.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("campaign", help="wait until this node leads NAME; print the leadership key")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--value", default="", help="what to announce (default: this node's name)")
    p.add_argument("--timeout", type=_seconds, default=0, help="seconds (default: wait as long as it takes)")
    p.set_defaults(func=campaign)
    p = verbs.add_parser("leader", help="print the current leader of NAME")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=leader)
    p = verbs.add_parser("resign", help="give up a leadership by its key")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(func=resign)
    p = verbs.add_parser("observe", help="print NAME's leader now and at each change")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", "--count", type=_at_least_0, default=0, help="stop after this many (default: never)")
    p.set_defaults(func=observe)

    gr = sub.add_parser("group", help="groups of endpoints: membership and broadcast")
    verbs = gr.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (("join", "add ENDPOINT (default: this node's drvmm) to GROUP, for this node's lifetime"),
                       ("leave", "remove ENDPOINT from GROUP")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("group", type=_group, metavar="GROUP")
        p.add_argument("endpoint", nargs="?", type=_endpoint, metavar="ENDPOINT")
        p.set_defaults(func=group_change, call=verb)
    p = verbs.add_parser("members", help="the endpoints in GROUP")
    p.add_argument("group", type=_group, metavar="GROUP")
    p.set_defaults(func=group_members)
    p = verbs.add_parser("broadcast", help="notify every member of GROUP; say how many acknowledged")
    p.add_argument("group", type=_group, metavar="GROUP")
    p.add_argument("--timeout", type=_bound, default=5.0, help="seconds to wait for the replies (default: 5)")
    p.set_defaults(func=broadcast)


def _local() -> tuple[str, str]:
    cfg = config.load()
    info = cluster_info(cfg)
    if info is None:
        raise no_cluster(cfg)
    return cfg.state_dir, f"drvmm@{info['node']}"


def _call(call, payload: bytes, timeout: float, target: str | None = None, by_key: bool = False,
          busy: bool = False):
    """by_key: the call names a lock or leadership by its key (or a group
    member), so ENOENT (none held under it, not served here) and EINVAL (not
    such a key) are the user's.
    busy: the call waits for a lock or leadership another holds: its own
    timeout is a conflict (exit 4), not a node out of reach (7)."""
    from ..ipc import client
    from ..ipc.message import Msg, check, said_of

    state_dir, local = _local()
    target = target or local
    # A blocking call's own timeout, plus the fabric's bound on top.
    reply = client.sendrec(state_dir, target, Msg(call, payload), timeout=timeout)
    if by_key and reply.status in (-errno.ENOENT, -errno.EINVAL, -errno.EBADMSG, -errno.EPERM):
        # (what the user named: no such key, not a key of this kind, another node's)
        err = {-errno.ENOENT: NotFound, -errno.EPERM: Conflict}.get(reply.status, UsageError)
        text = reply.error or os.strerror(-reply.status)
        raise err(said_of(target, text))
    if busy and reply.status == -errno.ETIMEDOUT:
        raise Conflict(f"{target}: {reply.error or os.strerror(errno.ETIMEDOUT)} (another holds it, or etcd "
                       "was too slow to answer)")
    return check(reply, target)


def _name_request(name: str, value: str = "", timeout: float = 0) -> bytes:
    from ..ipc.schema import drvmm

    return drvmm.NameRequest.new_message(name=name, value=value, timeoutMs=int(timeout * 1000)).to_bytes_packed()


def _key(key: str) -> bytes:
    from ..ipc.schema import drvmm

    return drvmm.KeyReply.new_message(key=key).to_bytes_packed()


def _key_reply(reply):
    from ..ipc.schema import drvmm

    return drvmm.KeyReply.from_bytes_packed(reply.payload)


def ping(args) -> int:
    """drvmm echoes a payload back; any other server is sent a notify,
    which every endpoint acknowledges (its own table is not known here)."""
    from ..ipc.message import NOTIFY
    from ..ipc.schema import drvmm

    echo = args.target.startswith("drvmm@")
    for i in range(args.count):
        payload = f"ping {i}".encode() if echo else b""
        t0 = time.perf_counter()
        reply = _call(drvmm.DrvmmCall.ping if echo else NOTIFY, payload, args.timeout, target=args.target)
        ms = (time.perf_counter() - t0) * 1000
        same = "ok" if reply.payload == payload else "CORRUPT"
        print(f"reply from {reply.source or args.target}: seq={i} time={ms:.2f} ms {same}")
    return 0


def _wait(timeout: float) -> float:
    return timeout + 5 if timeout else 30 * 86400.0


def lock_acquire(args) -> int:
    from ..ipc.schema import drvmm

    reply = _call(drvmm.DrvmmCall.lock, _name_request(_checked(args.name), timeout=args.timeout),
                  _wait(args.timeout), busy=True)
    print(_key_reply(reply).key)
    return 0


def lock_release(args) -> int:
    from ..ipc.schema import drvmm

    _call(drvmm.DrvmmCall.unlock, _key(args.key), 10, by_key=True)
    return 0


def campaign(args) -> int:
    from ..ipc.schema import drvmm
    from ..ipc.services import system_election

    problem = system_election(_checked(args.name))
    if problem:
        raise UsageError(problem)
    reply = _call(drvmm.DrvmmCall.campaign, _name_request(args.name, args.value, args.timeout),
                  _wait(args.timeout), busy=True)
    print(_key_reply(reply).key)
    return 0


def leader(args) -> int:
    from ..ipc.schema import drvmm

    value = _key_reply(_call(drvmm.DrvmmCall.leader, _name_request(_checked(args.name, watch=True)), 10)).value
    if not value:
        raise NotFound(f"election {args.name!r} has no leader")
    print(value)
    return 0


def resign(args) -> int:
    from ..ipc.schema import drvmm

    _call(drvmm.DrvmmCall.resign, _key(args.key), 10, by_key=True)
    return 0


def observe(args) -> int:
    import sys

    import trio

    from ..cluster.context import etcd_client
    from ..ipc.services import ELECTIONS

    _checked(args.name, watch=True)
    info = cluster_info(config.load())
    if info is None:
        raise no_cluster(config.load())

    async def go():
        seen = 0
        async with etcd_client(info) as etcd:
            async for leader in etcd.observe(ELECTIONS + args.name):
                print(leader, flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return

    try:
        trio.run(go)
    except KeyboardInterrupt:
        sys.stdout.flush()
        return 130  # (as a program SIGINT ended: a script can tell it from --count's end)
    return 0


def group_change(args) -> int:
    from ..ipc.schema import drvmm

    _, local = _local()
    call = drvmm.DrvmmCall.groupJoin if args.call == "join" else drvmm.DrvmmCall.groupLeave
    # (by_key: ENOENT is the user's endpoint, not served on this node)
    _call(call, _name_request(args.group, args.endpoint or local), 10, by_key=True)
    return 0


def group_members(args) -> int:
    from ..ipc.schema import drvmm

    reply = _call(drvmm.DrvmmCall.members, _name_request(args.group), 10)
    for endpoint in drvmm.Members.from_bytes_packed(reply.payload).endpoints:
        print(endpoint)
    return 0


def broadcast(args) -> int:
    from ..ipc.message import NOTIFY
    from ..ipc.schema import drvmm

    # (a notify, which every endpoint takes, whatever server it is)
    req = drvmm.Broadcast.new_message(group=args.group, type=NOTIFY, timeoutMs=int(args.timeout * 1000))
    reply = _call(drvmm.DrvmmCall.broadcast, req.to_bytes_packed(), args.timeout + 5)
    out = drvmm.Delivery.from_bytes_packed(reply.payload)
    print(f"delivered to {out.delivered}")
    for failure in out.failed:
        print(f"failed: {failure}")
    return 0 if not len(out.failed) else 7
