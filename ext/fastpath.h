/* The supervisor's C fast path; see fastpath.c. */
#ifndef DRVS_FASTPATH_H
#define DRVS_FASTPATH_H

#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>

struct fastpath;

/* Serve listener (not owned: the caller closes it after fastpath_stop) in
 * a new thread; pids are node-indexed in ranges of `span`, own_index is
 * this node's.  NULL with errno on failure. */
struct fastpath *fastpath_start(int listener, uint32_t span, uint32_t own_index);
/* Readable when notifications wait for Python, or the listener hung up. */
int fastpath_wake_fd(const struct fastpath *fp);
/* Up to max waiting notifications; *done: hung up and nothing left. */
size_t fastpath_take(struct fastpath *fp, struct seccomp_notif *out, size_t max, int *done);
void fastpath_stop(struct fastpath *fp);

#endif
