"""Where a new program of a DRVM goes (policy, apart from the jail mechanism).

A VM without shares runs where it is started.  A VM with shares runs on
this node if it holds a share; otherwise on the Ready, schedulable node
holding a share that is least loaded (CPU %, then memory %) — the simple
load-balancing rule of the paper's DRVM, to be refined by migration."""

import json

from ..cluster.membership import spec_key, status_key
from ..errors import Conflict
from .model import VmSpec


def choose_node(store, vm: VmSpec, local: str | None) -> str | None:
    """The node to run on; None for here."""
    if not vm.shares or local in vm.shares:
        return None
    candidates = []
    for node in sorted(vm.shares):
        status, spec = store.get(status_key(node)), store.get(spec_key(node))
        if status is None or spec is None or json.loads(spec.value).get("cordoned"):
            continue
        load = json.loads(status.value)
        candidates.append((load.get("cpu_percent", 0.0), load.get("memory_percent", 0.0), node))
    if not candidates:
        raise Conflict(f"VM {vm.name!r} has shares on {', '.join(sorted(vm.shares))}, "
                       "and none of them is Ready and schedulable")
    return min(candidates)[2]
