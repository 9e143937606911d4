"""VM definitions in the store: create, read, list, remove."""

from ..errors import Conflict, NotFound
from ..store import CompareFailed, Store
from .model import DEFAULT_PIDS, DEFAULT_VM, Limits, VmSpec, check_name

VMS = "/drvs/vms/"  # the VM definitions in the store (etcd on a cluster)


class VmRegistry:
    def __init__(self, store: Store):
        self.store = store

    def create(self, spec: VmSpec, unchanged_since: int | None = None) -> VmSpec | None:
        """Store a new VM; with unchanged_since (a snapshot()'s revision),
        only if no VM was made or changed since (a removal only frees room):
        else None (the
        caller decided on a stale snapshot; it looks again)."""
        check_name(spec.name)
        key = VMS + spec.name
        try:
            self.store.put(key, spec.to_json(), expect_revision=0,
                           unchanged=None if unchanged_since is None else (VMS, unchanged_since))
        except CompareFailed:
            if unchanged_since is None or self.store.get(key) is not None:
                raise Conflict(f"VM {spec.name!r} already exists") from None
            return None
        return spec

    def update(self, spec: VmSpec, revision: int, unchanged_since: int | None = None,
               same: dict | None = None) -> int | None:
        """Store a changed VM if its definition is still at revision (and,
        with unchanged_since, no VM was made or changed since a snapshot;
        with same, those keys are at those revisions): its new revision,
        else None, for the caller to look again."""
        try:
            return self.store.put(VMS + spec.name, spec.to_json(), expect_revision=revision,
                                  unchanged=None if unchanged_since is None else (VMS, unchanged_since), same=same)
        except CompareFailed:
            return None

    def entry(self, name: str):
        """The VM's definition as stored, with its revision (NotFound)."""
        check_name(name)
        if name == DEFAULT_VM:
            self.get(name)  # (made on first use)
        entry = self.store.get(VMS + name)
        if entry is None:
            raise NotFound(f"no such VM: {name!r} (see `drvs vm ls`)")
        return entry

    def get(self, name: str) -> VmSpec:
        """The VM's definition; the default VM comes into being on first use."""
        check_name(name)
        entry = self.store.get(VMS + name)
        if entry is not None:
            return VmSpec.from_json(entry.value)
        if name == DEFAULT_VM:
            try:
                return self.create(VmSpec(DEFAULT_VM, Limits(pids=DEFAULT_PIDS)))
            except Conflict:
                return self.get(name)
        raise NotFound(f"no such VM: {name!r} (see `drvs vm ls`)")

    @staticmethod
    async def get_async(etcd, name: str) -> VmSpec:
        """get() on the daemon's async etcd client (the daemon's loop must
        not wait on a synchronous store)."""
        check_name(name)
        entry = await etcd.get(VMS + name)
        if entry is not None:
            return VmSpec.from_json(entry.value)
        if name == DEFAULT_VM:
            spec = VmSpec(DEFAULT_VM, Limits(pids=DEFAULT_PIDS))
            try:
                await etcd.put(VMS + name, spec.to_json(), expect_revision=0)
                return spec
            except CompareFailed:
                return await VmRegistry.get_async(etcd, name)
        raise NotFound(f"no such VM: {name!r} (see `drvs vm ls`)")

    def list(self) -> list[VmSpec]:
        return self.snapshot()[0]

    def snapshot(self) -> "tuple[list[VmSpec], int]":  # (a string: list is the method above, here)
        """Every VM, and the store's revision they were read at."""
        entries, revision = self.store.snapshot(VMS)
        return [VmSpec.from_json(e.value) for e in entries], revision

    def remove(self, name: str) -> None:
        check_name(name)
        if not self.store.delete(VMS + name):
            raise NotFound(f"no such VM: {name!r}")
