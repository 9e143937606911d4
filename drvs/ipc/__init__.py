"""DRVMM message passing: Cap'n Proto schemas and Minix-style endpoints
(send, sendrec, notify) between nodes (issue: the DRVMM fabric).  Not to be
confused with System V IPC for jailed programs, which a DVOS server provides."""
