"""Sizes and CPU amounts as users write them (`512M`, `1.5g`, `0.5`)."""

import re

from .errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


MAX_SIZE = 1 << 60  # (an exbibyte: more than any limit or disk means)


def parse_size(text: str, *, what: str = "size", least: int = 1) -> int:
    """Bytes from `100`, `64k`, `512M`, `1.5GiB` (binary multiples, as docker)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"invalid {what} {text!r}: expected a number with an optional k, m, g or t suffix")
    value = float(m.group(1)) * 1024 ** _POWERS[m.group(2).lower()]
    if value < least:
        raise UsageError(f"invalid {what} {text!r}: must be at least "
                         f"{format_size(least) if least > 1 else '1 byte'}")
    if value > MAX_SIZE:
        raise UsageError(f"invalid {what} {text!r}: must be at most 1E")
    return int(value)


MIN_MEMORY = 6 << 20  # as docker: below this a cell cannot even start its init


def parse_memory(text: str) -> int:
    """A memory limit: a size of at least MIN_MEMORY (a smaller one makes
    every run fail to start, with the kernel's OOM killer busy in vain)."""
    return parse_size(text, what="memory size", least=MIN_MEMORY)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:g}{unit}" if unit == "" else f"{n:.4g}{unit}"
        n /= 1024
    return str(n)


def parse_cpus(text: str) -> float:
    """A CPU amount: `2`, `0.5`; at least 0.01 (one percent of a CPU)."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"invalid CPU amount {text!r}: expected a number such as 0.5 or 2") from None
    if not 0.01 <= value <= 4096:
        raise UsageError(f"invalid CPU amount {text!r}: must be between 0.01 and 4096")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Seconds from `90`, `90s`, `5m`, `1.5h`; 0 allowed (off)."""
    m = _DURATION.match(str(text))
    if not m:
        raise UsageError(f"invalid {what} {text!r}: expected a number of seconds, or one with s, m or h")
    value = float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]
    if value > 365 * 86400:
        raise UsageError(f"invalid {what} {text!r}: must be at most a year")
    return value


def format_duration(seconds: float) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cpuset(text: str) -> str:
    """A CPU list as the kernel writes it: `0`, `0-3`, `0,2-3`."""
    if not _CPUSET.match(text):
        raise UsageError(f"invalid CPU list {text!r}: expected e.g. 0, 0-3 or 0,2-3")
    return text


def cpuset_text(ids) -> str:
    """A CPU list in the kernel's spelling, runs as ranges: 2-5,7."""
    runs: list[list[int]] = []
    for cpu in sorted(ids):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def cpuset_ids(text: str) -> set[int]:
    """The CPUs a (valid) CPU list names."""
    ids: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return ids
