"""Only cluster members talk to a node: peers without the cluster's
credentials are refused, and garbage does not take drvmmd down."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from drvs.cluster import pki
from drvs.cluster.context import setns_net

PROBE = textwrap.dedent("""
    import asyncio, json, os, random, socket, ssl, sys
    import capnp
    from drvs.ipc.schema import fabric

    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tls = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None

    LANE = os.environ.get("LANE") == "1"  # ask for the message lane (level-0 RPC)

    def context(cert=True):
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.check_hostname = False
        if cert:
            ctx.load_cert_chain(tls["cert"], tls["key"])
        if LANE:
            ctx.set_alpn_protocols(["drvs-msg/1"])
        return ctx

    async def capnp_call(ctx):
        async with capnp.kj_loop():
            stream = await capnp.AsyncIoStream.create_connection(host, port, ssl=ctx)
            node = capnp.TwoPartyClient(stream).bootstrap().cast_as(fabric.Node)
            return (await asyncio.wait_for(node.echo(b"hi"), 5)).data

    def raw(data, ctx=None):
        s = socket.create_connection((host, port), timeout=5)
        if ctx:
            s = ctx.wrap_socket(s)
        s.sendall(data)
        s.settimeout(0.05)
        try:
            s.recv(100)
        except OSError:
            pass
        s.close()

    try:
        if mode == "echo":
            print("OK", asyncio.run(capnp_call(context())))
        elif mode == "hold":  # one connection, called until it is cut (or 30 s)
            async def hold():
                async with capnp.kj_loop():
                    stream = await capnp.AsyncIoStream.create_connection(host, port, ssl=context())
                    node = capnp.TwoPartyClient(stream).bootstrap().cast_as(fabric.Node)
                    await asyncio.wait_for(node.echo(b"hi"), 5)
                    print("OK", flush=True)
                    for _ in range(150):
                        try:
                            await asyncio.wait_for(node.echo(b"hi"), 5)
                        except Exception:
                            return "CUT"
                        await asyncio.sleep(0.2)
                    return "STILL UP"
            print(asyncio.run(hold()))
        elif mode == "no-cert":
            print("OK", asyncio.run(capnp_call(context(cert=False))))
        elif mode == "plain":
            print("OK", asyncio.run(capnp_call(None)))
        elif mode == "impersonate":
            from drvs.ipc.schema import drvmm
            async def calls():
                async with capnp.kj_loop():
                    stream = await capnp.AsyncIoStream.create_connection(host, port, ssl=context())
                    node = capnp.TwoPartyClient(stream).bootstrap().cast_as(fabric.Node)
                    out = []
                    for mtype, payload, source in (
                            (drvmm.DrvmmCall.ping, b"p", ""),
                            (drvmm.DrvmmCall.unlock, drvmm.KeyReply.new_message(key="/drvs/locks/x/1").to_bytes_packed(), ""),
                            (drvmm.DrvmmCall.ping, b"p", sys.argv[5])):
                        req = node.sendrec_request()
                        req.target = sys.argv[5]
                        m = req.init("msg")
                        m.type, m.payload, m.source = mtype, payload, source
                        out.append((await asyncio.wait_for(req.send(), 10)).reply.status)
                    return out
            print("OK", asyncio.run(calls()))
        elif mode == "fuzz":
            rnd = random.Random(7)
            for i in range(80):
                n = rnd.choice([1, 8, 64, 4096])
                raw(bytes(rnd.randrange(256) for _ in range(n)), context())
            # a frame header announcing 2^32-1 segments, then one of 4 GiB
            raw(b"\\xff\\xff\\xff\\xff" + b"\\xff\\xff\\xff\\x7f" * 2, context())
            print("SENT")
    except Exception as e:
        print("REFUSED", type(e).__name__, e)
""")


def probe(c, node: str, target: dict, mode: str, tls: dict | None = None, *extra, lane: bool = False) -> str:
    """Run PROBE in node's namespace against target; lane: over the
    fabric's message lane (ALPN drvs-msg/1, Cap'n Proto RPC level 0)."""
    argv = [sys.executable, "-c", PROBE, target["address"], "7700", mode] + ([json.dumps(tls)] if tls else [])
    argv += list(extra)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "LANE": "1" if lane else "0"},
                       preexec_fn=lambda: setns_net(f"/run/netns/{c.node(node)['netns']}"))
    return p.stdout.strip() or p.stderr.strip()


def tls_of(c, node: str) -> dict:
    return json.loads(open(f"{c.node(node)['state_dir']}/cluster.json").read())["tls"]


def test_member_with_cluster_certificate_is_served(cluster_factory):
    c = cluster_factory(nodes=2)
    assert probe(c, "n1", c.node("n2"), "echo", tls_of(c, "n1")) == "OK b'hi'"
    assert probe(c, "n1", c.node("n2"), "echo", tls_of(c, "n1"), lane=True) == "OK b'hi'"


def test_peer_without_certificate_is_refused(cluster_factory):
    c = cluster_factory(nodes=2)
    assert probe(c, "n1", c.node("n2"), "no-cert", tls_of(c, "n1")).startswith("REFUSED")
    assert probe(c, "n1", c.node("n2"), "no-cert", tls_of(c, "n1"), lane=True).startswith("REFUSED")
    assert probe(c, "n1", c.node("n2"), "plain").startswith("REFUSED")


def test_certificate_of_another_cluster_is_refused(cluster_factory, tmp_path):
    c = cluster_factory(nodes=2)
    ca, ca_key = pki.make_ca(str(tmp_path / "evil-ca"), "evil")
    evil = pki.issue(ca, ca_key, "n1", c.node("n1")["address"], str(tmp_path / "evil"))
    # It trusts the real CA (to see the server) but presents its own certificate.
    evil["ca"] = tls_of(c, "n1")["ca"]
    assert probe(c, "n1", c.node("n2"), "echo", evil).startswith("REFUSED")
    assert probe(c, "n1", c.node("n2"), "echo", evil, lane=True).startswith("REFUSED")


def test_removed_nodes_certificate_is_refused(cluster_factory):
    """`drvs node rm` takes the node's certificate back: with it neither a
    node's fabric nor the cluster's etcd serve any more, while members go on."""
    c = cluster_factory(nodes=3)
    n3 = tls_of(c, "n3")
    assert probe(c, "n3", c.node("n2"), "echo", n3) == "OK b'hi'"
    os.killpg(c.node("n3")["pid"], signal.SIGTERM)
    c.wait_status("n3", "NotReady")
    # a connection made before the removal, kept open: cut by it
    argv = [sys.executable, "-c", PROBE, c.node("n2")["address"], "7700", "hold", json.dumps(n3)]
    held = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: setns_net(f"/run/netns/{c.node('n3')['netns']}"))
    try:
        assert held.stdout.readline() == "OK\n"
        rm = c.drvs("node", "rm", "n3", node="n1")
        assert (rm.returncode, rm.stderr) == (0, "")
        assert rm.stdout == "node/n3 removed (its name and pid range are free; its certificate is revoked)\n"
        assert held.communicate(timeout=40)[0] == "CUT\n"
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()
    deadline = time.monotonic() + 10
    while not (out := probe(c, "n3", c.node("n2"), "echo", n3)).startswith("REFUSED"):
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    assert probe(c, "n3", c.node("n1"), "echo", n3, lane=True).startswith("REFUSED")
    while (store := c.drvs("node", "ls", node="n3")).returncode == 0:  # (n3's own certificate, to etcd)
        assert time.monotonic() < deadline, store.stdout
        time.sleep(0.2)
    assert store.returncode == 6, store.stderr
    vms = c.drvs("vm", "ls", node="n3")  # (the synchronous store client says why, too)
    assert vms.returncode == 6 and "etcd refuses its certificate: `drvs node reset`" in vms.stderr, vms.stderr
    assert probe(c, "n1", c.node("n2"), "echo", tls_of(c, "n1"), lane=True) == "OK b'hi'"
    assert c.drvs("node", "ls", node="n2").returncode == 0
    # The dev harness starts n3 again with a new certificate: it joins anew.
    c.drvs("dev", "cluster", "restart", "n3", check=True)
    c.wait_status("n3", "Ready")
    assert probe(c, "n3", c.node("n2"), "echo", tls_of(c, "n3")) == "OK b'hi'"  # (the new one)


def test_a_member_may_not_act_with_another_nodes_lease_or_name(cluster_factory):
    """n1, a member with a valid certificate, calls n2's drvmm: a ping is
    served, but releasing a lock held with n2's lease is refused, and so is
    a message claiming to come from one of n2's endpoints."""
    c = cluster_factory(nodes=2)
    for lane in (False, True):
        out = probe(c, "n1", c.node("n2"), "impersonate", tls_of(c, "n1"), "drvmm@n2", lane=lane)
        assert out == f"OK [0, {-errno.EPERM}, {-errno.EPERM}]", (lane, out)


def test_garbage_does_not_take_the_daemon_down(cluster_factory):
    c = cluster_factory(nodes=2)
    assert probe(c, "n1", c.node("n2"), "fuzz", tls_of(c, "n1")) == "SENT"
    assert probe(c, "n1", c.node("n2"), "fuzz", tls_of(c, "n1"), lane=True) == "SENT"
    # n2 still serves, and its drvmmd is the same process.
    assert c.drvs("ipc", "ping", "drvmm@n2", node="n1").returncode == 0
    assert c.nodes()["n2"]["status"] == "Ready"
    assert subprocess.run(["kill", "-0", str(c.node("n2")["pid"])]).returncode == 0


def test_malformed_messages_get_error_replies(cluster_factory):
    """Unknown message types and undecodable payloads to a real endpoint."""
    c = cluster_factory(nodes=2)
    script = textwrap.dedent("""
        import random, sys
        from drvs.ipc import client
        from drvs.ipc.message import Msg
        rnd = random.Random(3)
        codes = set()
        for i in range(60):
            m = Msg(rnd.randrange(0, 70000) % 65536, bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 3, 40]))))
            if m.type in (1, 3):  # lock and campaign would block on a valid name
                m.type = 9
            r = client.sendrec(sys.argv[1], "drvmm@n2", m, timeout=5)
            codes.add(r.status)
        print(sorted(codes))
    """)
    node = c.node("n1")
    p = subprocess.run([sys.executable, "-c", script, node["state_dir"]], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: setns_net(f"/run/netns/{node['netns']}"))
    assert p.returncode == 0, p.stderr
    statuses = json.loads(p.stdout)
    assert all(s <= 0 for s in statuses) and any(s < 0 for s in statuses)
    assert c.drvs("ipc", "ping", "drvmm@n2", node="n1").returncode == 0


def test_etcd_admits_only_cluster_members(cluster_factory):
    c = cluster_factory(nodes=1)
    script = textwrap.dedent("""
        import json, ssl, sys, urllib.request
        url, ca, cert, key = sys.argv[1:5]
        def get(ctx):
            req = urllib.request.Request(url + "/v3/kv/range", data=b'{"key": "Lw=="}', method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    return "OK"
            except Exception as e:
                return "REFUSED"
        anonymous = ssl.create_default_context(cafile=ca)
        member = ssl.create_default_context(cafile=ca)
        member.load_cert_chain(cert, key)
        print(get(anonymous), get(member))
    """)
    tls = tls_of(c, "n1")
    p = subprocess.run([sys.executable, "-c", script, c.info["etcd"]["url"], tls["ca"], tls["cert"], tls["key"]],
                       capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: setns_net(f"/run/netns/{c.node('n1')['netns']}"))
    assert p.stdout.split() == ["REFUSED", "OK"], p.stderr
