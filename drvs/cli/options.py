"""Command-line options shared by drvs-run and `drvs exec`, container style."""

import argparse
import grp
import os
import pwd

from ..errors import UsageError
from ..ns import rootfs
from ..ns.jail import DEFAULT_CAPS, RunOptions
from ..units import cpuset_ids, cpuset_text, parse_cpus, parse_cpuset, parse_memory
from ..vm.model import Limits, check_name


def typed(fn):
    """argparse reports type errors with usage and exit 2; ours are UsageErrors."""
    def convert(text):
        try:
            return fn(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = fn.__name__
    return convert


def node_name(text: str) -> str:
    """A --node option's value: a node's name (never empty)."""
    from ..vm.model import check_name

    return check_name(text, "node")


def _workdir(text: str) -> str:
    if not text.startswith("/"):
        raise UsageError(f"invalid working directory {text!r}: must be an absolute path in the jail")
    return text


def _pgid(text: str) -> int:
    if not text.isdigit() or not 1 < int(text) < 1 << 22:
        raise UsageError(f"invalid process group {text!r}: expected a VM pid (see drvs ps)")
    return int(text)


PID_MAX_LIMIT = 1 << 22  # the kernel's most pids (pids.max takes no more)


def _pids(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"invalid pids limit {text!r}: expected a positive number")
    if int(text) > PID_MAX_LIMIT:
        raise UsageError(f"invalid pids limit {text!r}: the kernel allows at most {PID_MAX_LIMIT}")
    return int(text)


def check_here(limits: Limits) -> Limits:
    """Limits that apply on this node, checked against its CPUs (as docker
    does): a CPU list naming CPUs it has not, or more CPU time than it has,
    would fail every run later."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            online = f.read().strip()
    except OSError:
        return limits
    have = cpuset_ids(online)
    if limits.cpuset and not cpuset_ids(limits.cpuset) <= have:
        missing = cpuset_text(cpuset_ids(limits.cpuset) - have)
        raise UsageError(f"invalid CPU list {limits.cpuset!r}: this machine has no CPU {missing} (it has {online})")
    if limits.cpus and limits.cpus > len(have):
        raise UsageError(f"invalid CPU amount {limits.cpus:g}: this machine has {len(have)} CPUs")
    return limits


def add_limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=typed(parse_cpus), help="CPU time, in CPUs (e.g. 0.5)")
    p.add_argument("--cpuset-cpus", type=typed(parse_cpuset), metavar="LIST", help="CPUs to run on (e.g. 0-1)")
    p.add_argument("--memory", "-m", type=typed(parse_memory),
                   metavar="SIZE", help="memory limit (e.g. 512M); no swap beyond it")
    p.add_argument("--pids-limit", type=typed(_pids), metavar="N", help="most processes and threads")


def limits_from(args) -> Limits:
    return Limits(cpus=args.cpus, cpuset=args.cpuset_cpus, memory=args.memory, pids=args.pids_limit)


def add_run_options(p: argparse.ArgumentParser, *, with_vm: bool = True) -> None:
    if with_vm:
        p.add_argument("--vm", default=os.environ.get("DRVS_VM", "default"), type=typed(check_name),
                       help="the DRVM to run in (default: $DRVS_VM or 'default')")
    p.add_argument("-v", "--volume", action="append", default=[], type=typed(rootfs.parse_volume),
                   metavar="SRC:DST[:ro]", help="bind a host path into the jail")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (K alone: take it from here)")
    p.add_argument("-w", "--workdir", default=None, metavar="DIR", type=typed(_workdir),
                   help="working directory, an absolute path in the jail (default /data)")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open to the program's terminal")
    p.add_argument("-t", "--tty", action="store_true", help="give the program a terminal (inside the jail)")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="run as this user (name or uid)")
    p.add_argument("--net", choices=("none", "host"), default="none",
                   help="none: loopback only (default); host: this node's network")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP", help="or ALL")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background; print the run's id")
    p.add_argument("--node", dest="run_node", default=None, metavar="NAME", type=typed(node_name),
                   help="run on node NAME of this node's cluster")
    p.add_argument("--pgid", type=typed(_pgid), default=0, metavar="PGID",
                   help="run in process group PGID of another node of the VM (kill -PGID then reaches it)")
    add_limit_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]")


def _env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or "\0" in item:
            raise UsageError(f"invalid environment variable {item!r}: expected K=V")
        if not sep:
            if key not in os.environ:
                continue
            value = os.environ[key]
        env[key] = value
    return env


def _user(spec: str | None) -> tuple[int, int, list[int]]:
    if not spec:
        return 0, 0, []
    name, _, group = spec.partition(":")
    try:
        if name.isdigit():
            uid, gid, groups = int(name), int(name), []
        else:
            pw = pwd.getpwnam(name)
            uid, gid = pw.pw_uid, pw.pw_gid
            groups = os.getgrouplist(name, gid)
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"unknown user or group in {spec!r}") from None
    return uid, gid, groups


def _caps(add: list[str], drop: list[str]) -> tuple[str, ...]:
    import prctl

    known = set(prctl.ALL_CAP_NAMES)
    norm = lambda c: c.lower().removeprefix("cap_")  # noqa: E731
    for c in add + drop:
        if norm(c) not in known and norm(c) != "all":
            raise UsageError(f"unknown capability {c!r}")
    caps = set(DEFAULT_CAPS)
    if any(norm(c) == "all" for c in drop):
        caps = set()
    caps -= {norm(c) for c in drop}
    caps |= known if any(norm(c) == "all" for c in add) else {norm(c) for c in add}
    return tuple(sorted(caps))


def run_options(args, *, login: bool = False) -> RunOptions:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no command given: put it after the options, e.g. drvs-run -- /bin/sh")
    uid, gid, groups = _user(args.user)
    return RunOptions(
        argv=argv, env=_env(args.env), cwd=args.workdir or ("/root" if login else "/data"),
        binds=rootfs.check_binds(args.volume), tty=args.tty, interactive=args.interactive or login,
        limits=limits_from(args), net_host=args.net == "host", uid=uid, gid=gid, groups=groups,
        caps=_caps(args.cap_add, args.cap_drop), detached=args.detach, pgid=getattr(args, "pgid", 0))
