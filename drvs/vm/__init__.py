"""DRVM: a distributed VM, its definition and (later) its policies."""
