"""The console scripts' entry points.  Python takes tens of milliseconds to
import a command before its own handling of ^C begins: a ^C then would end
it with a traceback.  Until the command is ready (common.guarded, or the
daemon's main), it ends quietly with 130 instead, as a ^C does later."""

import _signal  # (not signal: it imports enum and collections, a window of its own)
import os
import sys


def _early_interrupt(signum, frame):
    os._exit(130)  # (nothing done yet: nothing to undo)


def settle_interrupts() -> None:
    """From now on a ^C is the command's own (KeyboardInterrupt)."""
    if _signal.getsignal(_signal.SIGINT) is _early_interrupt:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def _enter(module: str, settle: bool = False) -> int:
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # (not an ignored one: kept)
        _signal.signal(_signal.SIGINT, _early_interrupt)
    import importlib

    main = importlib.import_module(module).main
    if settle:
        settle_interrupts()
    return main()


def drvs() -> None:
    sys.exit(_enter("drvs.cli.main"))


def drvs_run() -> None:
    sys.exit(_enter("drvs.cli.run"))


def drvmmd() -> None:
    sys.exit(_enter("drvs.node.daemon", settle=True))
