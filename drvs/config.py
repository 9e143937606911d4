"""Where DRVS keeps its state on this node, and the node's settings.

Settings come from /etc/drvs/config.toml (or $DRVS_CONFIG) and can be
overridden per variable; the state directory holds the embedded store, cell
locks, run records and the VMs' data directories.
"""

import os
from functools import cache

from .errors import UsageError

DEFAULT_STATE_DIR = "/var/lib/drvs"
DEFAULT_CONFIG = "/etc/drvs/config.toml"
DEFAULT_FS_CACHE_MIB = 1024


class Config:
    """This node's settings.

    idle_check_ms: how often an idle cell's init checks whether it may leave
    (the safety net; the last run tears its cell down at once).
    favordynmods: see drvs.ns.cgroup.ensure_fast_migrations.
    fs_cache_mib: how much of remote files' data this node keeps on its disk
    (drvs/fs/cache.py); 0: none."""

    __slots__ = ("state_dir", "idle_check_ms", "favordynmods", "fs_cache_mib")

    def __init__(self, state_dir: str, idle_check_ms: int = 5000, favordynmods: bool = True,
                 fs_cache_mib: int = DEFAULT_FS_CACHE_MIB):
        self.state_dir = str(state_dir)
        self.idle_check_ms = idle_check_ms
        self.favordynmods = favordynmods
        self.fs_cache_mib = fs_cache_mib

    @property
    def cgroup_root(self) -> str:
        """Name of the cgroup that holds this state directory's cells, under
        the caller's own: two DRVS installs on one machine (another state
        directory) must not share cells."""
        if self.state_dir == DEFAULT_STATE_DIR:
            return "drvs"
        import hashlib

        return "drvs-" + hashlib.sha256(self.state_dir.encode()).hexdigest()[:8]

    @property
    def store_path(self) -> str:
        return f"{self.state_dir}/store.json"

    @property
    def cells_dir(self) -> str:
        return f"{self.state_dir}/cells"

    @property
    def runs_dir(self) -> str:
        return f"{self.state_dir}/runs"

    @property
    def vms_dir(self) -> str:
        return f"{self.state_dir}/vms"

    @property
    def cache_dir(self) -> str:
        return f"{self.state_dir}/cache"

    @property
    def rootdir(self) -> str:
        """Empty directory on which each run mounts its private root."""
        return f"{self.state_dir}/root"


def _fs_cache(value, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 24:
        raise UsageError(f"config {path}: fs_cache_mib must be a whole number of MiB from 0 to 16777216")
    return value


def _idle_check(value, path: str) -> int:
    if not isinstance(value, int) or not 50 <= value <= 3_600_000:
        raise UsageError(f"config {path}: idle_check_ms must be a whole number of ms from 50 to 3600000")
    return value


KEYS = {"state_dir", "idle_check_ms", "favordynmods", "fs_cache_mib"}


@cache
def load() -> Config:
    path = os.environ.get("DRVS_CONFIG") or DEFAULT_CONFIG
    data: dict = {}
    if path != DEFAULT_CONFIG and not os.path.exists(path):  # (named on purpose: a typo is not "no config")
        raise UsageError(f"config {path} (DRVS_CONFIG): no such file")
    if os.path.exists(path):  # tomllib costs 5 ms to import: only when there is a file
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"config {path}: {e}") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"config {path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    state = os.environ.get("DRVS_STATE_DIR") or data.get("state_dir") or DEFAULT_STATE_DIR
    if not os.path.isabs(state):  # (every process of the node must find the same one, from any directory)
        raise UsageError(f"state directory {state!r}: must be an absolute path")
    if os.path.exists(state) and not os.path.isdir(state):
        raise UsageError(f"state directory {state}: not a directory")
    return Config(
        state_dir=state,
        idle_check_ms=_idle_check(data.get("idle_check_ms", 5000), path),
        favordynmods=bool(data.get("favordynmods", True)),
        fs_cache_mib=_fs_cache(data.get("fs_cache_mib", DEFAULT_FS_CACHE_MIB), path),
    )
