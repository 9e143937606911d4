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
