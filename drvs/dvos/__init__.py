"""DVOS, the guest OS of a DRVM: the system-call path (supervisor, syscall
table) and the Minix-style servers jailed programs reach through it (the
process manager in `pm/`; the file server in `drvs/fs/`)."""
