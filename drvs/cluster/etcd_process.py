"""Starting the etcd server a cluster keeps its state in (Debian's etcd-server):
data under DRVS's state directory, listening on the given address only."""

import json
import os
import subprocess
import time
import urllib.request

from ..errors import SetupError

CLIENT_PORT, PEER_PORT = 2379, 2380


def url(address: str) -> str:
    return f"https://{address}:{CLIENT_PORT}"


def start(data_dir: str, address: str, ca: str, ca_key: str, preexec=None) -> int:
    """Start etcd detached (its own session); returns its pid.  It serves TLS
    with a certificate of the cluster CA and admits only clients presenting
    one (every node's certificate is one), on both its ports."""
    from . import pki

    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    tls = pki.issue(ca, ca_key, "etcd", address, f"{data_dir}/tls")
    client, peer = url(address), f"https://{address}:{PEER_PORT}"
    certs = ["--cert-file", tls["cert"], "--key-file", tls["key"], "--trusted-ca-file", tls["ca"],
             "--client-cert-auth", "--peer-cert-file", tls["cert"], "--peer-key-file", tls["key"],
             "--peer-trusted-ca-file", tls["ca"], "--peer-client-cert-auth"]
    with open(f"{data_dir}/etcd.log", "ab") as log:
        try:
            proc = subprocess.Popen(
                ["etcd", "--name", "etcd", "--data-dir", f"{data_dir}/data", "--listen-client-urls", client,
                 "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"etcd={peer}", "--log-level", "error",
                 # watchers learn every 2 s that their stream is alive (drvs/cluster/etcd.py)
                 "--experimental-watch-progress-notify-interval", "2s", *certs],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=preexec,
                start_new_session=True)
        except FileNotFoundError:
            raise SetupError("etcd is not installed (Debian package etcd-server; scripts/setup installs it)") from None
    with open(f"{data_dir}/etcd.pid", "w") as f:
        f.write(str(proc.pid))
    return proc.pid


def client_context(tls: dict):
    """TLS for talking to the cluster's etcd with a node's certificate."""
    import ssl

    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    return ctx


def wait_healthy(endpoint: str, pid: int, log: str, tls: dict, timeout: float = 20) -> None:
    """Until etcd answers (checked from this process's network namespace)."""
    ctx = client_context(tls)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SetupError(f"etcd exited: {open(log).read()[-800:]}") from None
        try:
            with urllib.request.urlopen(endpoint + "/health", timeout=1, context=ctx) as r:
                if json.load(r).get("health") == "true":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SetupError(f"etcd at {url} not healthy after {timeout:.0f} s")
