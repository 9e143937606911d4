"""Cluster coordination (DRVMM): etcd, node membership, locks and election."""
