"""The jail's root file system as a declarative list of launcher steps.

Like bubblewrap's command line, each step is one kernel action that
ext/jail.c carries out between fork and exec and names when it fails.  Paths
are inside the new root, except bind sources, which are host paths.
"""

import os
from collections import namedtuple

from .. import _jail as J
from ..errors import UsageError

# (op, flags, mode, src, dst, data): the tuple ext/module.c reads.
Step = tuple[int, int, int, str | None, str, bytes | None]

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# What programs need of /etc: users, the dynamic linker, locale and time,
# shells' start-up files, Debian's alternatives, TLS roots.
ETC_ENTRIES = (
    "passwd", "group", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "localtime", "timezone", "alternatives", "profile", "profile.d", "bash.bashrc",
    "inputrc", "environment", "ssl", "ca-certificates", "mime.types", "protocols",
    "services", "host.conf", "gai.conf", "os-release", "debian_version", "login.defs",
    "shells", "terminfo", "python3", "python3.11", "gitconfig", "magic", "magic.mime",
)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MASKED_PROC_FILES = ("kcore", "keys", "timer_list", "timer_stats", "sched_debug", "latency_stats")
READONLY_PROC_DIRS = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi")


# `-v SRC:DST[:ro]`; no bind goes over or into these (docker refuses /proc too)
RESERVED = ("/proc", "/.drvs")
Bind = namedtuple("Bind", "src dst readonly", defaults=(False,))


def parse_volume(text: str) -> Bind:
    parts = text.split(":")
    if len(parts) == 2:
        src, dst, mode = parts[0], parts[1], "rw"
    elif len(parts) == 3:
        src, dst, mode = parts
    else:
        raise UsageError(f"invalid volume {text!r}: expected SRC:DST or SRC:DST:ro")
    if mode not in ("ro", "rw"):
        raise UsageError(f"invalid volume {text!r}: mode must be ro or rw, not {mode!r}")
    if not src:
        raise UsageError(f"invalid volume {text!r}: no bind source before the ':'")
    if not os.path.isabs(dst) or ".." in dst.split("/") or os.path.normpath(dst) == "/":
        raise UsageError(f"invalid volume {text!r}: destination must be an absolute path below /")
    dst = os.path.normpath(dst)
    if any(dst == d or dst.startswith(d + "/") for d in RESERVED) or dst == "/dev":
        raise UsageError(f"invalid volume {text!r}: {dst} is the jail's own (/proc, /dev and /.drvs are "
                         "made by drvs; a device below /dev may be bound)")
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise UsageError(f"invalid volume {text!r}: bind source {src} does not exist")
    return Bind(src, dst, mode == "ro")


def check_binds(binds: list[Bind]) -> list[Bind]:
    """The binds, if no two have one destination (the second would hide the first)."""
    seen = set()
    for b in binds:
        if b.dst in seen:
            raise UsageError(f"invalid volumes: {b.dst} is the destination of two -v")
        seen.add(b.dst)
    return binds


def _bind(src: str, dst: str, flags: int = 0) -> Step:
    return (J.STEP_BIND, flags, 0, src, dst, None)


def _tmpfs(dst: str, options: str) -> Step:
    return (J.STEP_TMPFS, 0, 0, None, dst, options.encode())


def _symlink(target: str, dst: str) -> Step:
    return (J.STEP_SYMLINK, 0, 0, None, dst, target.encode())


def _file(dst: str, content: str, mode: int = 0o644) -> Step:
    return (J.STEP_FILE, 0, mode, None, dst, content.encode())


def system_steps() -> list[Step]:
    """Host system directories, read-only; usrmerge symlinks stay symlinks."""
    steps = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            steps.append(_symlink(os.readlink(d), d))
        elif os.path.isdir(d):
            steps.append(_bind(d, d, J.BIND_RO))
    return steps


def etc_steps(hostname: str, net_host: bool) -> list[Step]:
    steps = [(J.STEP_MKDIR, 0, 0o755, None, "/etc", None)]
    steps += [_bind(f"/etc/{e}", f"/etc/{e}", J.BIND_RO | J.BIND_TRY) for e in ETC_ENTRIES]
    steps.append(_file("/etc/hostname", f"{hostname}\n"))
    steps.append(_file("/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                       f"127.0.1.1\t{hostname}\n"))
    steps.append(_symlink("../proc/self/mounts", "/etc/mtab"))
    if net_host:
        steps.append(_bind("/etc/resolv.conf", "/etc/resolv.conf", J.BIND_RO | J.BIND_TRY))
    return steps


# Where the cell's own proc goes when /proc is the VM's view (drvs/dvos/procview.py).
REAL_PROC = "/.drvs/proc"


def proc_steps(rootdir: str, view: str | None = None) -> list[Step]:
    """A proc of the cell's pid namespace, with the host's knobs read-only.
    view: the host path of the VM's /proc view (a VM on several nodes); the
    cell's proc then sits at REAL_PROC, where the view's links point."""
    real = REAL_PROC if view else "/proc"
    steps = [(J.STEP_PROC, 0, 0, None, real, None)]
    for d in READONLY_PROC_DIRS:
        steps.append(_bind(f"{rootdir}{real}/{d}", f"{real}/{d}", J.BIND_RO | J.BIND_TRY))
    # proc has the same entries in every instance: mask those this kernel has.
    for f in MASKED_PROC_FILES:
        if os.path.exists(f"/proc/{f}"):
            steps.append(_bind("/dev/null", f"{real}/{f}", J.BIND_RO | J.BIND_DEV))
    if view:
        steps.append(_bind(view, "/proc", J.BIND_RO))
    return steps


def dev_steps() -> list[Step]:
    steps = [_tmpfs("/dev", "mode=0755,size=64k")]
    steps += [_bind(f"/dev/{d}", f"/dev/{d}", J.BIND_DEV) for d in DEVICES]
    steps.append((J.STEP_DEVPTS, 0, 0, None, "/dev/pts", b"newinstance,ptmxmode=0666,mode=0620,gid=5"))
    steps.append(_symlink("pts/ptmx", "/dev/ptmx"))
    steps.append(_tmpfs("/dev/shm", "mode=1777"))
    steps.append((J.STEP_MQUEUE, 0, 0, None, "/dev/mqueue", None))
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        steps.append(_symlink(f"/proc/self/fd/{i}", f"/dev/{name}"))
    steps.append(_symlink("/proc/self/fd", "/dev/fd"))
    return steps


def scratch_steps() -> list[Step]:
    return [
        _tmpfs("/tmp", "mode=1777"),
        _tmpfs("/run", "mode=0755"),
        (J.STEP_MKDIR, 0, 0o755, None, "/var", None),
        _symlink("../tmp", "/var/tmp"),
    ]


def data_steps(data_dir: str, home_dir: str) -> list[Step]:
    """The VM's own writable data (/data) and root's home (/root)."""
    return [_bind(data_dir, "/data"), _bind(home_dir, "/root")]


def build_root(*, rootdir: str, hostname: str, data_dir: str, home_dir: str, binds: list[Bind], net_host: bool,
               proc_view: str | None = None) -> list[Step]:
    steps = system_steps() + etc_steps(hostname, net_host) + proc_steps(rootdir, proc_view)
    steps += dev_steps() + scratch_steps() + data_steps(data_dir, home_dir)
    steps += [_bind(b.src, b.dst, J.BIND_RO if b.readonly else 0) for b in binds]
    # Last: the skeleton itself becomes read-only (its mounts keep their own mode).
    steps.append((J.STEP_REMOUNT_RO, 0, 0, None, "/", None))
    return steps
