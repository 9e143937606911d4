"""What a DRVM is: a name and the share of each node it may use."""

import json
import re
import time
from collections import namedtuple

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


class Limits(namedtuple("Limits", "cpus cpuset memory pids", defaults=(None, None, None, None))):
    """A share of one node; None means no limit beyond the node's own.

    cpus: CPU time in CPUs (quota / period); cpuset: which CPUs, as the
    kernel lists them; memory: bytes, no swap beyond; pids: processes and
    threads."""

    __slots__ = ()


class VmSpec:
    __slots__ = ("name", "limits", "created")

    def __init__(self, name: str, limits: Limits | None = None, created: float | None = None):
        self.name = name
        self.limits = limits if limits is not None else Limits()
        self.created = time.time() if created is None else created

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "limits": self.limits._asdict(), "created": self.created},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VmSpec":
        data = json.loads(text)
        return cls(data["name"], Limits(**data.get("limits", {})), data.get("created", 0.0))
