"""The DRVM file system: a FUSE client (pyfuse3) on every node of a VM and the
VM's replicated file server (issue: the DRVM file system).  Until it lands, a
VM's data is a local directory bound at /data by drvs.ns.rootfs."""
