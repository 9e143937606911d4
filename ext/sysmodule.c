/* drvs._sys: the kernel interfaces of the DVOS system-call path that Python
 * lacks: the seccomp user-notification listener (receive, respond, id
 * valid), reads of a caller's memory, signals with a siginfo through a
 * pidfd, a detached procfs of another pid namespace, and the C thread that
 * receives a listener's notifications (fastpath.c); for supervisors of
 * their own (and tests): a filter in this thread, blocking receive, addfd,
 * writes to the caller's memory.
 *
 * Each function is one kernel step and raises OSError naming it. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fastpath.h"
#include "seccomp.h"

#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif


#ifndef PIDFD_SIGNAL_THREAD
#define PIDFD_SIGNAL_THREAD (1UL << 0)
#endif

static PyObject *os_error(const char *step)
{
    int err = errno;
    PyObject *args = Py_BuildValue("(iss)", err, strerror(err), step);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* respond(fd, id, val, error, cont): error is a positive errno or 0; cont
 * lets the kernel run the call itself (only for calls whose arguments are
 * plain values: nothing the caller could change after our check). */
static PyObject *py_respond(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, error, cont;
    unsigned long long id;
    long long val;
    if (!PyArg_ParseTuple(args, "iKLip", &fd, &id, &val, &error, &cont))
        return NULL;
    struct seccomp_notif_resp resp = {.id = id, .val = val, .error = error ? -error : 0,
                                      .flags = cont ? SECCOMP_USER_NOTIF_FLAG_CONTINUE : 0};
    if (cont)
        resp.val = resp.error = 0;
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp) < 0) {
        if (errno == ENOENT) /* the caller is gone (killed mid-call): nothing to answer */
            Py_RETURN_FALSE;
        return os_error("seccomp-notif-send");
    }
    Py_RETURN_TRUE;
}

static PyObject *py_id_valid(PyObject *self, PyObject *args)
{
    (void)self;
    int fd;
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "iK", &fd, &id))
        return NULL;
    __u64 v = id;
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &v) == 0)
        Py_RETURN_TRUE;
    if (errno == ENOENT)
        Py_RETURN_FALSE;
    return os_error("seccomp-notif-id-valid");
}

/* probe() -> None, or raise: is user notification available here? */
static PyObject *py_probe(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    __u32 action = SECCOMP_RET_USER_NOTIF;
    if (syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &action) < 0)
        return os_error("seccomp-user-notif-available");
    struct seccomp_notif_sizes sizes;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0)
        return os_error("seccomp-notif-sizes");
    if (sizes.seccomp_notif < sizeof(struct seccomp_notif) || sizes.seccomp_data < sizeof(struct seccomp_data)) {
        errno = ENOSYS;
        return os_error("seccomp-notif-sizes");
    }
    Py_RETURN_NONE;
}

/* read_mem(pid, addr, size) -> bytes: the caller's memory, without
 * attaching to it; EFAULT for a bad pointer. */
static PyObject *py_read_mem(PyObject *self, PyObject *args)
{
    (void)self;
    int pid;
    unsigned long long addr;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "iKn", &pid, &addr, &size))
        return NULL;
    if (size < 0 || size > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "read_mem: size out of range");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out)
        return NULL;
    struct iovec local = {PyBytes_AS_STRING(out), (size_t)size};
    struct iovec remote = {(void *)(uintptr_t)addr, (size_t)size};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n != size) {
        Py_DECREF(out);
        if (n >= 0)
            errno = EFAULT;
        return os_error("process-vm-readv");
    }
    return out;
}

/* A notification as Python sees it: (id, pid, nr, arch, (a0..a5)); the pid
 * is in the listener's (the supervisor's) pid namespace. */
static PyObject *notif_tuple(const struct seccomp_notif *n)
{
    const __u64 *a = n->data.args;
    return Py_BuildValue("(KIiI(KKKKKK))", (unsigned long long)n->id, n->pid, n->data.nr, n->data.arch,
                         (unsigned long long)a[0], (unsigned long long)a[1], (unsigned long long)a[2],
                         (unsigned long long)a[3], (unsigned long long)a[4], (unsigned long long)a[5]);
}

/* write_mem(pid, addr, data): into the caller's memory (a served call's
 * results); EFAULT for a bad pointer.  Check the notification is still
 * valid first: the pid may have been reused. */
static PyObject *py_write_mem(PyObject *self, PyObject *args)
{
    (void)self;
    int pid;
    unsigned long long addr;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "iKy*", &pid, &addr, &data))
        return NULL;
    struct iovec local = {data.buf, (size_t)data.len};
    struct iovec remote = {(void *)(uintptr_t)addr, (size_t)data.len};
    ssize_t n = process_vm_writev(pid, &local, 1, &remote, 1, 0);
    Py_ssize_t want = data.len;
    PyBuffer_Release(&data);
    if (n != want) {
        if (n >= 0)
            errno = EFAULT;
        return os_error("process-vm-writev");
    }
    Py_RETURN_NONE;
}

/* recv(fd) -> (id, pid, nr, arch, (a0..a5)): one notification, blocking
 * (a supervisor of its own; drvmmd's go through fastpath_*). */
static PyObject *py_recv(PyObject *self, PyObject *arg)
{
    (void)self;
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct seccomp_notif req;
    memset(&req, 0, sizeof req);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error("seccomp-notif-recv");
    return notif_tuple(&req);
}

/* addfd(fd, id, srcfd, send) -> the fd number in the caller.  send: that
 * number is also the call's result (answered atomically, Linux 5.14+). */
static PyObject *py_addfd(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, srcfd, send;
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "iKip", &fd, &id, &srcfd, &send))
        return NULL;
    struct seccomp_notif_addfd add;
    memset(&add, 0, sizeof add);
    add.id = id;
    add.srcfd = (__u32)srcfd;
    add.newfd_flags = O_CLOEXEC;
    add.flags = send ? SECCOMP_ADDFD_FLAG_SEND : 0;
    int rc = ioctl(fd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    if (rc < 0)
        return os_error("seccomp-notif-addfd");
    return PyLong_FromLong(rc);
}

/* listen(nrs) -> listener: install a filter sending these calls (all of
 * them) to a supervisor, in the calling thread; sets no_new_privs. */
static PyObject *py_listen(PyObject *self, PyObject *arg)
{
    (void)self;
    int nrs[SECCOMP_MAX_NOTIFIED];
    PyObject *seq = PySequence_Fast(arg, "listen: a sequence of system-call numbers");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > SECCOMP_MAX_NOTIFIED) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "listen: too many calls");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        nrs[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return os_error("no-new-privs");
    int fd = seccomp_install_notify(nrs, (int)n, 0, 0); /* an empty range: every pid is notified */
    if (fd < 0)
        return os_error("seccomp-filter");
    return PyLong_FromLong(fd);
}

/* pidfd_signal(pidfd, sig, info: bytes|None, thread: bool) */
static PyObject *py_pidfd_signal(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, sig, thread;
    Py_buffer info = {0};
    if (!PyArg_ParseTuple(args, "iiz*p", &fd, &sig, &info, &thread))
        return NULL;
    siginfo_t si;
    siginfo_t *sip = NULL;
    if (info.buf) {
        memset(&si, 0, sizeof si);
        memcpy(&si, info.buf, (size_t)info.len < sizeof si ? (size_t)info.len : sizeof si);
        sip = &si;
    }
    PyBuffer_Release(&info);
    if (syscall(SYS_pidfd_send_signal, fd, sig, sip, thread ? PIDFD_SIGNAL_THREAD : 0) < 0)
        return os_error("pidfd-send-signal");
    Py_RETURN_NONE;
}

/* open_procfs(pidns_fd) -> fd of a detached procfs of that pid namespace
 * (no mount-table entry: it goes when the fd is closed). */
static PyObject *py_open_procfs(PyObject *self, PyObject *arg)
{
    (void)self;
    int ns = (int)PyLong_AsLong(arg);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    int fs = (int)syscall(SYS_fsopen, "proc", FSOPEN_CLOEXEC);
    if (fs < 0)
        return os_error("fsopen-proc");
    const char *step = NULL;
    if (syscall(SYS_fsconfig, fs, FSCONFIG_SET_FD, "pidns", NULL, ns) < 0)
        step = "fsconfig-pidns";
    else if (syscall(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        step = "fsconfig-create-proc";
    int mnt = -1;
    if (!step) {
        mnt = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC,
                           MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC | MOUNT_ATTR_RDONLY);
        if (mnt < 0)
            step = "fsmount-proc";
    }
    int err = errno;
    close(fs);
    if (step) {
        errno = err;
        return os_error(step);
    }
    /* The mount fd is a path handle: open its root as a directory to read. */
    int dir = openat(mnt, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    err = errno;
    close(mnt);
    if (dir < 0) {
        errno = err;
        return os_error("open-procfs-root");
    }
    return PyLong_FromLong(dir);
}

/* ---- the C fast path (fastpath.c), as a capsule ------------------------ */

struct fp_box {
    struct fastpath *fp;
};

static void fp_destroy(PyObject *cap)
{
    struct fp_box *box = PyCapsule_GetPointer(cap, "drvs.fastpath");
    if (box && box->fp)
        fastpath_stop(box->fp);
    PyMem_Free(box);
}

static struct fastpath *fp_get(PyObject *cap)
{
    struct fp_box *box = PyCapsule_GetPointer(cap, "drvs.fastpath");
    if (!box)
        return NULL;
    if (!box->fp)
        PyErr_SetString(PyExc_ValueError, "fast path stopped");
    return box->fp;
}

/* fastpath_start(listener, span, own_index) -> handle */
static PyObject *py_fastpath_start(PyObject *self, PyObject *args)
{
    (void)self;
    int listener;
    unsigned span, own;
    if (!PyArg_ParseTuple(args, "iII", &listener, &span, &own))
        return NULL;
    struct fp_box *box = PyMem_Calloc(1, sizeof *box);
    if (!box)
        return PyErr_NoMemory();
    box->fp = fastpath_start(listener, span, own);
    if (!box->fp) {
        PyMem_Free(box);
        return os_error("supervisor-thread");
    }
    PyObject *cap = PyCapsule_New(box, "drvs.fastpath", fp_destroy);
    if (!cap) {
        fastpath_stop(box->fp);
        PyMem_Free(box);
    }
    return cap;
}

static PyObject *py_fastpath_fd(PyObject *self, PyObject *cap)
{
    (void)self;
    struct fastpath *fp = fp_get(cap);
    return fp ? PyLong_FromLong(fastpath_wake_fd(fp)) : NULL;
}

/* fastpath_take(handle) -> ([(id, pid, nr, arch, args), ...], done) */
static PyObject *py_fastpath_take(PyObject *self, PyObject *cap)
{
    (void)self;
    struct fastpath *fp = fp_get(cap);
    if (!fp)
        return NULL;
    struct seccomp_notif batch[64];
    int done = 0;
    size_t n = fastpath_take(fp, batch, 64, &done);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *t = notif_tuple(&batch[i]);
        if (!t) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list ? Py_BuildValue("(Ni)", list, done) : NULL;
}

static PyObject *py_fastpath_stop(PyObject *self, PyObject *cap)
{
    (void)self;
    struct fp_box *box = PyCapsule_GetPointer(cap, "drvs.fastpath");
    if (!box)
        return NULL;
    if (box->fp) {
        Py_BEGIN_ALLOW_THREADS
        fastpath_stop(box->fp);
        Py_END_ALLOW_THREADS
        box->fp = NULL;
    }
    Py_RETURN_NONE;
}

/* The numbers of the calls drvs/dvos/syscalls.py names (and a few tests
 * use), from this machine's headers (the table itself stays in Python). */
#define NR(name) {#name, SYS_##name}
static const struct {
    const char *name;
    long nr;
} syscall_numbers[] = {
    NR(kill), NR(tkill), NR(tgkill), NR(rt_sigqueueinfo), NR(rt_tgsigqueueinfo), NR(pidfd_open),
    NR(pidfd_send_signal), NR(getpid), NR(getppid), NR(gettid), NR(getpgid), NR(setpgid),
    NR(getsid), NR(setsid), NR(clone), NR(clone3), NR(wait4), NR(waitid),
#ifdef SYS_fork /* not on aarch64 */
    NR(fork), NR(vfork), NR(getpgrp),
#endif
    NR(execve), NR(exit_group), NR(ptrace), NR(process_vm_readv), NR(process_vm_writev),
    NR(sched_setaffinity), NR(getpriority), NR(setpriority), NR(prlimit64), NR(uname), NR(fcntl), NR(flock),
    NR(fallocate), NR(sync), NR(syncfs),
};
#undef NR

static PyMethodDef methods[] = {
    {"respond", py_respond, METH_VARARGS, "Answer a notification (value, errno, or continue)."},
    {"id_valid", py_id_valid, METH_VARARGS, "Is the notification still pending (caller alive, same call)?"},
    {"probe", py_probe, METH_NOARGS, "Check that seccomp user notification is available."},
    {"read_mem", py_read_mem, METH_VARARGS, "Read another process's memory."},
    {"write_mem", py_write_mem, METH_VARARGS, "Write another process's memory."},
    {"recv", py_recv, METH_O, "Receive one notification (blocking)."},
    {"addfd", py_addfd, METH_VARARGS, "Put a descriptor into the caller (optionally as the call's result)."},
    {"listen", py_listen, METH_O, "Install a notifying filter in this thread; returns the listener."},
    {"pidfd_signal", py_pidfd_signal, METH_VARARGS, "Signal through a pidfd, with an optional siginfo."},
    {"open_procfs", py_open_procfs, METH_O, "A detached procfs of the given pid namespace."},
    {"fastpath_start", py_fastpath_start, METH_VARARGS, "Serve a listener's simple calls in a C thread."},
    {"fastpath_fd", py_fastpath_fd, METH_O, "The fd that is readable when calls wait for Python."},
    {"fastpath_take", py_fastpath_take, METH_O, "The calls waiting for Python, and whether it is over."},
    {"fastpath_stop", py_fastpath_stop, METH_O, "Stop the C thread (the listener stays open)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "drvs._sys", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sys(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    PyObject *nrs = PyDict_New();
    if (!nrs || PyModule_AddObject(m, "NR", nrs) < 0) {
        Py_XDECREF(nrs);
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof syscall_numbers / sizeof *syscall_numbers; i++) {
        PyObject *v = PyLong_FromLong(syscall_numbers[i].nr);
        if (!v || PyDict_SetItemString(nrs, syscall_numbers[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(m);
            return NULL;
        }
        Py_DECREF(v);
    }
    return m;
}
