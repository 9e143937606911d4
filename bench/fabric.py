"""Benchmark: the fabric's sendrec between two nodes of a dev cluster, beside
a raw trio TCP echo and a bare TLS echo between the same two network
namespaces.

    .venv/bin/python bench/fabric.py [-n CALLS] [--rounds 5] [--seconds 0.4]

Brings up a 2-node dev cluster (network namespaces, etcd, drvmmd per node),
runs the measuring client inside n1's namespace, and takes the cluster down.
Cases: Node.sendrec on the fabric's message lane (Cap'n Proto RPC level 0,
TLS), as one node's drvmmd calls another, to drvmm@n2 (cross-node) and to
drvmm@n1 (local node), with 32-byte and 64 KiB payloads.  Baselines, servers
in n2's namespace: the raw echo (trio TCP, the targets' baseline) and the
TLS echo, the transport the lane runs on with nothing above it (asyncio
protocols on uvloop, TLS with the cluster's certificates): the fabric's own
cost is its distance from the TLS echo, TLS's the TLS echo's from the raw.

This machine's speed drifts by tens of percent within a minute, so the cases
are interleaved, not run one after another: latency in blocks of 100 calls
taking turns (CALLS per case in all), throughput (16 calls in flight; the
echoes on 16 connections, one round trip in flight on each) in --rounds
rounds of --seconds each, every case in every round; a throughput ratio is
the median of the rounds' own ratios."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

FRAMED = textwrap.dedent(r'''
    import asyncio

    class Framed(asyncio.BufferedProtocol):
        """Length-prefixed frames, each whole one handed to on_frame(transport, frame)."""
        def __init__(self, on_frame):
            self.buf = bytearray(1 << 20)
            self.view, self.end, self.on_frame = memoryview(self.buf), 0, on_frame

        def connection_made(self, transport):
            self.transport = transport

        def get_buffer(self, sizehint):
            return self.view[self.end:]

        def buffer_updated(self, nbytes):
            self.end += nbytes
            off = 0
            while self.end - off >= 4:
                n = int.from_bytes(self.buf[off:off + 4], "big")
                if self.end - off < 4 + n:
                    break
                self.on_frame(self.transport, self.view[off:off + 4 + n])
                off += 4 + n
            self.buf[:self.end - off] = self.view[off:self.end]
            self.end -= off

        def connection_lost(self, exc):
            pass
''')

CLIENT = FRAMED + textwrap.dedent(r'''
    import asyncio, json, statistics, sys, time
    import trio
    from drvs.ipc import bridge
    from drvs.ipc.fabric import Location, Tls, open_lane
    from drvs.ipc.message import Msg
    from drvs.ipc.schema import drvmm

    cfg = json.loads(sys.argv[1])
    BLOCK, FLIGHT = 100, 16

    async def timed(call, n):
        """n calls of call(), one after another (on trio or on asyncio): their times."""
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            await call()
            xs.append(time.perf_counter() - t)
        return xs

    class Lane:
        """The fabric's own message lane (Cap'n Proto RPC level 0 over TLS), as drvmmd calls another node."""
        def __init__(self, address, node):
            self.address, self.node = address, node

        async def open(self):
            self.lane = await open_lane(Location(self.node, self.address, 7700), Tls(**cfg["tls"]))
            return self

        async def call(self, payload):
            r = await self.lane.request(f"drvmm@{self.node}", Msg(drvmm.DrvmmCall.ping, payload), 5000)
            assert r.status == 0 and len(r.view()) == len(payload)  # (a view: a check needs no copy)

        async def latency(self, payload, n):
            return await timed(lambda: self.call(payload), n)

        async def throughput(self, payload, seconds):
            done, end = 0, time.perf_counter() + seconds
            async def worker():
                nonlocal done
                while time.perf_counter() < end:
                    await self.call(payload)
                    done += 1
            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for _ in range(FLIGHT):
                    n.start_soon(worker)
            return done / (time.perf_counter() - t0)

    class RawEcho:
        """A trio TCP stream, a 4-byte length before each payload."""
        async def open(self):
            self.streams = [await trio.open_tcp_stream(cfg["n2"], cfg["echo_port"]) for _ in range(FLIGHT)]
            return self

        async def _rt(self, stream, payload):
            await stream.send_all(len(payload).to_bytes(4, "big") + payload)
            got = 0
            while got < len(payload):
                got += len(await stream.receive_some(len(payload) - got))

        async def latency(self, payload, n):
            return await timed(lambda: self._rt(self.streams[0], payload), n)

        async def throughput(self, payload, seconds):
            done, end = 0, time.perf_counter() + seconds
            async def worker(stream):
                nonlocal done
                while time.perf_counter() < end:
                    await self._rt(stream, payload)
                    done += 1
            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for stream in self.streams:
                    n.start_soon(worker, stream)
            return done / (time.perf_counter() - t0)

    class TlsEcho:
        """The lane's transport alone: asyncio protocols on the host loop
        (uvloop), measured there (await bridge.aio(...) only starts and ends
        each measure)."""
        async def open(self):
            self.conns = [await bridge.aio(self._connect()) for _ in range(FLIGHT)]
            return self

        async def _connect(self):
            waiting = []
            loop = asyncio.get_running_loop()
            tls = Tls(**cfg["tls"])
            transport, _ = await loop.create_connection(
                lambda: Framed(lambda transport, frame: waiting.pop(0).set_result(None)), cfg["n2"], cfg["tls_port"],
                ssl=tls.client_context(), server_hostname="n2")
            async def rt(frame):
                f = loop.create_future()
                waiting.append(f)
                transport.write(frame)
                await f
            return rt

        async def _latency(self, frame, n):
            return await timed(lambda: self.conns[0](frame), n)

        async def _throughput(self, frame, seconds):
            done, end = 0, time.perf_counter() + seconds
            async def worker(rt):
                nonlocal done
                while time.perf_counter() < end:
                    await rt(frame)
                    done += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(rt) for rt in self.conns))
            return done / (time.perf_counter() - t0)

        async def latency(self, payload, n):
            return await bridge.aio(self._latency(len(payload).to_bytes(4, "big") + payload, n))

        async def throughput(self, payload, seconds):
            return await bridge.aio(self._throughput(len(payload).to_bytes(4, "big") + payload, seconds))

    async def main():
        cases = {"raw": await RawEcho().open(), "n2": await Lane(cfg["n2"], "n2").open(),
                 "n1": await Lane(cfg["n1"], "n1").open(), "tls": await TlsEcho().open()}
        out = {}
        for size in (32, 65536):
            payload = b"x" * size
            for case in cases.values():  # (warm-up)
                await case.latency(payload, BLOCK)
            lat = {name: [] for name in cases}
            for _ in range(max(cfg["n"] // BLOCK, 1)):
                for name, case in cases.items():
                    lat[name] += await case.latency(payload, BLOCK)
            rates = {name: [] for name in cases}
            for _ in range(cfg["rounds"]):
                for name, case in cases.items():
                    rates[name].append(await case.throughput(payload, cfg["seconds"]))
            out[size] = {name: {"latency_s": lat[name], "calls_per_s": rates[name]} for name in cases}
        print(json.dumps(out))

    bridge.run(main)
''')

TLS_ECHO_SERVER = FRAMED + textwrap.dedent(r'''
    # The TLS echo's server: asyncio protocols on uvloop; argv: address, port, TLS paths (JSON)
    import json, sys
    import uvloop
    from drvs.ipc.fabric import Tls

    async def main():
        ctx = Tls(**json.loads(sys.argv[3])).server_context()
        await asyncio.get_running_loop().create_server(
            lambda: Framed(lambda transport, frame: transport.write(bytes(frame))), sys.argv[1], int(sys.argv[2]), ssl=ctx)
        await asyncio.Event().wait()

    uvloop.run(main())
''')

ECHO_SERVER = textwrap.dedent(r'''
    import sys, trio
    async def handle(stream):
        buf = b""

        async def more():
            data = await stream.receive_some(65536)
            if not data:  # the client closed: end (an empty read forever would spin a core)
                raise EOFError
            return data

        try:
            while True:
                while len(buf) < 4:
                    buf += await more()
                n = int.from_bytes(buf[:4], "big"); buf = buf[4:]
                while len(buf) < n:
                    buf += await more()
                await stream.send_all(buf[:n]); buf = buf[n:]
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
    async def main():
        await trio.serve_tcp(handle, int(sys.argv[2]), host=sys.argv[1])
    trio.run(main)
''')

CASES = {"raw": "raw trio TCP echo n1->n2", "tls": "TLS echo (uvloop, the lane's transport) n1->n2",
         "n2": "sendrec n1 process -> drvmm@n2 (other node)", "n1": "sendrec n1 process -> drvmm@n1 (same node)"}


def _wait_listening(netns: str, port: int) -> None:
    """Until a server in netns listens on port (ss, in its namespace)."""
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htln", f"sport = :{port}"],
                             capture_output=True, text=True)
        if out.stdout.strip():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: no echo server listening on port {port} in {netns}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", "--calls", type=int, default=2000, help="latency: calls per case and size")
    p.add_argument("--rounds", type=int, default=5, help="throughput: rounds, each case in each")
    p.add_argument("--seconds", type=float, default=0.4, help="throughput: length of one case's round")
    args = p.parse_args()
    from drvs.cluster.context import setns_net
    from drvs.dev import cluster

    state = tempfile.mkdtemp(prefix="drvs-bench-fabric-")
    servers = []
    try:
        info = cluster.up(state, 2, name=cluster.new_name())
        n1, n2 = info["nodes"]
        in_n2 = {"preexec_fn": lambda: setns_net(f"/run/netns/{n2['netns']}")}
        # each side with its own node's certificate (the cluster's CA signed both)
        servers.append(subprocess.Popen([sys.executable, "-c", ECHO_SERVER, n2["address"], "7800"], **in_n2))
        tls_n2 = json.load(open(f"{n2['state_dir']}/cluster.json"))["tls"]
        servers.append(subprocess.Popen([sys.executable, "-c", TLS_ECHO_SERVER, n2["address"], "7801",
                                         json.dumps(tls_n2)], **in_n2))
        for port in (7800, 7801):
            _wait_listening(n2["netns"], port)
        tls = json.load(open(f"{n1['state_dir']}/cluster.json"))["tls"]
        cfg = {"n": args.calls, "rounds": args.rounds, "seconds": args.seconds, "n1": n1["address"],
               "n2": n2["address"], "echo_port": 7800, "tls_port": 7801, "tls": tls}
        out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(cfg)], capture_output=True, text=True,
                             preexec_fn=lambda: setns_net(f"/run/netns/{n1['netns']}"), timeout=900)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit("bench: the measuring client failed")
        results = json.loads(out.stdout)
    finally:
        for server in servers:
            server.kill()
            server.wait()
        try:
            cluster.down(state)
        finally:
            shutil.rmtree(state, ignore_errors=True)
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    print(f"{'case':58} {'median us':>10} {'p99 us':>8} {'x raw':>6} {'calls/s, 16 in flight':>22} {'x raw':>6}")
    ratios = {}
    for size, cases in results.items():
        lat = {name: sorted(r["latency_s"]) for name, r in cases.items()}
        raw_median = statistics.median(lat["raw"])
        for name in ("raw", "tls", "n2", "n1"):
            xs, rates = lat[name], cases[name]["calls_per_s"]
            median, p99 = statistics.median(xs), xs[int(len(xs) * 0.99) - 1]
            per_round = [r / raw for r, raw in zip(rates, cases["raw"]["calls_per_s"])]
            ratios[size, name] = per_round
            rate = statistics.median(rates)
            print(f"{CASES[name] + ', ' + size + ' B':58} {median * 1e6:10.0f} {p99 * 1e6:8.0f} "
                  f"{median / raw_median:6.2f} {rate:10.0f} ({rate * int(size) / 1e6:7.1f} MB/s) "
                  f"{statistics.median(per_round):6.2f}")
    cross = results["32"]
    lat_ratio = statistics.median(cross["n2"]["latency_s"]) / statistics.median(cross["raw"]["latency_s"])
    big = ratios["65536", "n2"]
    print(f"\ncross-node 32 B median / raw echo: {lat_ratio:.2f} (target <= 2)")
    print(f"cross-node 64 KiB throughput: {100 * statistics.median(big):.0f}% of raw (target >= 50%; "
          f"rounds {', '.join(f'{100 * r:.0f}' for r in big)})")
    tls_big = [t / r for t, r in zip(results["65536"]["tls"]["calls_per_s"], results["65536"]["raw"]["calls_per_s"])]
    own = [n / t for n, t in zip(results["65536"]["n2"]["calls_per_s"], results["65536"]["tls"]["calls_per_s"])]
    print(f"64 KiB throughput of the TLS echo alone: {100 * statistics.median(tls_big):.0f}% of raw; "
          f"the fabric's: {100 * statistics.median(own):.0f}% of the TLS echo's")
    print(f"(latency: {args.calls} calls per case in blocks of 100 taking turns; throughput: median of "
          f"{args.rounds} rounds of {args.seconds:g} s, every case in every round)")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    sys.exit(main())
