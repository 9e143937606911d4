/* Kernel steps of a DRVS jail, free of Python so that they can run between
 * fork and exec, where only async-signal-safe code is allowed.  Python turns
 * user options into a declarative list of `struct step`; this file carries it
 * out and names the step that failed. */
#ifndef DRVS_JAIL_H
#define DRVS_JAIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Values shared with drvs/ns/rootfs.py (StepOp); keep both in step. */
enum step_op {
    STEP_TMPFS = 1,      /* dst, data = mount options */
    STEP_BIND = 2,       /* src -> dst, flags BIND_* */
    STEP_MKDIR = 3,      /* dst, mode */
    STEP_SYMLINK = 4,    /* data = target, dst */
    STEP_FILE = 5,       /* dst, data = content, mode */
    STEP_PROC = 6,       /* dst: a proc of the cell's pid namespace */
    STEP_DEVPTS = 7,     /* dst: a new devpts instance */
    STEP_MQUEUE = 8,     /* dst: POSIX message queues of the cell's ipc ns */
    STEP_REMOUNT_RO = 9, /* dst, recursively */
};

enum bind_flags {
    BIND_RO = 1,   /* read-only, recursively */
    BIND_DEV = 2,  /* keep device nodes usable (default: nodev) */
    BIND_TRY = 4,  /* skip silently when the source does not exist */
};

struct step {
    int op;
    unsigned flags;
    unsigned mode;
    const char *src;
    const char *dst;
    const char *data;
    size_t datalen;
};

/* Exit codes of the launcher's own failures, seen by the caller as the
 * exit status of the run.  126/127 follow the shells. */
enum {
    JAIL_EXIT_SETUP = 125,
    JAIL_EXIT_NOEXEC = 126,
    JAIL_EXIT_NOTFOUND = 127,
};

/* Signal the parent's death turns into for the run's keeper (never one a
 * user would forward). */
#define JAIL_PARENT_DIED_SIGNAL (SIGRTMAX)

struct cell_config {
    const char *hostname;
    const int *init_procs_fds;   /* cgroup.procs of cell/init, per hierarchy */
    int n_init_procs;
    int lock_fd;                 /* own open file description of the cell lock */
    int new_net;                 /* 0: keep the host network */
    int idle_check_ms;           /* how often the init looks for an empty cell; 0: never */
    const char *rootdir;         /* an empty directory the init mounts its own root on */
    unsigned pid_base, pid_top;  /* the cell's pid range (the VM's pids of this node); 0, 0: none */
};

struct run_config {
    int cell_pidfd;
    int ns_flags;                /* CLONE_NEW* of the cell to join */
    const int *procs_fds;        /* cgroup.procs of the run, per hierarchy */
    int n_procs;
    const char *rootdir;         /* mount point of the new root (exists, empty) */
    const struct step *steps;
    int nsteps;
    char *const *argv;
    char *const *envp;
    const char *path;            /* PATH used to find argv[0] */
    const char *cwd;
    uint64_t caps_keep;
    int cap_last;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    int ngroups;
    int tty;                     /* allocate a pty inside the jail */
    unsigned short rows, cols;
    int tty_sock;                /* where to send the pty master */
    int err_fd;                  /* CLOEXEC pipe: failure records, EOF on exec */
    const int *stdio_fds;        /* 3 fds to become the program's 0, 1, 2 (or none) */
    int n_stdio;
    int kill_leftovers;          /* when the program ends, end its descendants */
    int notify_sock;             /* >= 0: install the DVOS filter, send its listener here */
    const int *notify_calls;     /* the calls it sends to the supervisor (argument 0: a pid) */
    int n_notify_calls;
    unsigned pid_base, pid_top;  /* the cell's pid range: signals inside it stay in the kernel */
    int pgid;                    /* > 0: join this process group of another node (an anchor holds it) */
};

/* Fork a helper that clones the cell init into new namespaces and exits, so
 * the init is nobody's child here.  Returns the init's host pid, or -1 with
 * a message in err (size errlen). */
pid_t jail_spawn_cell(const struct cell_config *cfg, char *err, size_t errlen);

/* Fork the run's keeper: it joins the run cgroup and the cell's namespaces,
 * forks the program into them, forwards signals and passes on its exit
 * status.  Returns the keeper's pid or -1 with errno set. */
pid_t jail_spawn_run(const struct run_config *cfg);

#endif
