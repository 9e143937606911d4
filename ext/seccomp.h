/* The DVOS system-call filter: which calls of a jailed program go to the
 * node's supervisor (seccomp user notification) and which to the kernel.
 *
 * The cell's pids are the VM's: each node's cell allocates from its own
 * range [pid_base, pid_top).  A signal to a pid of that range is the
 * kernel's business and never leaves the filter; a signal to any other pid,
 * a process group, or "everyone" is served by the supervisor. */
#ifndef DRVS_SECCOMP_H
#define DRVS_SECCOMP_H

#include <stdint.h>

#define SECCOMP_MAX_NOTIFIED 32

/* Install the filter in the calling thread (no_new_privs must be set) and
 * return the listener, or -1 with errno set.  `nrs` are the calls whose
 * argument 0 is a pid (which calls: drvs/dvos/syscalls.py, the one table);
 * they go to the supervisor unless that pid is in [pid_base, pid_top).
 * Only raw system calls: runs between fork and exec. */
int seccomp_install_notify(const int *nrs, int n, uint32_t pid_base, uint32_t pid_top);

#endif
