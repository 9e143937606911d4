"""This node's part in serving VM file systems: it campaigns for fs@VM of
every VM that keeps a replica here, and serves it from its store when
elected."""

from ..dvos import elected
from .server import FsServer
from .store import Store


def store_dir(cfg, vm: str) -> str:
    return f"{cfg.vms_dir}/{vm}/fs"


async def run(cfg, etcd, fabric, member) -> None:
    def candidate(spec) -> bool:
        return bool(spec.fs_nodes) and spec.fs_nodes[0] == member.name

    def make(vm: str) -> FsServer:
        return FsServer(vm, Store(store_dir(cfg, vm), vm), fabric, member.name)

    await elected.run(etcd, fabric, member, "fs", candidate, make)
