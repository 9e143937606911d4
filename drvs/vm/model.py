"""What a DRVM is: a name and the share of each node it may use."""

import json
import re
import time
from dataclasses import asdict, dataclass, field

from ..errors import UsageError

DEFAULT_VM = "default"
DEFAULT_PIDS = 4096

# A VM's name is its hostname inside the jail: one DNS label.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UsageError(
            f"invalid VM name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


@dataclass
class Limits:
    """A share of one node; None means no limit beyond the node's own."""

    cpus: float | None = None      # CPU time, in CPUs (quota / period)
    cpuset: str | None = None      # which CPUs, as the kernel lists them
    memory: int | None = None      # bytes, no swap beyond it
    pids: int | None = None        # processes and threads


@dataclass
class VmSpec:
    name: str
    limits: Limits = field(default_factory=Limits)
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VmSpec":
        data = json.loads(text)
        return cls(name=data["name"], limits=Limits(**data.get("limits", {})), created=data.get("created", 0.0))
