"""Benchmark: the fabric's sendrec between two nodes of a dev cluster, beside
a raw trio TCP echo between the same two network namespaces.

    .venv/bin/python bench/fabric.py [-n CALLS]

Brings up a 2-node dev cluster (network namespaces, etcd, drvmmd per node),
runs the measuring client inside n1's namespace, and takes the cluster down.
Cases: Node.sendrec on the fabric's message lane (Cap'n Proto RPC level 0,
TLS), as one node's drvmmd calls another, to drvmm@n2 (cross-node) and to
drvmm@n1 (local node), with 32-byte and 64 KiB payloads; calls/s with 16 in flight; the raw
echo is a trio TCP server in n2's namespace and a trio client in n1's."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

CLIENT = textwrap.dedent(r'''
    import json, statistics, sys, time
    import trio
    from drvs.ipc import bridge
    from drvs.ipc.fabric import Location, Tls, open_lane
    from drvs.ipc.message import Msg
    from drvs.ipc.schema import drvmm

    cfg = json.loads(sys.argv[1])
    N = cfg["n"]

    def stats(xs):
        xs = sorted(xs)
        return {"median_us": statistics.median(xs) * 1e6, "p99_us": xs[int(len(xs) * 0.99) - 1] * 1e6}

    async def connect(address, name):
        # the fabric's own message lane (Cap'n Proto RPC level 0 over TLS), as drvmmd calls another node
        return await open_lane(Location(name, address, 7700), Tls(**cfg["tls"]))

    async def sendrec(lane, target, payload):
        r = await lane.request(target, Msg(drvmm.DrvmmCall.ping, payload), 5000)
        assert r.status == 0 and len(r.view()) == len(payload)  # (a view: a check needs no copy)

    async def rpc_case(address, name, target, size):
        node = await connect(address, name)
        payload = b"x" * size
        for _ in range(100):
            await sendrec(node, target, payload)
        xs = []
        for _ in range(N):
            t = time.perf_counter()
            await sendrec(node, target, payload)
            xs.append(time.perf_counter() - t)
        # throughput: 16 calls in flight
        done = 0
        t0 = time.perf_counter()
        async def worker():
            nonlocal done
            for _ in range(N // 16):
                await sendrec(node, target, payload)
                done += 1
        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(worker)
        return {**stats(xs), "calls_per_s": done / (time.perf_counter() - t0), "MB_per_s": done * size / (time.perf_counter() - t0) / 1e6}

    async def echo_case(address, port, size):
        stream = await trio.open_tcp_stream(address, port)
        payload = b"x" * size
        async def rt():
            await stream.send_all(len(payload).to_bytes(4, "big") + payload)
            got = 0
            while got < size:
                got += len(await stream.receive_some(size - got))
        for _ in range(100):
            await rt()
        xs = []
        for _ in range(N):
            t = time.perf_counter()
            await rt()
            xs.append(time.perf_counter() - t)
        # throughput: 16 round trips in flight, one connection each
        done = 0
        async def worker():
            nonlocal done
            s = await trio.open_tcp_stream(address, port)
            for _ in range(N // 16):
                await s.send_all(len(payload).to_bytes(4, "big") + payload)
                got = 0
                while got < size:
                    got += len(await s.receive_some(size - got))
                done += 1
            await s.aclose()
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(worker)
        elapsed = time.perf_counter() - t0
        return {**stats(xs), "calls_per_s": done / elapsed, "MB_per_s": done * size / elapsed / 1e6}

    async def main():
        out = {}
        for size in (32, 65536):
            out[f"raw trio TCP echo n1->n2, {size} B"] = await echo_case(cfg["n2"], cfg["echo_port"], size)
            out[f"sendrec n1 process -> drvmm@n2 (other node), {size} B"] = await rpc_case(cfg["n2"], "n2", "drvmm@n2", size)
            out[f"sendrec n1 process -> drvmm@n1 (same node), {size} B"] = await rpc_case(cfg["n1"], "n1", "drvmm@n1", size)
        print(json.dumps(out))

    bridge.run(main)
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", "--calls", type=int, default=2000)
    args = p.parse_args()
    from drvs.cluster.context import setns_net
    from drvs.dev import cluster

    state = tempfile.mkdtemp(prefix="drvs-bench-fabric-")
    echo = None
    try:
        info = cluster.up(state, 2, name=cluster.new_name())
        n1, n2 = info["nodes"]
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, n2["address"], "7800"],
                                preexec_fn=lambda: setns_net(f"/run/netns/{n2['netns']}"))
        tls = json.load(open(f"{n1['state_dir']}/cluster.json"))["tls"]
        cfg = {"n": args.calls, "n1": n1["address"], "n2": n2["address"], "echo_port": 7800, "tls": tls}
        out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(cfg)], capture_output=True, text=True,
                             preexec_fn=lambda: setns_net(f"/run/netns/{n1['netns']}"), check=True, timeout=600)
        results = json.loads(out.stdout)
    finally:
        if echo:
            echo.kill()
            echo.wait()
        try:
            cluster.down(state)
        finally:
            shutil.rmtree(state, ignore_errors=True)
    print(f"{'case':58} {'median us':>10} {'p99 us':>8} {'x raw':>6} {'calls/s (16 in flight)':>24}")
    for name, r in results.items():
        size = name.rsplit(", ", 1)[1]
        raw = results[f"raw trio TCP echo n1->n2, {size}"]["median_us"]
        extra = f"{r['calls_per_s']:10.0f} ({r['MB_per_s']:.1f} MB/s)" if "calls_per_s" in r else ""
        print(f"{name:58} {r['median_us']:10.0f} {r['p99_us']:8.0f} {r['median_us'] / raw:6.2f} {extra:>24}")
    raw64 = results["raw trio TCP echo n1->n2, 65536 B"]["MB_per_s"]
    fab64 = results["sendrec n1 process -> drvmm@n2 (other node), 65536 B"]["MB_per_s"]
    cross = results["sendrec n1 process -> drvmm@n2 (other node), 32 B"]["median_us"]
    print(f"\ncross-node median / raw echo: {cross / results['raw trio TCP echo n1->n2, 32 B']['median_us']:.2f}"
          f" (target <= 2); 64 KiB throughput: {100 * fab64 / raw64:.0f}% of raw (target >= 50%)")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    sys.exit(main())
