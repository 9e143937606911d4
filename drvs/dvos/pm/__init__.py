"""The process manager (PM) of a DVOS: one process space for a VM.

`procs.py` is its per-node half (endpoint "procs@NODE": the processes of
this node's cells, seen through a procfs of each cell's pid namespace);
`server.py` the VM's PM (endpoint "pm@VM", elected among the VM's nodes),
which fans VM-wide operations out to the nodes."""
