"""Certificates of removed nodes, refused from then on.

Every node's certificate is signed by the cluster CA and valid for years,
so `drvs node rm` must take back the removed node's: it lists the
certificate's serial under /drvs/revoked/.  Every drvmmd refuses fabric
connections made with a listed certificate (Revoked), and the node that
holds the CA keeps etcd's revocation list in step (crl_writer), so the
certificate opens neither the fabric nor the cluster's store.  A node that
joins again under the same name is given a new certificate."""

import logging

import trio

from ..errors import DrvsError
from .etcd import Changes, Etcd, EtcdUnavailable

log = logging.getLogger("drvmmd")

REVOKED = "/drvs/revoked/"  # SERIAL (hex) -> the node whose certificate it was
RESYNC = 10.0               # seconds: read the whole list again at least this often


def revoked_key(serial: str) -> str:
    return f"{REVOKED}{serial}"


def _normal(serial: str) -> str | None:
    """One spelling of a serial: getpeercert()'s upper-case hex, padded, or
    ours (None: not a serial)."""
    try:
        return format(int(serial, 16), "x")
    except ValueError:
        return None


class Revoked:
    """The serials revoked, as this node last read them (kept by follow())."""

    def __init__(self):
        self.serials: frozenset[str] = frozenset()

    async def load(self, etcd: Etcd) -> bool:
        """Read the list; whether it changed."""
        serials = frozenset(_normal(e.key[len(REVOKED):]) for e in await etcd.range(REVOKED)) - {None}
        changed, self.serials = serials != self.serials, serials
        return changed

    @staticmethod
    def serial(cert: dict | None) -> str | None:
        """The serial of a peer's certificate (ssl's getpeercert())."""
        return _normal((cert or {}).get("serialNumber") or "")

    def admits(self, cert: dict | None) -> bool:
        """Whether a peer's certificate is not revoked."""
        return self.serial(cert) not in self.serials

    async def follow(self, etcd: Etcd, on_change=None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the list up to date, forever; `await on_change(serials)`
        after each change (and once at first), again at the next pass if it
        returned False.  Started once the first read succeeded (a node
        must not serve a moment without the list)."""
        changes = Changes(etcd, REVOKED, "revocations")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(changes.watch)
            started, due = False, True
            while True:
                try:
                    due |= await self.load(etcd)
                    if due and on_change is not None:
                        due = not await on_change(self.serials)
                    if not started:
                        started = True
                        task_status.started()
                except (DrvsError, EtcdUnavailable, OSError) as e:
                    log.warning("revocations: %s", e)
                await changes.wait(RESYNC if started else 1)


def crl_keeping(state_dir: str, info: dict) -> tuple[str, str, str] | None:
    """(ca, ca_key, crl) when this node keeps etcd's revocation list: it
    holds the CA and runs the cluster's etcd (the first node of a cluster
    made by `drvs cluster init`; n1 of a dev cluster, which is told so)."""
    import os

    from . import etcd_process
    from .bootstrap import ca_dir

    if info.get("crl"):
        return info["crl"]["ca"], info["crl"]["ca_key"], info["crl"]["path"]
    ca, data = ca_dir(state_dir), f"{state_dir}/etcd"
    if os.path.exists(f"{ca}/ca.key") and os.path.isdir(f"{data}/data"):
        return f"{ca}/ca.pem", f"{ca}/ca.key", etcd_process.crl_path(data)
    return None


def crl_writer(ca: str, ca_key: str, path: str):
    """on_change for Revoked.follow: etcd's revocation list made anew."""
    from . import pki

    async def write(serials) -> bool:
        try:
            await trio.to_thread.run_sync(pki.write_crl, path, ca, ca_key, serials)
        except (OSError, ValueError) as e:
            log.error("revocations: cannot write etcd's revocation list %s: %s; trying again", path, e)
            return False
        log.info("revocations: etcd's revocation list names %d certificates", len(serials))
        return True

    return write
