"""Errors a user sees: one line each, with a documented exit code.

The CLI prints `str(error)` and exits with `error.exit_code`; nothing else
reaches the user, never a traceback.  The table is in README.md.
"""

import errno as _errno
import os


class DrvsError(Exception):
    """Base of every error meant for the user."""

    exit_code = 1


class UsageError(DrvsError):
    """Bad flag, bad value (a size, a name, a mount spec)."""

    exit_code = 2


class NotFound(DrvsError):
    """An unknown VM, run or node."""

    exit_code = 3


class Conflict(DrvsError):
    """The thing exists already, or is in use."""

    exit_code = 4


class PermissionDenied(DrvsError):
    """DRVS needs root (namespaces, cgroups, mounts) and did not have it."""

    exit_code = 77


class OutputFailed(DrvsError):
    """Standard output did not take what a command wrote (closed, a full disk)."""

    exit_code = 74  # (sysexits' EX_IOERR)


class StoreError(DrvsError):
    """The store of VM definitions is unreadable or corrupt."""

    exit_code = 5


class EtcdUnavailable(DrvsError):
    """No etcd endpoint of the cluster answered in time."""

    exit_code = 6


class DaemonAway(DrvsError):
    """This node's drvmmd does not answer (as a node that does not: the
    fabric's IpcError has the same status)."""

    exit_code = 7


class SetupError(DrvsError):
    """A step of building the jail failed; the program did not start."""

    exit_code = 125


def user_error(exc: BaseException) -> "DrvsError | None":
    """The DrvsError inside exc, also when trio wrapped it in an ExceptionGroup."""
    if isinstance(exc, DrvsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = user_error(inner)
            if found is not None:
                return found
    return None


def reason(e: "BaseException | None", none: str = "no endpoint", empty: str = "") -> str:
    """Why something failed, in words, never empty (a timeout's own text is:
    `empty`, else the exception's name)."""
    if e is None:
        return none
    if isinstance(e, TimeoutError) or type(e).__name__.endswith(("Timeout", "TooSlowError")):
        return "no answer in time"  # (one wording for every layer's: a socket's, TLS's, httpx's, trio's)
    inner = getattr(e, "reason", None)  # (urllib's URLError: "<urlopen error ...>" around the reason)
    if isinstance(inner, BaseException) or (isinstance(inner, str) and type(e).__name__ == "URLError"):
        return reason(inner, none, empty) if isinstance(inner, BaseException) else inner
    text = str(e)
    if text.startswith("_ssl.c:"):  # (where in CPython's ssl module, not why)
        text = text.split(": ", 1)[-1]
    return text or empty or type(e).__name__


def os_error(what: str, err: OSError | int) -> str:
    """`what: strerror` for a kernel error, the way coreutils words it."""
    code = err if isinstance(err, int) else (err.errno or _errno.EIO)
    return f"{what}: {os.strerror(code)}"
