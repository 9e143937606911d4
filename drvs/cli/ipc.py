"""`drvs ipc ping`, `drvs lock ...`, `drvs election ...`: the fabric's message
passing and the DRVMM's lock and election services, from the command line."""

import time

from .. import config
from ..cluster.context import cluster_info
from ..errors import NotFound


def add_parsers(sub) -> None:
    ipc = sub.add_parser("ipc", help="message passing between endpoints")
    verbs = ipc.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("ping", help="sendrec round trips to an endpoint (e.g. drvmm@n2)")
    p.add_argument("target")
    p.add_argument("-c", "--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=ping)

    lock = sub.add_parser("lock", help="cluster-wide locks, held by this node")
    verbs = lock.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("acquire", help="wait for the lock NAME; print its key")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=0, help="seconds (default: wait as long as it takes)")
    p.set_defaults(func=lock_acquire)
    p = verbs.add_parser("release", help="release a lock by its key")
    p.add_argument("key")
    p.set_defaults(func=lock_release)

    el = sub.add_parser("election", help="leader election among nodes")
    verbs = el.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("campaign", help="wait until this node leads NAME; print the leadership key")
    p.add_argument("name")
    p.add_argument("--value", default="", help="what to announce (default: this node's name)")
    p.add_argument("--timeout", type=float, default=0)
    p.set_defaults(func=campaign)
    p = verbs.add_parser("leader", help="print the current leader of NAME")
    p.add_argument("name")
    p.set_defaults(func=leader)
    p = verbs.add_parser("resign", help="give up a leadership by its key")
    p.add_argument("key")
    p.set_defaults(func=resign)


def _local() -> tuple[str, str]:
    cfg = config.load()
    info = cluster_info(cfg)
    if info is None:
        raise NotFound("this node is in no cluster (single node)")
    return cfg.state_dir, f"drvmm@{info['node']}"


def _call(call, payload: bytes, timeout: float, target: str | None = None):
    from ..ipc import client
    from ..ipc.message import Msg, check

    state_dir, local = _local()
    target = target or local
    # A blocking call's own timeout, plus the fabric's bound on top.
    reply = client.sendrec(state_dir, target, Msg(call, payload), timeout=timeout)
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
    from ..ipc.schema import drvmm

    for i in range(args.count):
        payload = f"ping {i}".encode()
        t0 = time.perf_counter()
        reply = _call(drvmm.DrvmmCall.ping, payload, args.timeout, target=args.target)
        ms = (time.perf_counter() - t0) * 1000
        same = "ok" if reply.payload == payload else "CORRUPT"
        print(f"reply from {reply.source or args.target}: seq={i} time={ms:.2f} ms {same}")
    return 0


def _wait(timeout: float) -> float:
    return timeout + 5 if timeout else 30 * 86400.0


def lock_acquire(args) -> int:
    from ..ipc.schema import drvmm

    reply = _call(drvmm.DrvmmCall.lock, _name_request(args.name, timeout=args.timeout), _wait(args.timeout))
    print(_key_reply(reply).key)
    return 0


def lock_release(args) -> int:
    from ..ipc.schema import drvmm

    _call(drvmm.DrvmmCall.unlock, _key(args.key), 10)
    return 0


def campaign(args) -> int:
    from ..ipc.schema import drvmm

    reply = _call(drvmm.DrvmmCall.campaign, _name_request(args.name, args.value, args.timeout), _wait(args.timeout))
    print(_key_reply(reply).key)
    return 0


def leader(args) -> int:
    from ..ipc.schema import drvmm

    value = _key_reply(_call(drvmm.DrvmmCall.leader, _name_request(args.name), 10)).value
    if not value:
        raise NotFound(f"election {args.name!r} has no leader")
    print(value)
    return 0


def resign(args) -> int:
    from ..ipc.schema import drvmm

    _call(drvmm.DrvmmCall.resign, _key(args.key), 10)
    return 0
