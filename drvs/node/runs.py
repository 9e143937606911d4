"""A node's runs, as files in its runs directory: RUN.json (the record,
while the run lasts), RUN.log (a detached run's output) and RUN.exit (how a
detached run ended, written by its monitor).  `drvs logs`, `wait` and
`kill` read them on the run's node: here, or through that node's drvmm
(drvs/ipc/services.py) when the run is another node's."""

import errno
import json
import os
import re
import select
import signal

import trio

from ..errors import DrvsError, NotFound, UsageError
from ..ns import cell as cells
from ..ns import jail

FOLLOW_POLL = 0.1  # seconds between looks at a followed log or awaited run
EXIT_GRACE = 15.0  # a run's record gone, its monitor writes how it ended within this (its cell's end may take 5 s)
LOG_CHUNK = 256 * 1024  # at most this much of a log in one message


def check_id(run_id: str) -> None:
    """A run id is what drvs-run -d printed, never a path."""
    if not re.fullmatch(r"[0-9a-f]{12}", run_id):
        raise UsageError(f"invalid run id {run_id!r}: expected the 12 hex digits drvs-run -d printed")


def log_path(cfg, run_id: str) -> str:
    return f"{cfg.runs_dir}/{run_id}.log"


def exit_path(cfg, run_id: str) -> str:
    return f"{cfg.runs_dir}/{run_id}.exit"


def forget_runs(cfg, gone, before: float | None = None) -> None:
    """The logs and exit statuses of ended detached runs of the VMs for
    which gone(name) holds (drvs vm rm here; the reconciler on every node
    of a cluster), those that ended before `before` (time.time()) if given."""
    try:
        names = os.listdir(cfg.runs_dir)
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".exit"):
            continue
        path = f"{cfg.runs_dir}/{name}"
        try:
            with open(path) as f:
                if not gone(json.load(f).get("vm")) or (before is not None and os.fstat(f.fileno()).st_mtime >= before):
                    continue
        except (OSError, ValueError):
            continue
        for each in (f"{cfg.runs_dir}/{name[:-5]}.log", path):
            try:
                os.unlink(each)
            except OSError:
                pass


def listing(cfg, vm: str | None = None, every: bool = False) -> list[dict]:
    """This node's runs (of vm, if given) that run, and with `every` the
    detached ones that ended and are kept: {id, vm, argv, started,
    detached, running, code, note} (code and note once ended)."""
    found = []
    for name in sorted(_names(cfg.runs_dir)):
        run_id, ext = name[:12], name[12:]
        if ext == ".json":
            try:
                rec = record(cfg, run_id)
            except NotFound:
                continue
            if _alive(jail.open_run_keeper(rec)):  # (running(), without reading the record again)
                found.append({"id": run_id, "vm": rec.get("vm", ""), "argv": rec.get("argv", []),
                              "started": rec.get("started", 0.0), "detached": bool(rec.get("detached")),
                              "running": True})
        elif ext == ".exit" and every and (end := ended(cfg, run_id)) is not None:
            found.append({"id": run_id, "vm": end.get("vm", ""), "argv": end.get("argv", []),
                          "started": end.get("started", 0.0), "detached": True, "running": False,
                          "code": end["code"], "note": end.get("note", "")})
    return [r for r in found if vm is None or r["vm"] == vm]


def _names(directory: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if re.fullmatch(r"[0-9a-f]{12}\.(json|exit)", n)]
    except FileNotFoundError:
        return []


def known(cfg, run_id: str) -> bool:
    """Whether this node has the run (running, or ended with its log kept)."""
    return any(os.path.exists(f"{cfg.runs_dir}/{run_id}{ext}") for ext in (".json", ".log", ".exit"))


def record(cfg, run_id: str) -> dict:
    try:
        with open(f"{cfg.runs_dir}/{run_id}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        raise NotFound(f"no such run: {run_id!r}") from None


def ended(cfg, run_id: str) -> dict | None:
    """How a detached run ended ({"code", "note"}), or None while it runs."""
    try:
        with open(exit_path(cfg, run_id)) as f:
            end = json.load(f)
    except (OSError, ValueError):
        return None
    return end if isinstance(end, dict) and isinstance(end.get("code"), int) else None


def _alive(pidfd: int | None) -> bool:
    """Whether the process has not ended (a zombie has: its pidfd reads)."""
    if pidfd is None:
        return False
    try:
        return not select.select([pidfd], [], [], 0)[0]
    finally:
        os.close(pidfd)


def running(cfg, run_id: str) -> bool:
    try:
        return _alive(jail.open_run_keeper(record(cfg, run_id)))
    except NotFound:
        return False


def monitor(cfg, run_id: str) -> int | None:
    """A pidfd on the process that watches a detached run and records its
    end (its record names it while the run lasts), or None."""
    try:
        return os.pidfd_open(record(cfg, run_id)["monitor"])
    except (NotFound, KeyError, ProcessLookupError):
        return None


def monitor_alive(cfg, run_id: str) -> bool:
    return _alive(monitor(cfg, run_id))


def vanished(run_id: str) -> NotFound:
    """A detached run whose log went while it was followed or awaited: its
    VM was removed, and its files with it."""
    return NotFound(f"run {run_id!r} is gone, with its log and exit status: its VM was removed (drvs vm rm)")


def lost(run_id: str) -> DrvsError:
    return DrvsError(f"run {run_id!r} ended and left no exit status (its monitor was killed)")


def parse_signal(name: str) -> int:
    """A signal by name (TERM, SIGTERM, RTMIN+3) or number, one a run's
    keeper passes on (not the one it keeps for itself)."""
    upper = name.upper().removeprefix("SIG")
    realtime = re.fullmatch(r"(RTMIN|RTMAX)([+-]\d+)?", upper)
    try:
        if upper.isascii() and upper.isdecimal():
            signum = int(upper)
        elif realtime:
            signum = getattr(signal, "SIG" + realtime.group(1)) + int(realtime.group(2) or 0)
        else:
            signum = signal.Signals["SIG" + upper].value
    except KeyError:
        raise UsageError(f"unknown signal {name!r}") from None
    last = int(jail.END_RUN_SIGNAL) - 1
    if signum == jail.END_RUN_SIGNAL:
        raise UsageError(f"signal {name!r} is the one DRVS ends runs with: use KILL")
    if not 0 <= signum <= last or (realtime and signum < signal.SIGRTMIN):
        raise UsageError(f"unknown signal {name!r} (signals are 0 to {last})")
    return signum


def send_signal(cfg, run_id: str, signum: int) -> None:
    """Signal a run of this node (its keeper passes the signal on)."""
    try:
        rec = record(cfg, run_id)
    except NotFound:
        end = ended(cfg, run_id)
        if end is None:
            raise
        raise NotFound(f"run {run_id!r} has ended (exit status {end['code']})") from None
    if signum == signal.SIGKILL:
        # The keeper cannot pass SIGKILL on; its own "end the run" signal
        # kills the program and whatever it left.
        signum = jail.END_RUN_SIGNAL
    pidfd = jail.open_run_keeper(rec)
    if pidfd is None:
        end = ended(cfg, run_id)
        raise NotFound(f"run {run_id!r} has ended" + (f" (exit status {end['code']})" if end else ""))
    try:
        if signum == signal.SIGSTOP:
            _stop_program(rec["keeper"])
        else:
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        raise NotFound(f"run {run_id!r} has ended") from None
    finally:
        os.close(pidfd)


def _stop_program(keeper: int) -> None:
    """SIGSTOP to the run's program itself, as `docker kill -s STOP` stops
    a container's first process: the keeper cannot pass it on (it would
    stop, and a later KILL with it).  The program is the keeper's child,
    or the child of the group anchor between them (--pgid).  (Called with
    a pidfd on the keeper held: its children are its own.)"""
    pid = keeper
    for _ in range(2):
        kids = cells.children(pid)
        if not kids:
            raise ProcessLookupError(errno.ESRCH, "no program")
        pid = kids[0]
        if _comm(pid) != "drvs-group":
            break
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    finally:
        os.close(pidfd)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def read_log(cfg, run_id: str, offset: int, size: int) -> bytes:
    """Up to size bytes of the run's log from offset (NotFound: no log)."""
    try:
        fd = os.open(log_path(cfg, run_id), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no log of run {run_id!r} (detached runs have one)") from None
    try:
        return os.pread(fd, size, offset) if size else b""
    finally:
        os.close(fd)


async def query_log(cfg, run_id: str, offset: int, size: int, wait: float) -> dict:
    """What drvmm answers for a run of this node (DrvmmCall.runLog): its log
    from offset and whether it ended, waiting up to `wait` seconds for
    either when there is neither yet (`drvs logs -f` and `drvs wait` from
    another node ask again and again).  gone: neither its record, nor its
    monitor, nor how it ended is there (for EXIT_GRACE: the monitor was
    killed)."""
    check_id(run_id)
    if not known(cfg, run_id):
        raise NotFound(f"no such run: {run_id!r}")
    deadline = trio.current_time() + wait
    while True:
        end = ended(cfg, run_id)  # (read before the log: all output is in it once the end is written)
        detached = os.path.exists(log_path(cfg, run_id))
        data = await trio.to_thread.run_sync(read_log, cfg, run_id, offset, size) if size else b""
        if end is not None:
            return {"data": data, "ended": True, "exitCode": end["code"], "note": end.get("note", ""),
                    "detached": True}
        gone = not (running(cfg, run_id) or monitor_alive(cfg, run_id))
        if data or trio.current_time() >= deadline or not detached:
            return {"data": data, "ended": False, "gone": gone, "detached": detached}
        await trio.sleep(FOLLOW_POLL * 5)
