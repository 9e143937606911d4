"""Where DRVS keeps its state on this node, and the node's settings.

Settings come from /etc/drvs/config.toml (or $DRVS_CONFIG) and can be
overridden per variable; the state directory holds the embedded store, cell
locks, run records and the VMs' data directories.
"""

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import UsageError

DEFAULT_STATE_DIR = "/var/lib/drvs"
DEFAULT_CONFIG = "/etc/drvs/config.toml"


@dataclass(frozen=True)
class Config:
    state_dir: Path
    # How often an idle cell's init checks whether it may leave (crash net;
    # the normal teardown is done by the last run, at once).
    idle_check_ms: int = 5000
    # See drvs.ns.cgroup.ensure_fast_migrations.
    favordynmods: bool = True

    @property
    def store_path(self) -> Path:
        return self.state_dir / "store.json"

    @property
    def cells_dir(self) -> Path:
        return self.state_dir / "cells"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def rootdir(self) -> Path:
        """Empty directory on which each run mounts its private root."""
        return self.state_dir / "root"


@cache
def load() -> Config:
    path = Path(os.environ.get("DRVS_CONFIG", DEFAULT_CONFIG))
    data: dict = {}
    if path.exists():  # tomllib costs 5 ms to import: only when there is a file
        import tomllib

        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"config {path}: {e}") from None
    state = os.environ.get("DRVS_STATE_DIR") or data.get("state_dir") or DEFAULT_STATE_DIR
    return Config(
        state_dir=Path(state),
        idle_check_ms=int(data.get("idle_check_ms", 5000)),
        favordynmods=bool(data.get("favordynmods", True)),
    )
