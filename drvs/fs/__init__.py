"""The DRVM file system: each cluster VM's files, kept on some of its nodes
(store.py), served by an elected file server fs@VM (server.py, service.py)
that streams every change to the other replicas (replica.py), and shown by
every node's drvmmd through its DVOS view (client.py, drvs/dvos/view.py).
A single node's VM keeps a local data directory, bound at /data by
drvs.ns.rootfs."""
