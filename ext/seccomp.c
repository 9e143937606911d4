/* The DVOS seccomp filter; see seccomp.h. */
#define _GNU_SOURCE
#include "seccomp.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif

#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#else
#error "DRVS knows the system-call numbers of x86_64 and aarch64 only"
#endif

#define ARG_LOW(i) (offsetof(struct seccomp_data, args[i]) + (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? 4 : 0))
#define ARG0_LOW ARG_LOW(0)
#define ARG1_LOW ARG_LOW(1)

int seccomp_install_notify(const int *nrs, int count, uint32_t pid_base, uint32_t pid_top)
{
    if (count < 0 || count > SECCOMP_MAX_NOTIFIED) {
        errno = E2BIG;
        return -1;
    }
    /* Layout: arch check; one jeq per notified call; allow; the pid test
     * (base <= (u32)arg0 < top -> allow; negative pids are large unsigned
     * and so notify); the lock test for fcntl (only F_GETLK, F_SETLK and
     * F_SETLKW notify); notify (flock, fallocate, sync and syncfs always). */
    struct sock_filter prog[24 + SECCOMP_MAX_NOTIFIED];
    int n = 0, k;
    const int allow = 4 + count, pid_test = allow + 1, lock_test = pid_test + 5, notify = lock_test + 5;
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    /* Another ABI (i386 on x86_64): the kernel's own semantics, which stay
     * inside the cell's pid namespace. */
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (k = 0; k < count; k++) {
        int target = nrs[k] == SYS_fcntl ? lock_test
                     : nrs[k] == SYS_flock || nrs[k] == SYS_fallocate || nrs[k] == SYS_sync || nrs[k] == SYS_syncfs
                         ? notify
                         : pid_test;
        prog[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)nrs[k],
                                               (uint8_t)(target - (n + 1)), 0);
        n++;
    }
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    /* pid_test */
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG0_LOW);
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, pid_base, 0, 2);
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, pid_top, 1, 0);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF);
    /* lock_test: fcntl's command */
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG1_LOW);
    prog[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, F_GETLK, (uint8_t)(notify - (n + 1)), 0);
    n++;
    prog[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, F_SETLK, (uint8_t)(notify - (n + 1)), 0);
    n++;
    prog[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, F_SETLKW, (uint8_t)(notify - (n + 1)), 0);
    n++;
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    /* notify */
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF);
    struct sock_fprog fprog = {.len = (unsigned short)n, .filter = prog};
    /* Once the supervisor has taken a call, the caller waits killably only:
     * otherwise any signal to it (a SIGCHLD handler, Go's preemption)
     * restarts the call, and a signal to another node goes out twice. */
    int fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                          SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &fprog);
    if (fd < 0 && errno == EINVAL) /* before Linux 5.19 */
        fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &fprog);
    return fd;
}
