"""The Cap'n Proto schemas, loaded once (the .capnp files are the only
declaration of the fabric's message types)."""

import os

import capnp

_HERE = os.path.dirname(__file__)
capnp.remove_import_hook()

fabric = capnp.load(os.path.join(_HERE, "fabric.capnp"))
drvmm = capnp.load(os.path.join(_HERE, "drvmm.capnp"))
