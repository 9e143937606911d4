/* drvs._jail: the Python face of ext/jail.c.
 *
 * The spawn functions take a spec object (drvs.ns.launcher.CellSpec /
 * RunSpec) and read its attributes, so the declarative description lives in
 * Python and this file only converts it to C before fork(). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sched.h>
#include <signal.h>

#include "jail.h"

/* Owned buffers for one call; everything is freed in one place. */
struct arena {
    PyObject *keep; /* list of objects whose buffers we point into */
    void *blocks[8];
    int nblocks;
};

static void *arena_alloc(struct arena *a, size_t size)
{
    if (a->nblocks == (int)(sizeof a->blocks / sizeof *a->blocks)) {
        PyErr_SetString(PyExc_RuntimeError, "drvs._jail: arena full");
        return NULL;
    }
    void *p = PyMem_Calloc(1, size ? size : 1);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    a->blocks[a->nblocks++] = p;
    return p;
}

static void arena_free(struct arena *a)
{
    for (int i = 0; i < a->nblocks; i++)
        PyMem_Free(a->blocks[i]);
    Py_CLEAR(a->keep);
}

/* Borrow the bytes of an attribute (str is encoded with the fs encoding). */
static const char *as_cstr(struct arena *a, PyObject *obj, Py_ssize_t *len)
{
    PyObject *b = NULL;
    if (obj == Py_None)
        return NULL;
    if (!PyUnicode_FSConverter(obj, &b))
        return NULL;
    if (PyList_Append(a->keep, b) < 0) {
        Py_DECREF(b);
        return NULL;
    }
    Py_DECREF(b);
    if (len)
        *len = PyBytes_GET_SIZE(b);
    return PyBytes_AS_STRING(b);
}

static int get_long(PyObject *spec, const char *name, long long *out)
{
    PyObject *v = PyObject_GetAttrString(spec, name);
    if (!v)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int get_int(PyObject *spec, const char *name, int *out)
{
    long long v;
    if (get_long(spec, name, &v) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

static int get_uint(PyObject *spec, const char *name, unsigned *out)
{
    long long v;
    if (get_long(spec, name, &v) < 0)
        return -1;
    if (v < 0 || v > 0x7fffffffLL) {
        PyErr_Format(PyExc_ValueError, "%s out of range", name);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

static const char *get_cstr(struct arena *a, PyObject *spec, const char *name)
{
    PyObject *v = PyObject_GetAttrString(spec, name);
    if (!v)
        return NULL;
    const char *s = as_cstr(a, v, NULL);
    Py_DECREF(v);
    return s;
}

static int get_fds(struct arena *a, PyObject *spec, const char *name, int **out, int *n)
{
    PyObject *v = PyObject_GetAttrString(spec, name);
    if (!v)
        return -1;
    PyObject *seq = PySequence_Fast(v, name);
    Py_DECREF(v);
    if (!seq)
        return -1;
    *n = (int)PySequence_Fast_GET_SIZE(seq);
    *out = arena_alloc(a, sizeof(int) * (size_t)(*n));
    int rc = *out ? 0 : -1;
    for (int i = 0; rc == 0 && i < *n; i++) {
        (*out)[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((*out)[i] == -1 && PyErr_Occurred())
            rc = -1;
    }
    Py_DECREF(seq);
    return rc;
}

/* A NULL-terminated char*[] from a sequence of str/bytes. */
static char **get_strv(struct arena *a, PyObject *spec, const char *name)
{
    PyObject *v = PyObject_GetAttrString(spec, name);
    if (!v)
        return NULL;
    PyObject *seq = PySequence_Fast(v, name);
    Py_DECREF(v);
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    char **out = arena_alloc(a, sizeof(char *) * (size_t)(n + 1));
    for (Py_ssize_t i = 0; out && i < n; i++) {
        out[i] = (char *)as_cstr(a, PySequence_Fast_GET_ITEM(seq, i), NULL);
        if (!out[i])
            out = NULL;
    }
    Py_DECREF(seq);
    return out;
}

/* steps: sequence of (op, flags, mode, src, dst, data). */
static struct step *get_steps(struct arena *a, PyObject *spec, int *n)
{
    PyObject *v = PyObject_GetAttrString(spec, "steps");
    if (!v)
        return NULL;
    PyObject *seq = PySequence_Fast(v, "steps");
    Py_DECREF(v);
    if (!seq)
        return NULL;
    *n = (int)PySequence_Fast_GET_SIZE(seq);
    struct step *steps = arena_alloc(a, sizeof(struct step) * (size_t)(*n));
    for (int i = 0; steps && i < *n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *src, *dst, *data;
        struct step *s = &steps[i];
        if (!PyArg_ParseTuple(t, "iIIOOO", &s->op, &s->flags, &s->mode, &src, &dst, &data)) {
            steps = NULL;
            break;
        }
        Py_ssize_t len = 0;
        s->src = as_cstr(a, src, NULL);
        s->dst = as_cstr(a, dst, NULL);
        s->data = as_cstr(a, data, &len);
        s->datalen = (size_t)len;
        if (PyErr_Occurred() || !s->dst)
            steps = NULL;
    }
    Py_DECREF(seq);
    return steps;
}

static PyObject *JailError;

/* Raise JailError(code, step, detail, errno) from a failure record. */
static PyObject *raise_record(const char *record)
{
    int code = JAIL_EXIT_SETUP, err = 0;
    char step[64] = "", detail[4096] = "";
    const char *p = record;
    code = atoi(p);
    if ((p = strchr(p, '\x1f'))) {
        const char *q = strchr(++p, '\x1f');
        if (q) {
            snprintf(step, sizeof step, "%.*s", (int)(q - p), p);
            const char *r = strchr(++q, '\x1f');
            if (r) {
                snprintf(detail, sizeof detail, "%.*s", (int)(r - q), q);
                err = atoi(r + 1);
            }
        }
    }
    PyObject *args = Py_BuildValue("(issi)", code, step, detail, err);
    if (args) {
        PyErr_SetObject(JailError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *py_spawn_cell(PyObject *self, PyObject *spec)
{
    (void)self;
    struct arena a = {.keep = PyList_New(0)};
    struct cell_config cfg;
    memset(&cfg, 0, sizeof cfg);
    PyObject *result = NULL;
    int *init_fds = NULL;
    if (!a.keep)
        return NULL;
    if (!(cfg.hostname = get_cstr(&a, spec, "hostname")) || !(cfg.rootdir = get_cstr(&a, spec, "rootdir")) ||
        get_fds(&a, spec, "init_procs_fds", &init_fds, &cfg.n_init_procs) < 0 ||
        get_int(spec, "lock_fd", &cfg.lock_fd) < 0 || get_int(spec, "new_net", &cfg.new_net) < 0 ||
        get_int(spec, "idle_check_ms", &cfg.idle_check_ms) < 0 ||
        get_uint(spec, "pid_base", &cfg.pid_base) < 0 || get_uint(spec, "pid_top", &cfg.pid_top) < 0)
        goto out;
    cfg.init_procs_fds = init_fds;
    char err[PATH_MAX + 128];
    pid_t pid;
    Py_BEGIN_ALLOW_THREADS
    pid = jail_spawn_cell(&cfg, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (pid < 0)
        raise_record(err);
    else
        result = PyLong_FromLong(pid);
out:
    arena_free(&a);
    return result;
}

static PyObject *py_spawn_run(PyObject *self, PyObject *spec)
{
    (void)self;
    struct arena a = {.keep = PyList_New(0)};
    struct run_config cfg;
    memset(&cfg, 0, sizeof cfg);
    PyObject *result = NULL;
    int *procs = NULL, *groups = NULL, *stdio = NULL, *notify_calls = NULL;
    int ngroups = 0;
    long long caps, uid, gid, rows, cols;
    if (!a.keep)
        return NULL;
    if (get_int(spec, "cell_pidfd", &cfg.cell_pidfd) < 0 ||
        get_int(spec, "ns_flags", &cfg.ns_flags) < 0 ||
        get_fds(&a, spec, "procs_fds", &procs, &cfg.n_procs) < 0 ||
        !(cfg.rootdir = get_cstr(&a, spec, "rootdir")) ||
        !(cfg.steps = get_steps(&a, spec, &cfg.nsteps)) ||
        !(cfg.argv = get_strv(&a, spec, "argv")) || !(cfg.envp = get_strv(&a, spec, "envp")) ||
        !(cfg.path = get_cstr(&a, spec, "path")) || !(cfg.cwd = get_cstr(&a, spec, "cwd")) ||
        get_long(spec, "caps_keep", &caps) < 0 || get_int(spec, "cap_last", &cfg.cap_last) < 0 ||
        get_long(spec, "uid", &uid) < 0 || get_long(spec, "gid", &gid) < 0 ||
        get_fds(&a, spec, "groups", &groups, &ngroups) < 0 || get_int(spec, "tty", &cfg.tty) < 0 ||
        get_long(spec, "rows", &rows) < 0 || get_long(spec, "cols", &cols) < 0 ||
        get_int(spec, "tty_sock", &cfg.tty_sock) < 0 || get_int(spec, "err_fd", &cfg.err_fd) < 0 ||
        get_int(spec, "kill_leftovers", &cfg.kill_leftovers) < 0 ||
        get_fds(&a, spec, "stdio", &stdio, &cfg.n_stdio) < 0 ||
        get_int(spec, "notify_sock", &cfg.notify_sock) < 0 ||
        get_fds(&a, spec, "notify_calls", &notify_calls, &cfg.n_notify_calls) < 0 ||
        get_uint(spec, "pid_base", &cfg.pid_base) < 0 || get_uint(spec, "pid_top", &cfg.pid_top) < 0 ||
        get_int(spec, "pgid", &cfg.pgid) < 0)
        goto out;
    cfg.stdio_fds = stdio;
    cfg.notify_calls = notify_calls;
    if (!cfg.argv[0]) {
        PyErr_SetString(PyExc_ValueError, "argv is empty");
        goto out;
    }
    cfg.procs_fds = procs;
    cfg.caps_keep = (uint64_t)caps;
    cfg.uid = (uid_t)uid;
    cfg.gid = (gid_t)gid;
    cfg.groups = (const gid_t *)groups; /* gid_t and int share a size on Linux */
    cfg.ngroups = ngroups;
    cfg.rows = (unsigned short)rows;
    cfg.cols = (unsigned short)cols;
    pid_t pid;
    Py_BEGIN_ALLOW_THREADS
    pid = jail_spawn_run(&cfg);
    Py_END_ALLOW_THREADS
    if (pid < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    else
        result = PyLong_FromLong(pid);
out:
    arena_free(&a);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn_cell", py_spawn_cell, METH_O,
     "spawn_cell(spec) -> pid of the cell init (pid 1 of new namespaces)."},
    {"spawn_run", py_spawn_run, METH_O,
     "spawn_run(spec) -> pid of the keeper that runs spec.argv in the cell."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "drvs._jail",
    "Kernel steps of DRVS jails (namespaces, mounts, pty, privileges).", -1, methods,
};

PyMODINIT_FUNC PyInit__jail(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    JailError = PyErr_NewExceptionWithDoc(
        "drvs._jail.JailError", "A jail step failed: args are (exit_code, step, detail, errno).",
        NULL, NULL);
    if (!JailError || PyModule_AddObject(m, "JailError", JailError) < 0)
        return NULL;
    Py_INCREF(JailError);
    struct {
        const char *name;
        long value;
    } consts[] = {
        {"STEP_TMPFS", STEP_TMPFS},       {"STEP_BIND", STEP_BIND},
        {"STEP_MKDIR", STEP_MKDIR},       {"STEP_SYMLINK", STEP_SYMLINK},
        {"STEP_FILE", STEP_FILE},         {"STEP_PROC", STEP_PROC},
        {"STEP_DEVPTS", STEP_DEVPTS},     {"STEP_MQUEUE", STEP_MQUEUE},
        {"STEP_REMOUNT_RO", STEP_REMOUNT_RO},
        {"BIND_RO", BIND_RO},             {"BIND_DEV", BIND_DEV},
        {"BIND_TRY", BIND_TRY},
        {"EXIT_SETUP", JAIL_EXIT_SETUP},  {"EXIT_NOEXEC", JAIL_EXIT_NOEXEC},
        {"EXIT_NOTFOUND", JAIL_EXIT_NOTFOUND},
        {"CLONE_NEWNS", CLONE_NEWNS},     {"CLONE_NEWPID", CLONE_NEWPID},
        {"CLONE_NEWUTS", CLONE_NEWUTS},   {"CLONE_NEWIPC", CLONE_NEWIPC},
        {"CLONE_NEWNET", CLONE_NEWNET},   {"CLONE_NEWCGROUP", CLONE_NEWCGROUP},
    };
    for (size_t i = 0; i < sizeof consts / sizeof *consts; i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            return NULL;
    return m;
}
