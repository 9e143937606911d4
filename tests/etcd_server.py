"""A real etcd server for tests: on loopback (or in a test's network
namespace), its data in a temporary directory, always stopped and removed."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, host: str = "127.0.0.1", netns: str | None = None, data_dir: str | None = None):
        self.host = host
        self.netns = netns
        self.client_port = free_port() if host == "127.0.0.1" else 2379
        self.peer_port = free_port() if host == "127.0.0.1" else 2380
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="drvs-etcd-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout: float = 20) -> "EtcdServer":
        peer = f"http://{self.host}:{self.peer_port}"
        argv = ["etcd", "--name", "drvs-test", "--data-dir", f"{self.data_dir}/data",
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"drvs-test={peer}", "--log-level", "error"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        self.log = open(f"{self.data_dir}/etcd.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {open(f'{self.data_dir}/etcd.log').read()[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("etcd did not become healthy")

    def healthy(self) -> bool:
        if self.netns:
            r = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-sf", "-m", "1", self.url + "/health"],
                               capture_output=True)
            return r.returncode == 0
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
