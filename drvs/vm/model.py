"""What a DRVM is: a name and the share of each node it may use."""

import json
import re
import time
from collections import namedtuple

from ..errors import UsageError

DEFAULT_VM = "default"
DEFAULT_PIDS = 4096
# Seconds a file system replica's node may stay NotReady before another node
# of the VM is made a replica in its place (as Kubernetes evicts pods of a
# node not ready for 5 minutes, and Ceph marks a down OSD out after 10).
FS_REPLACE_AFTER = 300.0

# A VM's name is its hostname inside the jail: one DNS label.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(name: str, what: str = "VM") -> str:
    if not _NAME.match(name or ""):
        raise UsageError(
            f"invalid {what} name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


class Limits(namedtuple("Limits", "cpus cpuset memory pids", defaults=(None, None, None, None))):
    """A share of one node; None means no limit beyond the node's own.

    cpus: CPU time in CPUs (quota / period); cpuset: which CPUs, as the
    kernel lists them; memory: bytes, no swap beyond; pids: processes and
    threads."""

    __slots__ = ()


class VmSpec:
    """A DRVM: its name (the hostname inside), its limits on a single node,
    and in a cluster its share of each chosen node (`shares`: node -> Limits).
    A VM without shares may run on any node, with `limits`.  `fs_nodes`:
    the nodes that keep a replica of its file system (the first serves it
    while it lives), a cluster VM's only; `fs_replicas`: how many replicas
    were asked for (None: the default, 2 where the VM has two nodes or
    more), which fs_nodes may be short of while the VM has fewer nodes;
    `fs_sync`: a close returns once every replica has what was written
    (else only fsync waits); `fs_replace_after`: seconds a replica's node
    may stay NotReady before another node of the VM takes its place (None:
    FS_REPLACE_AFTER; 0: never)."""

    __slots__ = ("name", "limits", "created", "shares", "fs_nodes", "fs_sync", "fs_replicas", "fs_replace_after")

    def __init__(self, name: str, limits: Limits | None = None, created: float | None = None,
                 shares: dict[str, Limits] | None = None, fs_nodes: list[str] | None = None,
                 fs_sync: bool = False, fs_replicas: int | None = None, fs_replace_after: float | None = None):
        self.name = name
        self.limits = limits if limits is not None else Limits()
        self.created = time.time() if created is None else created
        self.shares = dict(shares or {})
        self.fs_nodes = list(fs_nodes or [])
        self.fs_sync = fs_sync
        self.fs_replicas = fs_replicas
        self.fs_replace_after = fs_replace_after

    def replace_after(self) -> float:
        return FS_REPLACE_AFTER if self.fs_replace_after is None else self.fs_replace_after

    def replicas_wanted(self) -> int:
        """How many nodes should keep the file system, nodes allowing."""
        return self.fs_replicas if self.fs_replicas is not None else min(2, len(self.shares))

    def limits_on(self, node: str | None) -> Limits:
        """The limits of this VM's cell on node."""
        return self.shares.get(node, self.limits) if node else self.limits

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "limits": self.limits._asdict(), "created": self.created,
                           "shares": {n: l._asdict() for n, l in self.shares.items()},
                           "fs_nodes": self.fs_nodes, "fs_sync": self.fs_sync, "fs_replicas": self.fs_replicas,
                           "fs_replace_after": self.fs_replace_after}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VmSpec":
        data = json.loads(text)
        shares = {n: Limits(**l) for n, l in (data.get("shares") or {}).items()}
        fs_nodes = data.get("fs_nodes") or []
        # (a definition stored before the count was: the default if it has
        # as many as the default gives, else as many as it has)
        replicas = (data["fs_replicas"] if "fs_replicas" in data
                    else None if len(fs_nodes) == min(2, len(shares)) else len(fs_nodes))
        return cls(data["name"], Limits(**data.get("limits", {})), data.get("created", 0.0), shares,
                   fs_nodes, data.get("fs_sync", False), replicas, data.get("fs_replace_after"))


_SHARE_KEYS = {"cpus", "memory", "pids", "cpuset"}


def parse_share_change(text: str) -> tuple[str, tuple[Limits, frozenset]]:
    """The --node of vm update: a share's fields to set, and those to clear
    (`KEY=none`: no limit there any more); fields not named keep theirs."""
    node, _, spec = text.partition(":")
    items = [item for item in spec.split(",") if item]
    cleared = frozenset(item.partition("=")[0] for item in items if item.partition("=")[2] == "none")
    node, limits = parse_share(f"{node}:" + ",".join(i for i in items if i.partition("=")[2] != "none"))
    both = cleared & {k for k, v in limits._asdict().items() if v is not None}
    if both:
        raise UsageError(f"invalid share {text!r}: {sorted(both)[0]} given twice")
    unknown = cleared - _SHARE_KEYS
    if unknown:
        raise UsageError(f"invalid share {text!r}: expected NODE:cpus=N,memory=SIZE,pids=N,cpuset=LIST")
    return node, (limits, cleared)


def changed_share(old: "Limits | None", limits: Limits, cleared: frozenset) -> Limits:
    """A share as `vm update --node` leaves it: old's fields, those given
    set, those cleared gone (a new share: what was given)."""
    fields = (old or Limits())._asdict()
    fields.update({k: v for k, v in limits._asdict().items() if v is not None})
    fields.update(dict.fromkeys(cleared))
    return Limits(**fields)


def parse_share(text: str) -> tuple[str, Limits]:
    """`NODE[:cpus=1,memory=512M,pids=100,cpuset=0-1]`, the --node of vm create."""
    from ..units import parse_cpus, parse_cpuset, parse_memory

    node, _, spec = text.partition(":")
    if not node:
        raise UsageError(f"invalid share {text!r}: no node name before ':'")
    try:
        check_name(node)
    except UsageError:
        raise UsageError(f"invalid share {text!r}: invalid node name {node!r}") from None
    values = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _SHARE_KEYS:
            raise UsageError(f"invalid share {text!r}: expected NODE:cpus=N,memory=SIZE,pids=N,cpuset=LIST")
        if key in values:
            raise UsageError(f"invalid share {text!r}: {key} given twice")
        if key == "cpus":
            values[key] = parse_cpus(value)
        elif key == "memory":
            values[key] = parse_memory(value)
        elif key == "cpuset":
            values[key] = parse_cpuset(value)
        else:
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"invalid share {text!r}: pids must be a positive number")
            values[key] = int(value)
    return node, Limits(**values)
