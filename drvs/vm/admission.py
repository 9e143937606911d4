"""Whether a VM's shares fit in their nodes (policy, apart from the cells
that enforce the limits).

An administrator partitions a cluster into DRVMs: a share is a part of a
node, so by default the shares given on a node, of every VM, add up to no
more CPUs and memory than the node has.  A share that names no amount
reserves none (it runs within the node's own limits, as a container
without --cpus does); `--overcommit` lets a VM's shares go past what is
left, as cgroup limits allow."""

from ..errors import Conflict, UsageError
from ..units import cpuset_ids, format_size
from .model import Limits, VmSpec


def check_share(node: str, spec: dict, share: Limits) -> None:
    """A share asks for no more than its node has (UsageError: no
    admission setting makes it fit)."""
    if share.cpus and share.cpus > spec["cpus"]:
        raise UsageError(f"share of {node} asks for {share.cpus:g} CPUs; {node} has {spec['cpus']}")
    if share.cpuset and "cpu_list" in spec and not cpuset_ids(share.cpuset) <= set(spec["cpu_list"]):
        raise UsageError(f"share of {node} asks for CPUs {share.cpuset}; {node} has "
                         f"{','.join(map(str, spec['cpu_list']))}")
    if share.memory and share.memory > spec["memory"]:
        raise UsageError(f"share of {node} asks for {format_size(share.memory)} of memory; "
                         f"{node} has {format_size(spec['memory'])}")


def given(vms: list[VmSpec], node: str, resource: str) -> tuple[float, list[str]]:
    """How much of a resource ("cpus", "memory") the VMs' shares of node
    reserve, and which VMs reserve some."""
    amounts = [(getattr(vm.shares[node], resource), vm.name) for vm in vms if node in vm.shares]
    amounts = [(amount, name) for amount, name in amounts if amount]
    return sum(amount for amount, _ in amounts), [name for _, name in amounts]


def check_fits(node: str, spec: dict, share: Limits, others: list[VmSpec]) -> None:
    """share fits in what node has left beside the other VMs' shares
    (Conflict: it would once they are gone, or with --overcommit)."""
    for resource, unit, show in (("cpus", " CPUs", lambda n: f"{n:g}"), ("memory", " of memory", format_size)):
        asked = getattr(share, resource)
        held, names = given(others, node, resource)
        if asked and held + asked > spec[resource] * (1 + 1e-9):
            who = f"{', '.join(names)} hold" if len(names) > 1 else f"{names[0]} holds"
            raise Conflict(f"share of {node} asks for {show(asked)}{unit}; {node} has {show(spec[resource])}, "
                           f"and {who} {show(held)} of {'them' if resource == 'cpus' else 'it'} "
                           "(--overcommit allows it)")
