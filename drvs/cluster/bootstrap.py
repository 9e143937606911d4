"""Making a cluster of real machines: `drvs cluster init` and `drvs node join`.

init (on the first node): a CA, a join secret, etcd (unless one is given),
this node's certificate and cluster.json.  Its drvmmd then also serves the
join service (Bootstrap, fabric port + 1).

join (on each other node): the token is `SECRET.FINGERPRINT`; the newcomer
fetches the CA over TLS, accepts it only if its sha256 is FINGERPRINT, then
asks, over TLS verified with that CA, for a certificate for its own key
(generated here; the key never leaves the node).  The first node checks the
secret and that the name is free.
"""

import asyncio
import errno
import hmac
import json
import os
import secrets
import ssl

from ..errors import Conflict, DrvsError, EtcdUnavailable, SetupError, UsageError
from ..ipc.message import IpcError
from . import pki
from .etcd import EtcdError

JOIN_PORT_OFFSET = 1


class JoinRefused(DrvsError):
    """The cluster's first node said no (wrong token)."""

    exit_code = 8


def ca_dir(state_dir: str) -> str:
    return f"{state_dir}/cluster-ca"


def init(state_dir: str, address: str, cluster: str, node: str, etcd: list[str] | None = None) -> str:
    """Make this node the first of a new cluster; returns the join token."""
    from ..vm.model import check_name
    from . import etcd_process

    check_name(node, "node")
    check_name(cluster, "cluster")
    _check_ip(address)
    check_local(address)
    for url in etcd or ():
        _check_url(url)
    if os.path.exists(f"{state_dir}/cluster.json"):
        raise Conflict(f"this node is in a cluster already ({state_dir}/cluster.json)")
    if etcd:
        _check_etcd(etcd)  # (before anything is made: a cluster whose etcd never answered is none)
    _make_state_dir(state_dir)
    ca, ca_key = pki.make_ca(ca_dir(state_dir), cluster)
    secret = secrets.token_hex(16)
    _write_private(f"{ca_dir(state_dir)}/join-secret", secret)
    tls = pki.issue(ca, ca_key, node, address, f"{state_dir}/tls")
    if not etcd:
        data = f"{state_dir}/etcd"
        pid = etcd_process.start(data, address, ca, ca_key)
        etcd = [etcd_process.url(address)]
        etcd_process.wait_healthy(etcd[0], pid, f"{data}/etcd.log", tls)
    _write_json(f"{state_dir}/cluster.json",
                {"cluster": cluster, "etcd": etcd, "node": node, "address": address, "tls": tls})
    with open(ca, "rb") as f:
        return f"{secret}.{pki.fingerprint(f.read())}"


def join(state_dir: str, server: str, token: str, address: str, node: str, port: int) -> dict:
    """Join the cluster whose first node is at server; returns cluster.json."""
    from ..vm.model import check_name

    check_name(node, "node")
    _check_ip(address)
    check_local(address)
    secret, dot, fp = token.partition(".")
    if not dot or len(fp) != 64 or not secret:
        raise UsageError("invalid token: expected SECRET.FINGERPRINT as printed by `drvs cluster init`")
    if os.path.exists(f"{state_dir}/cluster.json"):
        raise Conflict(f"this node is in a cluster already ({state_dir}/cluster.json)")
    _make_state_dir(state_dir)  # (before the first node reserves the name: nothing fails after it)
    key_pem, csr_pem = pki.new_key_and_csr(node)
    reply = asyncio.run(_ask(server, port + JOIN_PORT_OFFSET, fp, secret, node, address, csr_pem.decode()))
    tls = pki.write_node_files(f"{state_dir}/tls", reply["ca"].encode(), reply["cert"].encode(), key_pem)
    info = {"cluster": reply["cluster"], "etcd": reply["etcd"], "node": node, "address": address, "tls": tls}
    _write_json(f"{state_dir}/cluster.json", info)
    return info


async def _ask(server: str, port: int, fingerprint: str, secret: str, node: str, address: str, csr: str) -> dict:
    import capnp

    from ..ipc import wire
    from ..ipc.schema import fabric

    async def connect(ctx):
        try:
            stream = await asyncio.wait_for(wire.connect(host=server, port=port, ssl=ctx), 5)
        except (OSError, asyncio.TimeoutError) as e:
            raise IpcError(f"{server}:{port} unreachable: {e or 'timed out'} (the join service of the first "
                           f"node's drvmmd: the fabric's port + {JOIN_PORT_OFFSET}; is drvmmd running there?)",
                           errno.EHOSTUNREACH) from None
        client = capnp.TwoPartyClient(stream)
        return client, client.bootstrap().cast_as(fabric.Bootstrap)

    async with capnp.kj_loop():
        # 1. The CA, over TLS we cannot check yet: it is pinned by the token.
        blind = ssl.create_default_context()
        blind.check_hostname, blind.verify_mode = False, ssl.CERT_NONE
        client, boot = await connect(blind)
        ca_pem = (await asyncio.wait_for(boot.ca(), 10)).pem
        if not hmac.compare_digest(pki.fingerprint(ca_pem.encode()), fingerprint):
            raise JoinRefused(f"the cluster at {server} has another CA than the token names: not joining")
        del boot, client
        # 2. The certificate, over TLS verified with that CA.
        ctx = ssl.create_default_context(cadata=ca_pem)
        ctx.check_hostname = False  # the CA is the cluster's own: any of its nodes will do
        client, boot = await connect(ctx)
        r = await asyncio.wait_for(boot.join(secret, node, address, csr), 10)
        if r.error:
            if r.error.startswith(STORE_AWAY):
                raise EtcdUnavailable(r.error.removeprefix(STORE_AWAY))
            raise (Conflict if "in use" in r.error else JoinRefused)(r.error)
        return {"cert": r.cert, "ca": r.ca, "etcd": list(r.etcd), "cluster": r.cluster}


def serving_ca(state_dir: str) -> bool:
    return os.path.exists(f"{ca_dir(state_dir)}/ca.key")


def server_class():
    """The capnp Bootstrap server (built lazily: the schema imports capnp)."""
    from ..ipc.schema import fabric

    class BootstrapServer(fabric.Bootstrap.Server):
        def __init__(self, state_dir: str, info: dict, etcd, guest):
            self.dir, self.info, self.etcd, self.guest = ca_dir(state_dir), info, etcd, guest

        async def ca(self, _context, **kwargs):
            with open(f"{self.dir}/ca.pem") as f:
                _context.results.pem = f.read()

        async def join(self, token, name, address, csr, _context, **kwargs):
            res = _context.results
            with open(f"{self.dir}/join-secret") as f:
                secret = f.read().strip()
            if not hmac.compare_digest(token.encode(), secret.encode()):
                res.error = "join refused: wrong token"
                return
            try:
                from ..vm.model import check_name

                check_name(name, "node")
                _check_ip(address)
                # (signed first: a bad request reserves nothing; kept only if the name is had)
                cert = pki.sign_csr(f"{self.dir}/ca.pem", f"{self.dir}/ca.key", csr.encode(), name, address)
                problem = await self.guest.call_trio(self._reserve, name, address, pki.serial_of(cert))
                if problem:
                    res.error = f"join refused: {problem}"
                    return
            except (EtcdUnavailable, EtcdError) as e:  # (away, or answering without a leader)
                res.error = f"{STORE_AWAY}{e}"
                return
            except (DrvsError, ValueError) as e:
                res.error = f"join refused: {e}"
                return
            with open(f"{self.dir}/ca.pem") as f:
                res.ca = f.read()
            res.cert, res.cluster = cert.decode(), self.info["cluster"]
            etcd = res.init("etcd", len(self.info["etcd"]))
            for i, url in enumerate(self.info["etcd"]):
                etcd[i] = url

        async def _reserve(self, name: str, address: str, serial: str) -> str | None:
            """Claim the name for the newcomer (compare-and-swap): a name that
            ever joined stays its node's (until `drvs node rm`, which revokes
            the certificate `serial` names), so a token holder cannot get a
            certificate that passes for an existing node.  Why not, or None."""
            import time

            from ..store import CompareFailed
            from .membership import ROOT, spec_key

            for entry in await self.etcd.range(ROOT):
                if entry.key.endswith("/spec") and json.loads(entry.value).get("address") == address:
                    other = json.loads(entry.value).get("name")
                    return f"address {address} is node {other!r}'s"
            spec = {"name": name, "address": address, "uid": "", "cpus": 0, "memory": 0,
                    "version": "", "joined": time.time(), "cordoned": False, "serial": serial}
            try:
                await self.etcd.put(spec_key(name), json.dumps(spec), expect_revision=0)
            except CompareFailed:
                return f"node name {name!r} is in use (a node of that name has joined)"
            return None

    return BootstrapServer


STORE_AWAY = "etcd: "  # a join's error that is the store's absence, not a refusal (exit 6, not 8)


def check_local(address: str) -> None:
    """address is one of this machine's (a node listens on it)."""
    import socket

    s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((address, 0))
    except OSError as e:
        raise UsageError(f"--address {address}: not an address of this machine ({e.strerror})") from None
    finally:
        s.close()


def _check_url(url: str) -> None:
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        ok = u.scheme in ("http", "https") and u.hostname and u.port
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"--etcd {url!r}: expected an etcd client URL, as https://HOST:2379")


def _check_etcd(urls: list[str], timeout: float = 3.0) -> None:
    """EtcdUnavailable unless one of the etcd URLs given answers healthy."""
    import json
    import ssl
    import urllib.request

    why = ""
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout,
                                        context=ssl.create_default_context()) as r:
                if json.load(r).get("health") == "true":
                    return
                why = f"{url} says it is not healthy"
        except (OSError, ValueError) as e:
            why = f"{url}: {getattr(e, 'reason', None) or e}"
    raise EtcdUnavailable(f"etcd unreachable ({why}); nothing was made")


def _make_state_dir(state_dir: str) -> None:
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SetupError(f"state directory {state_dir}: {e.strerror}") from None


def _check_ip(address: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"invalid address {address!r}: expected this node's IP address") from None


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.rename(tmp, path)

