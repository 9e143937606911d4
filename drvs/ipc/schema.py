"""The Cap'n Proto schemas, loaded once (the .capnp files are the only
declaration of the fabric's message types)."""

import os

import capnp

_HERE = os.path.dirname(__file__)
capnp.remove_import_hook()

# pycapnp ships the standard schemas (/capnp/stream.capnp) in its package.
_IMPORTS = [os.path.dirname(os.path.dirname(capnp.__file__))]

fabric = capnp.load(os.path.join(_HERE, "fabric.capnp"), imports=_IMPORTS)
drvmm = capnp.load(os.path.join(_HERE, "drvmm.capnp"), imports=_IMPORTS)
pm = capnp.load(os.path.join(_HERE, "pm.capnp"), imports=_IMPORTS)
fs = capnp.load(os.path.join(_HERE, "fs.capnp"), imports=_IMPORTS)


def new(struct, **fields):
    """struct.new_message(**fields), for hot paths: pycapnp's keyword form
    takes ~10 µs for a handful of fields here, setting them one by one
    ~1.5 µs.  Values: scalars, bytes, text, lists of scalars, and dicts
    (a nested struct, one level)."""
    m = struct.new_message()
    for name, value in fields.items():
        if isinstance(value, dict):
            sub = m.init(name)
            for k, v in value.items():
                setattr(sub, k, v)
        elif isinstance(value, (list, tuple)):
            if value:
                setattr(m, name, list(value))
        else:
            setattr(m, name, value)
    return m


# The RPC protocol's own messages, for drvs.ipc.level0.
rpc = capnp.load(os.path.join(os.path.dirname(capnp.__file__), "rpc.capnp"), imports=_IMPORTS)
