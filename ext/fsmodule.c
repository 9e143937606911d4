/* drvs._fs: the file-system calls the VM file server needs and Python lacks
 * (errors are OSError with the path).  openat2 with RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS resolves a client's path inside the server's store in
 * one step, never through a link a program of the VM planted; renameat2
 * gives rename(2)'s RENAME_NOREPLACE and RENAME_EXCHANGE; name_to_handle_at
 * and open_by_handle_at name a directory by its object rather than its path
 * (as an NFS server's file handles), for a node that lost the path of one
 * another node moved; fallocate takes fallocate(2)'s mode.  All release the
 * GIL (the disk may be slow). */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static PyObject *fs_error(const char *path)
{
    int err = errno;
    /* (names are bytes from the VM's programs: not always UTF-8) */
    PyObject *name = PyUnicode_DecodeFSDefault(path);
    if (!name)
        return NULL;
    PyObject *args = Py_BuildValue("(isN)", err, strerror(err), name);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* openat2(dirfd, path, flags, mode, resolve) -> fd */
static PyObject *py_openat2(PyObject *Py_UNUSED(self), PyObject *args)
{
    int dirfd;
    const char *path;
    Py_ssize_t len;
    unsigned long long flags, mode, resolve;
    if (!PyArg_ParseTuple(args, "iy#KKK", &dirfd, &path, &len, &flags, &mode, &resolve))
        return NULL;
    struct open_how how = {.flags = flags, .mode = mode, .resolve = resolve};
    long fd;
    Py_BEGIN_ALLOW_THREADS
    fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return fs_error(path);
    return PyLong_FromLong(fd);
}

/* renameat2(olddirfd, oldname, newdirfd, newname, flags) */
static PyObject *py_renameat2(PyObject *Py_UNUSED(self), PyObject *args)
{
    int olddir, newdir;
    const char *oldname, *newname;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "iyiyI", &olddir, &oldname, &newdir, &newname, &flags))
        return NULL;
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_renameat2, olddir, oldname, newdir, newname, flags);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return fs_error(oldname);
    Py_RETURN_NONE;
}

/* fallocate(fd, mode, offset, length): the mode is fallocate(2)'s
 * (os.posix_fallocate has none: no hole punched, no range zeroed). */
static PyObject *py_fallocate(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    unsigned int mode; /* (as the system call's bits come: any value, the kernel says EOPNOTSUPP) */
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iILL", &fd, &mode, &offset, &length))
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = fallocate(fd, (int)mode, (off_t)offset, (off_t)length);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* write_back(fd): the file's dirty pages written and waited for
 * (sync_file_range over the whole file), no fsync: on a FUSE file that is
 * WRITE requests only, no FSYNC (which would settle the file's durability). */
static PyObject *py_write_back(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_syncfs(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = syncfs(fd);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* name_to_handle_at(dirfd, name) -> bytes: the handle's type (4 bytes,
 * native order) and then the file system's own bytes of it; name b"": dirfd
 * itself. */
static PyObject *py_name_to_handle_at(PyObject *Py_UNUSED(self), PyObject *args)
{
    int dirfd, mount_id, r;
    const char *name;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "iy#", &dirfd, &name, &len))
        return NULL;
    union {
        struct file_handle fh;
        char space[sizeof(struct file_handle) + MAX_HANDLE_SZ];
    } h;
    h.fh.handle_bytes = MAX_HANDLE_SZ;
    Py_BEGIN_ALLOW_THREADS
    r = name_to_handle_at(dirfd, name, &h.fh, &mount_id, len ? 0 : AT_EMPTY_PATH);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return fs_error(name);
    char out[sizeof(int) + MAX_HANDLE_SZ];
    memcpy(out, &h.fh.handle_type, sizeof(int));
    memcpy(out + sizeof(int), h.fh.f_handle, h.fh.handle_bytes);
    return PyBytes_FromStringAndSize(out, sizeof(int) + h.fh.handle_bytes);
}

/* open_by_handle_at(mountfd, handle, flags) -> fd, handle as
 * name_to_handle_at gave it (ESTALE for bytes that are no handle). */
static PyObject *py_open_by_handle_at(PyObject *Py_UNUSED(self), PyObject *args)
{
    int mountfd, flags, handle_type;
    const char *handle;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "iy#i", &mountfd, &handle, &len, &flags))
        return NULL;
    if (len <= (Py_ssize_t)sizeof(int) || len > (Py_ssize_t)(sizeof(int) + MAX_HANDLE_SZ)) {
        errno = ESTALE;
        return fs_error("(file handle)");
    }
    union {
        struct file_handle fh;
        char space[sizeof(struct file_handle) + MAX_HANDLE_SZ];
    } h;
    memcpy(&handle_type, handle, sizeof(int));
    h.fh.handle_type = handle_type;
    h.fh.handle_bytes = len - sizeof(int);
    memcpy(h.fh.f_handle, handle + sizeof(int), h.fh.handle_bytes);
    long fd;
    Py_BEGIN_ALLOW_THREADS
    fd = open_by_handle_at(mountfd, &h.fh, flags);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return fs_error("(file handle)");
    return PyLong_FromLong(fd);
}

static PyMethodDef methods[] = {
    {"name_to_handle_at", py_name_to_handle_at, METH_VARARGS, "name_to_handle_at(dirfd, name) -> handle bytes"},
    {"open_by_handle_at", py_open_by_handle_at, METH_VARARGS, "open_by_handle_at(mountfd, handle, flags) -> fd"},
    {"openat2", py_openat2, METH_VARARGS, "openat2(dirfd, path, flags, mode, resolve) -> fd"},
    {"renameat2", py_renameat2, METH_VARARGS, "renameat2(olddirfd, old, newdirfd, new, flags)"},
    {"fallocate", py_fallocate, METH_VARARGS, "fallocate(fd, mode, offset, length)"},
    {"write_back", py_write_back, METH_VARARGS, "write_back(fd): dirty pages written, no fsync"},
    {"syncfs", py_syncfs, METH_VARARGS, "syncfs(fd): the file system holding fd, on its disk"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "drvs._fs", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fs(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "RESOLVE_BENEATH", RESOLVE_BENEATH) < 0 ||
        PyModule_AddIntConstant(m, "RESOLVE_NO_SYMLINKS", RESOLVE_NO_SYMLINKS) < 0 ||
        PyModule_AddIntConstant(m, "RESOLVE_NO_MAGICLINKS", RESOLVE_NO_MAGICLINKS) < 0 ||
        PyModule_AddIntConstant(m, "RESOLVE_NO_XDEV", RESOLVE_NO_XDEV) < 0 ||
        PyModule_AddIntConstant(m, "RENAME_NOREPLACE", 1) < 0 ||
        PyModule_AddIntConstant(m, "RENAME_EXCHANGE", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
