"""What every DRVS command shares: error handling, output formats."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from ..errors import OutputFailed, PermissionDenied, user_error


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (its usage block is what
    --help is for); exit 2, as every usage error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def require_root(prog: str) -> None:
    """Every command acts on the node (its namespaces, mounts, cgroups and
    state directory): as another user it would fail half-way, or make files
    root cannot tell from its own."""
    if os.geteuid() != 0:
        raise PermissionDenied(f"{prog} needs root: it manages this node's namespaces, mounts, cgroups and state")


def guarded(prog: str, body) -> int:
    """Run a command body: user errors become one line on stderr and their
    exit code; no traceback unless DRVS_DEBUG is set."""
    from .entry import settle_interrupts

    settle_interrupts()
    out = sys.stdout
    sys.stdout = _Output(out)
    try:
        code = body()
        sys.stdout.flush()  # (a full disk says so here, not at the interpreter's exit)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _discard_output()
        return 141
    except BaseException as exc:  # noqa: BLE001 - the one place errors meet the user
        if isinstance(exc, SystemExit):
            raise
        e = user_error(exc)
        if e is not None:
            print(f"{prog}: {e}", file=sys.stderr)
            return e.exit_code
        if os.environ.get("DRVS_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (set DRVS_DEBUG=1 for details)",
              file=sys.stderr)
        return 70
    finally:
        sys.stdout = out if out is not None and not out.closed else open(os.devnull, "w")


def _discard_output() -> None:
    """What standard output still buffers goes nowhere: the interpreter's
    own flush at exit would fail again, say so and exit 120."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


class _Output:
    """sys.stdout as commands see it: a failure to write is the user's to
    know of (OutputFailed), not a bug of the command's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._call("write", text)

    def flush(self):
        return self._call("flush")

    def _call(self, name, *args):
        if self._stream is None:
            raise OutputFailed("cannot write to standard output: it is closed")
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:  # (ValueError: a closed file)
            self._stream = None
            _discard_output()
            raise OutputFailed(f"cannot write to standard output: {getattr(e, 'strerror', None) or e}") from None

    @property
    def buffer(self):
        """The binary stream under (drvs logs writes bytes), watched as well."""
        if self._stream is None:
            raise OutputFailed("cannot write to standard output: it is closed")
        return _Output(self._stream.buffer)

    def __getattr__(self, name):
        if self._stream is None:
            raise OutputFailed("cannot write to standard output: it is closed")
        return getattr(self._stream, name)


def add_format(p) -> None:
    """--format table|json, and --json for short (as scripts write it)."""
    p.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format json")


def emit(data, fmt: str, table) -> None:
    """Print data as JSON for scripts, or as the command's table for people."""
    if fmt == "json":
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        table()


def print_table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    """Whole values always, as kubectl prints them: on a narrow terminal a
    cell wraps rather than ending in an ellipsis, and into a pipe the table
    is as wide as its rows (rich would cut them at 80 columns: an address
    read by grep or awk must not be "10.239.38.…")."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    if sys.stdout.isatty():
        Console(soft_wrap=True).print(t)
        return
    out = io.StringIO()
    Console(file=out, width=1 << 16, no_color=True).print(t)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in out.getvalue().splitlines()))


def age(ts: float) -> str:
    """How long ago, as kubectl prints it (5s, 3m, 2h, 4d); "-" if unknown (0)."""
    import time

    if not ts:
        return "-"
    s = int(time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"
