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


# What a client adds when etcd closed its connection at once after TLS, as
# etcd does to a certificate its revocation list names.
CLOSED_HINT = (" (if this node was removed with `drvs node rm`, etcd refuses its certificate: "
               "`drvs node reset`, then join again)")


def closed_on_us(e: BaseException | None) -> bool:
    """Whether a client's failure is the server closing or resetting the
    connection (as etcd does at once to a revoked certificate: seen as a
    disconnect, a reset or a TLS EOF, by how far the client got)."""
    import ssl

    seen = e
    while seen is not None:
        if isinstance(seen, (ConnectionResetError, ssl.SSLEOFError)) or type(seen).__name__ in (
                "RemoteProtocolError", "RemoteDisconnected", "ReadError") or "EOF" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "reason", None)
        if not isinstance(seen, BaseException):
            return False
    return False


def crl_path(data_dir: str) -> str:
    """The revocation list etcd checks every client's certificate against
    (it reads the file anew at each connection)."""
    return f"{data_dir}/tls/crl.pem"


def start(data_dir: str, address: str, ca: str, ca_key: str, preexec=None) -> int:
    """Start etcd detached (its own session); returns its pid.  It serves TLS
    with a certificate of the cluster CA and admits only clients presenting
    one (every node's certificate is one) that the CA has not revoked (the
    certificates of removed nodes), on both its ports."""
    from . import pki

    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    tls = pki.issue(ca, ca_key, "etcd", address, f"{data_dir}/tls")
    crl = crl_path(data_dir)
    if not os.path.exists(crl):  # (kept across restarts: drvs/cluster/revocation.py keeps it up to date)
        pki.write_crl(crl, ca, ca_key, ())
    client, peer = url(address), f"https://{address}:{PEER_PORT}"
    certs = ["--cert-file", tls["cert"], "--key-file", tls["key"], "--trusted-ca-file", tls["ca"],
             "--client-cert-auth", "--peer-cert-file", tls["cert"], "--peer-key-file", tls["key"],
             "--peer-trusted-ca-file", tls["ca"], "--peer-client-cert-auth",
             "--client-crl-file", crl, "--peer-crl-file", crl]
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


def healthy(endpoint: str, tls: dict, timeout: float = 1) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/health", timeout=timeout, context=client_context(tls)) as r:
            return json.load(r).get("health") == "true"
    except (OSError, ValueError):
        return False


def wait_healthy(endpoint: str, pid: int, log: str, tls: dict, timeout: float = 20) -> None:
    """Until etcd answers (checked from this process's network namespace);
    SetupError with the end of its log if it exits first (pid is our child:
    an exited one is reaped here, not taken for alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            raise SetupError(f"etcd exited: {_last_line(log)}")
        if healthy(endpoint, tls):
            return
        time.sleep(0.1)
    raise SetupError(f"etcd at {endpoint} not healthy after {timeout:.0f} s (see {log})")


def _last_line(log: str) -> str:
    """etcd's own last word (its log is JSON lines at --log-level error)."""
    try:
        with open(log, "rb") as f:
            lines = [line for line in f.read()[-8192:].decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    if not lines:
        return "(its log is empty)"
    try:
        entry = json.loads(lines[-1])
        return f"{entry.get('msg', '')}: {entry.get('error', '')}".strip(": ")
    except ValueError:
        return lines[-1][-300:]


def ensure_local(state_dir: str, info: dict) -> int | None:
    """On the node that runs the cluster's etcd (cluster init made it there:
    STATE/etcd), start it again if it is not running -- after a reboot the
    cluster has no store until someone does.  The pid of the one started,
    or None (not this node's to run, or it runs already)."""
    data = f"{state_dir}/etcd"
    if not os.path.isdir(f"{data}/data") or info.get("etcd") != [url(info["address"])]:
        return None
    if healthy(info["etcd"][0], info["tls"]):
        return None
    if running(data) is not None:
        return None  # (starting, or busy: the daemon waits for it as for any etcd)
    from .bootstrap import ca_dir

    ca = ca_dir(state_dir)
    pid = start(data, info["address"], f"{ca}/ca.pem", f"{ca}/ca.key")
    wait_healthy(info["etcd"][0], pid, f"{data}/etcd.log", info["tls"])
    return pid


def running(data: str) -> int | None:
    """The etcd serving data, if one runs (its pid file, checked against
    what that process runs: a pid is reused)."""
    try:
        with open(f"{data}/etcd.pid") as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if os.fsencode(f"{data}/data") in cmdline else None
