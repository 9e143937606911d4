/* The supervisor's fast path: a C thread per seccomp listener that answers,
 * on its own, the notifications whose answer needs no server (a pid of no
 * node: the kernel's; a bad signal number: EINVAL), and queues the others
 * for the Python supervisor, waking it through a pipe.
 *
 * Why a thread in C: a notification answered from the trio loop costs
 * ~60 us here (guest-mode wake-ups), from a blocked C thread with the
 * sync wake-up flag ~2 us.  The thread touches no Python object. */
#define _GNU_SOURCE
#include "fastpath.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif

struct fastpath {
    int listener, wake_r, wake_w, stop_r, stop_w;
    uint32_t span, own_index;
    pthread_t thread;
    pthread_mutex_t lock;
    struct seccomp_notif *queue; /* pending for Python */
    size_t len, cap;
    int done;                    /* the listener hung up: no more programs */
};

/* Where the pid of argument `arg` is, for each call: the served calls all
 * take a pid first; the signal is argument 1, or 2 for the tg* calls. */
static int signal_arg(int nr)
{
    return (nr == SYS_tgkill || nr == SYS_rt_tgsigqueueinfo) ? 2 : 1;
}

/* 0: queue for Python; 1: answered here (continue); -errno: fail the call. */
static int decide(const struct fastpath *fp, const struct seccomp_notif *n)
{
    if (n->data.nr == SYS_fcntl || n->data.nr == SYS_flock || n->data.nr == SYS_fallocate || n->data.nr == SYS_sync ||
        n->data.nr == SYS_syncfs)
        return 0; /* locks (the filter sent only lock commands), fallocate, syncs: the file server's */
    int32_t pid = (int32_t)n->data.args[0];
    int32_t sig = (int32_t)n->data.args[signal_arg(n->data.nr)];
    if (sig < 0 || sig > 64)
        return -EINVAL;
    if (pid <= 0)
        return 0; /* groups, every process: the PM's */
    uint32_t index = (uint32_t)pid / fp->span;
    if (index == 0 || index == fp->own_index)
        return 1; /* pid 1 and the node's own: the kernel's */
    return 0;
}

static void answer(int listener, uint64_t id, int verdict)
{
    struct seccomp_notif_resp r;
    memset(&r, 0, sizeof r);
    r.id = id;
    if (verdict == 1)
        r.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    else
        r.error = verdict;
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &r);
}

static void push(struct fastpath *fp, const struct seccomp_notif *n)
{
    pthread_mutex_lock(&fp->lock);
    if (fp->len == fp->cap) {
        size_t cap = fp->cap ? fp->cap * 2 : 16;
        void *q = realloc(fp->queue, cap * sizeof *fp->queue);
        if (!q) {
            pthread_mutex_unlock(&fp->lock);
            answer(fp->listener, n->id, -ENOMEM);
            return;
        }
        fp->queue = q;
        fp->cap = cap;
    }
    fp->queue[fp->len++] = *n;
    pthread_mutex_unlock(&fp->lock);
    char byte = 'n';
    (void)!write(fp->wake_w, &byte, 1);
}

static void *run(void *arg)
{
    struct fastpath *fp = arg;
    struct pollfd p[2] = {{fp->listener, POLLIN, 0}, {fp->stop_r, POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[1].revents)
            break;
        if (p[0].revents & POLLIN) {
            struct seccomp_notif n;
            memset(&n, 0, sizeof n);
            if (ioctl(fp->listener, SECCOMP_IOCTL_NOTIF_RECV, &n) < 0)
                continue; /* ENOENT: the caller died meanwhile */
            int verdict = decide(fp, &n);
            if (verdict)
                answer(fp->listener, n.id, verdict);
            else
                push(fp, &n);
        } else if (p[0].revents & (POLLHUP | POLLERR)) {
            break;
        }
    }
    pthread_mutex_lock(&fp->lock);
    fp->done = 1;
    pthread_mutex_unlock(&fp->lock);
    char byte = 'h';
    (void)!write(fp->wake_w, &byte, 1);
    return NULL;
}

struct fastpath *fastpath_start(int listener, uint32_t span, uint32_t own_index)
{
    struct fastpath *fp = calloc(1, sizeof *fp);
    int wake[2] = {-1, -1}, stop[2] = {-1, -1};
    if (!fp || pipe2(wake, O_CLOEXEC | O_NONBLOCK) < 0 || pipe2(stop, O_CLOEXEC) < 0)
        goto fail;
    fp->listener = listener;
    fp->wake_r = wake[0];
    fp->wake_w = wake[1];
    fp->stop_r = stop[0];
    fp->stop_w = stop[1];
    fp->span = span ? span : 1;
    fp->own_index = own_index;
    pthread_mutex_init(&fp->lock, NULL);
    /* Wake the caller on our CPU when we answer (6.6+); harmless without. */
    (void)ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, 1UL);
    if ((errno = pthread_create(&fp->thread, NULL, run, fp)) != 0) {
        pthread_mutex_destroy(&fp->lock);
        goto fail;
    }
    return fp;
fail:;
    int err = errno;
    for (int i = 0; i < 2; i++) {
        if (wake[i] >= 0)
            close(wake[i]);
        if (stop[i] >= 0)
            close(stop[i]);
    }
    free(fp);
    errno = err;
    return NULL;
}

int fastpath_wake_fd(const struct fastpath *fp)
{
    return fp->wake_r;
}

size_t fastpath_take(struct fastpath *fp, struct seccomp_notif *out, size_t max, int *done)
{
    char buf[256];
    while (read(fp->wake_r, buf, sizeof buf) > 0)
        ;
    pthread_mutex_lock(&fp->lock);
    size_t n = fp->len < max ? fp->len : max;
    memcpy(out, fp->queue, n * sizeof *out);
    memmove(fp->queue, fp->queue + n, (fp->len - n) * sizeof *out);
    fp->len -= n;
    *done = fp->done && fp->len == 0;
    if (fp->len) { /* more than max: come back */
        char byte = 'n';
        (void)!write(fp->wake_w, &byte, 1);
    }
    pthread_mutex_unlock(&fp->lock);
    return n;
}

void fastpath_stop(struct fastpath *fp)
{
    char byte = 's';
    (void)!write(fp->stop_w, &byte, 1);
    pthread_join(fp->thread, NULL);
    pthread_mutex_destroy(&fp->lock);
    close(fp->wake_r);
    close(fp->wake_w);
    close(fp->stop_r);
    close(fp->stop_w);
    free(fp->queue);
    free(fp);
}
