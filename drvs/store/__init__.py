"""Cluster state: a key-value store with revisions and compare-and-swap.

A single node keeps it in an embedded file (`EmbeddedStore`); a cluster keeps
it in etcd behind the same interface.  Keys are `/`-separated paths; values
are UTF-8 JSON documents.
"""

from collections import namedtuple


# Records on drvs-run's start-up path are namedtuples, not dataclasses:
# importing dataclasses (and inspect) costs 7 ms of a 4 ms jail.
Entry = namedtuple("Entry", "key value create_revision mod_revision")


class Store:
    """The interface every store implements (no typing import: drvs-run's
    start-up time counts)."""

    def get(self, key: str) -> Entry | None:
        raise NotImplementedError

    def range(self, prefix: str) -> list[Entry]:
        raise NotImplementedError

    def snapshot(self, prefix: str) -> tuple[list[Entry], int]:
        """range(prefix), and the store's revision it was read at (for
        put's unchanged)."""
        raise NotImplementedError

    def put(self, key: str, value: str, *, expect_revision: int | None = None,
            unchanged: tuple[str, int] | None = None, same: dict | None = None) -> int:
        """Store value; with expect_revision, only if the key's mod revision
        is that (0: the key must not exist); with unchanged (prefix,
        revision), only if no key under prefix was written after that
        revision (a decision made on a snapshot still holds; a key deleted
        since is not seen); with same {key: mod revision, 0 if absent}, only
        if those other keys are as they were read.  Returns the new
        revision or raises `CompareFailed`."""
        raise NotImplementedError

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        raise NotImplementedError


class CompareFailed(Exception):
    """A compare-and-swap found another revision than expected."""


def open_store():
    """The store this node uses: the cluster's etcd, or on a single node the
    embedded file."""
    import os

    from .. import config

    cfg = config.load()
    cluster = f"{cfg.state_dir}/cluster.json"
    if os.path.exists(cluster):
        import json

        from .etcd import EtcdStore

        with open(cluster) as f:
            info = json.load(f)
        return EtcdStore(info["etcd"], tls=info.get("tls"))
    from .embedded import EmbeddedStore

    return EmbeddedStore(cfg.store_path)
