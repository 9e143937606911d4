/* The kernel steps of a DRVS cell and of a run inside it.
 *
 * Process shape (host pids on the left):
 *
 *   drvs-run (Python) ── keeper ───────── program (pid N in the cell)
 *                         setns() the      joins the run cgroup and the
 *                         cell's pid ns,   cell's other namespaces, own
 *                         forwards         mount ns, builds the root,
 *                         signals, ends    pivot_root, pty, drops caps,
 *                         leftovers        no_new_privs, exec
 *
 *   cell init (pid 1 of the cell, nobody's child here): holds the cell's
 *   pid/ipc/uts/net namespaces, reaps orphans, leaves once the cell is
 *   empty.  Each program has a cgroup namespace rooted at its run's cgroup.
 *
 * Everything after fork() uses raw system calls and stack buffers only. */
#define _GNU_SOURCE
#include "jail.h"
#include "seccomp.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <linux/sched.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* ---- failure records ------------------------------------------------- */

/* "code US step US detail US errno": parsed by drvs/ns/launcher.py. */
static void report(int fd, int code, const char *step, const char *detail, int err)
{
    char buf[PATH_MAX + 128];
    /* The detail is capped so that the errno after it always fits. */
    int n = snprintf(buf, sizeof buf, "%d\x1f%s\x1f%.*s\x1f%d", code, step, PATH_MAX,
                     detail ? detail : "", err);
    if (fd >= 0 && n > 0)
        (void)!write(fd, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

static _Noreturn void die(int fd, int code, const char *step, const char *detail)
{
    report(fd, code, step, detail, errno);
    _exit(code);
}

/* ---- small path helpers (no allocation) ------------------------------ */

static int join_path(char *out, const char *root, const char *rel)
{
    while (*rel == '/')
        rel++;
    int n = snprintf(out, PATH_MAX, "%s/%s", root, rel);
    if (n < 0 || n >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

static int mkdir_p(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    size_t len = strlen(path);
    if (len >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, len + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static int mkdir_parent(const char *path)
{
    char buf[PATH_MAX];
    size_t len = strlen(path);
    if (len >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, len + 1);
    char *slash = strrchr(buf, '/');
    if (!slash || slash == buf)
        return 0;
    *slash = '\0';
    return mkdir_p(buf, 0755);
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ---- cgroups ---------------------------------------------------------- */

static int join_cgroups(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (pwrite(fds[i], "0", 1, 0) < 0)
            return -1;
    return 0;
}

/* End every process left in the run's cgroup; loop because a process may
 * fork while we read. */
static void kill_cgroup_members(int procs_fd)
{
    char buf[16384];
    pid_t self = getpid();
    for (int round = 0; round < 1000; round++) {
        ssize_t n = pread(procs_fd, buf, sizeof buf - 1, 0);
        if (n <= 0)
            return;
        buf[n] = '\0';
        int others = 0;
        for (char *p = buf; *p;) {
            char *end;
            long pid = strtol(p, &end, 10);
            if (end == p)
                break;
            if (pid > 0 && pid != self) {
                kill((pid_t)pid, SIGKILL);
                others++;
            }
            p = end;
            while (*p == '\n')
                p++;
        }
        if (!others)
            return;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

/* ---- signals ---------------------------------------------------------- */

static void reset_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &sa, NULL); /* fails harmlessly for KILL/STOP and gaps */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void noop_handler(int sig) { (void)sig; }

/* ---- the root file system --------------------------------------------- */

static int set_mount_attr(const char *path, int recursive, uint64_t set)
{
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = set;
    if (syscall(SYS_mount_setattr, AT_FDCWD, path, recursive ? AT_RECURSIVE : 0,
                &attr, sizeof attr) == 0)
        return 0;
    if (errno != ENOSYS)
        return -1;
    /* Kernels before 5.12: one mount at a time. */
    unsigned long flags = MS_REMOUNT | MS_BIND;
    if (set & MOUNT_ATTR_RDONLY)
        flags |= MS_RDONLY;
    if (set & MOUNT_ATTR_NOSUID)
        flags |= MS_NOSUID;
    if (set & MOUNT_ATTR_NODEV)
        flags |= MS_NODEV;
    return mount(NULL, path, NULL, flags, NULL);
}

/* Open the target of a bind inside the new root, creating what is missing,
 * without ever following a symlink: the VM's writable data may hold links
 * planted by an earlier run, and a bind must not follow one out of the
 * root.  Returns an O_PATH fd, or -1 with errno. */
static int open_beneath(const char *rootdir, const char *rel, int want_dir)
{
    char buf[PATH_MAX];
    while (*rel == '/')
        rel++;
    if (strlen(rel) >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(buf, rel);
    int cur = open(rootdir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cur < 0)
        return -1;
    char *save = NULL;
    for (char *c = strtok_r(buf, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        int last = save == NULL || *save == '\0';
        if (strcmp(c, ".") == 0)
            continue;
        if (strcmp(c, "..") == 0) {
            close(cur);
            errno = EINVAL;
            return -1;
        }
        struct open_how how = {
            .flags = O_PATH | O_CLOEXEC | O_NOFOLLOW | (last && !want_dir ? 0 : O_DIRECTORY),
            .resolve = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        int next = (int)syscall(SYS_openat2, cur, c, &how, sizeof how);
        if (next < 0 && errno == ENOENT) {
            if (!last || want_dir) {
                if (mkdirat(cur, c, 0755) < 0 && errno != EEXIST)
                    goto fail;
            } else {
                int f = openat(cur, c, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
                if (f < 0 && errno != EEXIST)
                    goto fail;
                if (f >= 0)
                    close(f);
            }
            next = (int)syscall(SYS_openat2, cur, c, &how, sizeof how);
        }
        if (next < 0) {
            struct stat st;
            if ((errno == ENOTDIR || errno == ELOOP || errno == EXDEV) &&
                fstatat(cur, c, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode))
                errno = ELOOP; /* said as "a symbolic link is in the way" */
            goto fail;
        }
        close(cur);
        cur = next;
    }
    return cur;
fail:;
    int err = errno;
    close(cur);
    errno = err;
    return -1;
}

/* Bind src onto the fd's place with the new mount API: the tree is made
 * read-only/nosuid/nodev while still detached, then attached by fd, so no
 * path is looked up twice. */
static int bind_by_fd(const char *src, int target, uint64_t attrs)
{
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, src, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (tree < 0)
        return -1;
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = attrs;
    int rc = (int)syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr);
    if (rc == 0)
        rc = (int)syscall(SYS_move_mount, tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH);
    int err = errno;
    close(tree);
    errno = err;
    return rc;
}

static void step_bind(const struct run_config *cfg, const struct step *s, const char *dst)
{
    struct stat st;
    if (stat(s->src, &st) < 0) {
        if (errno == ENOENT && (s->flags & BIND_TRY))
            return;
        die(cfg->err_fd, JAIL_EXIT_SETUP, "bind-source", s->src);
    }
    uint64_t attrs = MOUNT_ATTR_NOSUID;
    if (!(s->flags & BIND_DEV))
        attrs |= MOUNT_ATTR_NODEV;
    if (s->flags & BIND_RO)
        attrs |= MOUNT_ATTR_RDONLY;
    int target = open_beneath(cfg->rootdir, s->dst, S_ISDIR(st.st_mode));
    if (target < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "bind-target", s->dst);
    int rc = bind_by_fd(s->src, target, attrs);
    int err = errno;
    close(target);
    if (rc == 0)
        return;
    errno = err;
    if (errno != ENOSYS)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "bind", s->src);
    /* Kernels before 5.12: by path. */
    if (S_ISDIR(st.st_mode)) {
        if (mkdir_p(dst, 0755) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "bind-target", s->dst);
    } else {
        if (mkdir_parent(dst) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "bind-target", s->dst);
        int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
        if (fd < 0 && errno != EEXIST && errno != EISDIR)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "bind-target", s->dst);
        if (fd >= 0)
            close(fd);
    }
    if (mount(s->src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "bind", s->src);
    if (set_mount_attr(dst, 1, attrs) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "bind-attributes", s->dst);
}

static void step_fs(const struct run_config *cfg, const struct step *s, const char *dst,
                    const char *type, unsigned long flags, const char *name)
{
    if (mkdir_p(dst, 0755) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, name, s->dst);
    if (mount(type, dst, type, flags, s->data) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, name, s->dst);
}

static void step_file(const struct run_config *cfg, const struct step *s, const char *dst)
{
    if (mkdir_parent(dst) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "file", s->dst);
    int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, s->mode);
    if (fd < 0 || write_all(fd, s->data, s->datalen) < 0 || fchmod(fd, s->mode) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "file", s->dst);
    close(fd);
}

static void run_step(const struct run_config *cfg, const struct step *s)
{
    char dst[PATH_MAX];
    if (join_path(dst, cfg->rootdir, s->dst) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "path", s->dst);
    const unsigned long safe = MS_NOSUID | MS_NODEV;
    switch (s->op) {
    case STEP_TMPFS:
        step_fs(cfg, s, dst, "tmpfs", safe, "tmpfs");
        break;
    case STEP_BIND:
        step_bind(cfg, s, dst);
        break;
    case STEP_MKDIR:
        if (mkdir_p(dst, s->mode) < 0 || chmod(dst, s->mode) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "mkdir", s->dst);
        break;
    case STEP_SYMLINK:
        if (mkdir_parent(dst) < 0 || (symlink(s->data, dst) < 0 && errno != EEXIST))
            die(cfg->err_fd, JAIL_EXIT_SETUP, "symlink", s->dst);
        break;
    case STEP_FILE:
        step_file(cfg, s, dst);
        break;
    case STEP_PROC:
        step_fs(cfg, s, dst, "proc", safe | MS_NOEXEC, "proc");
        break;
    case STEP_DEVPTS:
        step_fs(cfg, s, dst, "devpts", MS_NOSUID | MS_NOEXEC, "devpts");
        break;
    case STEP_MQUEUE:
        step_fs(cfg, s, dst, "mqueue", safe | MS_NOEXEC, "mqueue");
        break;
    case STEP_REMOUNT_RO:
        if (set_mount_attr(dst, s->flags & 1, MOUNT_ATTR_RDONLY) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "remount-ro", s->dst);
        break;
    default:
        errno = EINVAL;
        die(cfg->err_fd, JAIL_EXIT_SETUP, "unknown-step", s->dst);
    }
}

static void make_mounts_private(const struct run_config *cfg)
{
    if (unshare(CLONE_NEWNS) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "unshare-mount-namespace", NULL);
    /* Nothing we mount may propagate back to the host. */
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "make-rslave", "/");
}

static void mount_root(const struct run_config *cfg)
{
    if (mount("tmpfs", cfg->rootdir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m") < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "root-tmpfs", cfg->rootdir);
    for (int i = 0; i < cfg->nsteps; i++)
        run_step(cfg, &cfg->steps[i]);
}

static void switch_root(const struct run_config *cfg)
{
    /* pivot_root(".", ".") stacks the old root over the new one; detaching
     * it leaves only the jail's tree. */
    if (chdir(cfg->rootdir) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pivot-root", cfg->rootdir);
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pivot-root", cfg->rootdir);
    if (umount2(".", MNT_DETACH) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "detach-old-root", "/");
    if (chdir("/") < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pivot-root", "/");
}

/* ---- terminal --------------------------------------------------------- */

static int send_fd(int sock, int fd)
{
    char byte = 'T';
    struct iovec iov = {&byte, 1};
    union {
        struct cmsghdr hdr;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof ctl.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* The pty comes from the jail's own devpts, so `tty` and ttyname() work
 * inside; the master goes back to the caller, which relays it. */
static void setup_pty(const struct run_config *cfg)
{
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-open", "/dev/pts/ptmx");
    int unlock = 0;
    if (ioctl(master, TIOCSPTLCK, &unlock) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-unlock", NULL);
    int slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (slave < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-peer", NULL);
    if (cfg->rows && cfg->cols) {
        struct winsize ws = {.ws_row = cfg->rows, .ws_col = cfg->cols};
        ioctl(slave, TIOCSWINSZ, &ws);
    }
    if (cfg->uid != 0 && fchown(slave, cfg->uid, (gid_t)-1) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-owner", NULL);
    if (send_fd(cfg->tty_sock, master) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-send", NULL);
    close(master);
    close(cfg->tty_sock);
    if (setsid() < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-controlling-terminal", NULL);
    for (int fd = 0; fd < 3; fd++)
        if (dup2(slave, fd) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "pty-stdio", NULL);
    if (slave > 2)
        close(slave);
}

/* ---- identity and privileges ----------------------------------------- */

static void drop_privileges(const struct run_config *cfg)
{
    for (int cap = 0; cap <= cfg->cap_last; cap++)
        if (!(cfg->caps_keep & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "drop-bounding-set", NULL);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "clear-ambient-caps", NULL);
    if (syscall(SYS_setgroups, cfg->ngroups, cfg->groups) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "setgroups", NULL);
    if (setresgid(cfg->gid, cfg->gid, cfg->gid) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "setgid", NULL);
    if (setresuid(cfg->uid, cfg->uid, cfg->uid) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "setuid", NULL);
    if (cfg->uid == 0) {
        struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct data[2];
        memset(data, 0, sizeof data);
        for (int i = 0; i < 2; i++) {
            uint32_t word = (uint32_t)(cfg->caps_keep >> (32 * i));
            data[i].effective = data[i].permitted = data[i].inheritable = word;
        }
        if (syscall(SYS_capset, &hdr, data) < 0)
            die(cfg->err_fd, JAIL_EXIT_SETUP, "capset", NULL);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "no-new-privs", NULL);
    /* Changing uid cleared the parent-death signal: set it again. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "parent-death-signal", NULL);
}

/* ---- system-call filter --------------------------------------------- */

/* After no_new_privs (an unprivileged filter needs it) and as late as
 * possible: the supervisor answers from the next call on.  The listener
 * goes to the caller, which hands it to the node's supervisor. */
static void install_filter(const struct run_config *cfg)
{
    int listener = seccomp_install_notify(cfg->notify_calls, cfg->n_notify_calls, cfg->pid_base, cfg->pid_top);
    if (listener < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "seccomp-filter", NULL);
    if (send_fd(cfg->notify_sock, listener) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "seccomp-listener-send", NULL);
    close(listener);
    close(cfg->notify_sock);
}

/* ---- exec ------------------------------------------------------------- */

static _Noreturn void exec_program(const struct run_config *cfg)
{
    const char *name = cfg->argv[0];
    if (!*name) {
        errno = ENOENT;
        die(cfg->err_fd, JAIL_EXIT_NOTFOUND, "exec", name);
    }
    if (strchr(name, '/')) {
        execve(name, cfg->argv, cfg->envp);
        int code = (errno == ENOENT || errno == ENOTDIR) ? JAIL_EXIT_NOTFOUND : JAIL_EXIT_NOEXEC;
        die(cfg->err_fd, code, "exec", name);
    }
    /* Search the jail's PATH, not ours, the way execvp would. */
    int saw_eacces = 0;
    const char *p = cfg->path;
    char buf[PATH_MAX];
    while (p && *p) {
        const char *colon = strchr(p, ':');
        size_t dirlen = colon ? (size_t)(colon - p) : strlen(p);
        int n = snprintf(buf, sizeof buf, "%.*s/%s", (int)dirlen, dirlen ? p : ".", name);
        if (n > 0 && n < (int)sizeof buf) {
            execve(buf, cfg->argv, cfg->envp);
            if (errno == EACCES)
                saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ENODEV &&
                     errno != ETIMEDOUT)
                die(cfg->err_fd, JAIL_EXIT_NOEXEC, "exec", name);
        }
        p = colon ? colon + 1 : NULL;
    }
    errno = saw_eacces ? EACCES : ENOENT;
    die(cfg->err_fd, saw_eacces ? JAIL_EXIT_NOEXEC : JAIL_EXIT_NOTFOUND, "exec", name);
}

static _Noreturn void program_main(const struct run_config *cfg)
{
    reset_signals();
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (join_cgroups(cfg->procs_fds, cfg->n_procs) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "cgroup-join", NULL);
    int rest = cfg->ns_flags & ~CLONE_NEWPID;
    if (rest && setns(cfg->cell_pidfd, rest) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "setns-cell", NULL);
    /* The run's own cgroup becomes "/" inside it. */
    if (unshare(CLONE_NEWCGROUP) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "unshare-cgroup-namespace", NULL);
    make_mounts_private(cfg);
    mount_root(cfg);
    switch_root(cfg);
    if (chdir(cfg->cwd) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "workdir", cfg->cwd);
    if (cfg->n_stdio == 3)
        for (int fd = 0; fd < 3; fd++)
            if (dup2(cfg->stdio_fds[fd], fd) < 0)
                die(cfg->err_fd, JAIL_EXIT_SETUP, "stdio", NULL);
    if (cfg->tty)
        setup_pty(cfg);
    else if (cfg->pgid <= 0 && setsid() < 0) /* in a group: stay in the anchor's session and group */
        die(cfg->err_fd, JAIL_EXIT_SETUP, "setsid", NULL);
    drop_privileges(cfg);
    if (cfg->notify_sock >= 0)
        install_filter(cfg);
    /* Only stdio crosses into the program; the failure pipe is CLOEXEC. */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "close-fds", NULL);
    exec_program(cfg);
}

/* ---- an empty root (the cell init, a group anchor) --------------------- */

/* A process of the cell that needs nothing of the host's files gets an
 * empty read-only root in a mount namespace of its own, and is made not
 * dumpable: a jailed program that may ptrace cannot reach the host through
 * its /proc/PID/root, and no host mount stays pinned.  NULL, or the step
 * that failed. */
static const char *enter_empty_root(const char *rootdir)
{
    if (unshare(CLONE_NEWNS) < 0)
        return "init-unshare-mount-namespace";
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
        return "init-make-rslave";
    if (mount("tmpfs", rootdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555") < 0)
        return "init-root";
    if (chdir(rootdir) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 ||
        chdir("/") < 0)
        return "init-pivot-root";
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return "init-not-dumpable";
    return NULL;
}

/* ---- a process group of another node ----------------------------------- */

/* A run may join a process group whose leader is on another node: the
 * group's id is that leader's VM pid, from the other node's range, so it
 * is free here.  The keeper forks an *anchor* with exactly that pid
 * (clone3 set_tid): it starts a session and group with it, forks the
 * program into them, and waits.  kill(-pgid) from any node then reaches
 * the program too.  The anchor ignores the group's signals (its program
 * gets its own copy); signals the keeper forwards carry a mark. */
#define ANCHOR_FORWARD 0x64727673 /* "drvs" */

static pid_t fork_with_pid(pid_t pid)
{
    pid_t tid[1] = {pid};
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    args.set_tid = (uintptr_t)tid;
    args.set_tid_size = 1;
    return (pid_t)syscall(SYS_clone3, &args, sizeof args);
}

static _Noreturn void program_main(const struct run_config *cfg);
static int wait_status_code(int status);

static _Noreturn void anchor_main(const struct run_config *cfg)
{
    reset_signals();
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (setsid() < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "group-anchor-session", NULL);
    /* Block everything before the fork: a program that ends at once must
     * not have its SIGCHLD discarded (the program unblocks its own). */
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    pid_t prog = fork();
    if (prog < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "fork-program", NULL);
    if (prog == 0)
        program_main(cfg);
    prctl(PR_SET_NAME, "drvs-group", 0, 0, 0);
    /* Nothing of the caller's stays open here: the failure pipe must see
     * EOF when the program execs. */
    syscall(SYS_close_range, 3, ~0U, 0);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int fd = 0; fd < 3 && null >= 0; fd++)
        dup2(null, fd);
    if (enter_empty_root(cfg->rootdir)) {
        kill(prog, SIGKILL);
        _exit(JAIL_EXIT_SETUP);
    }
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&all, &si);
        if (sig == SIGCHLD) {
            int status;
            if (waitpid(prog, &status, WNOHANG) == prog)
                _exit(wait_status_code(status));
        } else if (sig > 0 && si.si_code == SI_QUEUE && si.si_value.sival_int == ANCHOR_FORWARD) {
            kill(prog, sig);
        }
    }
}

/* ---- the keeper -------------------------------------------------------- */

static int wait_status_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return JAIL_EXIT_SETUP;
}

static void close_fds_except(int keep)
{
    if (keep < 3) {
        syscall(SYS_close_range, 3, ~0U, 0);
        return;
    }
    if (keep > 3)
        syscall(SYS_close_range, 3, keep - 1, 0);
    syscall(SYS_close_range, keep + 1, ~0U, 0);
}

static _Noreturn void keeper_main(const struct run_config *cfg, pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, JAIL_PARENT_DIED_SIGNAL, 0, 0, 0) < 0 || getppid() != parent)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "parent-death-signal", NULL);
    /* Out of the caller's foreground process group: terminal signals reach
     * the program once, through the caller. */
    setpgid(0, 0);
    /* SIGCHLD may come in ignored (children then reap themselves and the
     * wait below never ends): restore it before blocking everything. */
    signal(SIGCHLD, SIG_DFL);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    /* Only the pid namespace here: our children are born into it.  The
     * program joins the rest itself, after its cgroup, so the keeper stays
     * out of the run's cgroup and its limits (a pids limit counts the
     * program's processes only). */
    if (setns(cfg->cell_pidfd, CLONE_NEWPID) < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, "setns-cell-pid", NULL);
    pid_t child = cfg->pgid > 0 ? fork_with_pid(cfg->pgid) : fork();
    if (child < 0)
        die(cfg->err_fd, JAIL_EXIT_SETUP, cfg->pgid > 0 ? "group-anchor" : "fork-program", NULL);
    if (child == 0) {
        if (cfg->pgid > 0)
            anchor_main(cfg);
        program_main(cfg);
    }
    /* Keep nothing of the caller's: an inherited descriptor would hold its
     * locks (the cell's flock) and pipes open for as long as the run lasts. */
    close_fds_except(cfg->n_procs > 0 ? cfg->procs_fds[0] : -1);

    int status = 0, parent_gone = 0;
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&all, &si);
        if (sig < 0)
            continue;
        if (sig == SIGCHLD) {
            if (waitpid(child, &status, WNOHANG) == child)
                break;
        } else if (sig == JAIL_PARENT_DIED_SIGNAL) {
            parent_gone = 1;
            kill(child, SIGKILL);
        } else {
            if (cfg->pgid > 0)
                sigqueue(child, sig, (union sigval){.sival_int = ANCHOR_FORWARD});
            else
                kill(child, sig);
        }
    }
    if ((cfg->kill_leftovers || parent_gone) && cfg->n_procs > 0)
        kill_cgroup_members(cfg->procs_fds[0]);
    _exit(wait_status_code(status));
}

pid_t jail_spawn_run(const struct run_config *cfg)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0)
        keeper_main(cfg, parent);
    return pid;
}

/* ---- the cell init ----------------------------------------------------- */

static int loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    close(s);
    return rc;
}

/* Close every fd but the given ones (-1: none); stdio goes to /dev/null. */
static void keep_only_fds3(int a, int b, int c)
{
    int keep[3] = {a, b, c};
    for (int i = 0; i < 3; i++) /* sort: at most three */
        for (int j = i + 1; j < 3; j++)
            if (keep[j] < keep[i]) {
                int t = keep[i];
                keep[i] = keep[j];
                keep[j] = t;
            }
    int from = 3;
    for (int i = 0; i < 3; i++) {
        if (keep[i] < from)
            continue;
        if (keep[i] > from)
            syscall(SYS_close_range, from, keep[i] - 1, 0);
        from = keep[i] + 1;
    }
    syscall(SYS_close_range, from, ~0U, 0);
    int null = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3; fd++) {
        if (fd == a || fd == b || fd == c)
            continue;
        if (null >= 0)
            dup2(null, fd);
        else
            close(fd);
    }
    if (null > 2 && null != a && null != b && null != c)
        close(null);
}

/* ---- the cell's pid range ---------------------------------------------- */

/* A VM's pids are unique across its nodes because each node's cell
 * allocates from its own range: ns_last_pid starts it there (the sysctl
 * acts on the writer's pid namespace, so the init writes it, and keeps it
 * open to bring allocation back to the start in time).  pid_max is left at
 * the namespace's own, the largest (Linux 6.14+): a cell may hold pids of
 * other ranges too, the anchors of other nodes' process groups. */
static int set_pid_range(const struct cell_config *cfg, int ready_fd)
{
    if (!cfg->pid_top)
        return -1;
    char buf[32];
    int fd = open("/proc/sys/kernel/ns_last_pid", O_RDWR | O_CLOEXEC);
    int n = snprintf(buf, sizeof buf, "%u", cfg->pid_base);
    if (fd < 0 || write(fd, buf, (size_t)n) != n)
        die(ready_fd, JAIL_EXIT_SETUP, "pid-range-start", "/proc/sys/kernel/ns_last_pid");
    return fd;
}

/* Past three quarters of the range, start again from its base: the kernel
 * skips pids still in use, and a quarter of the range (16384 pids, far more
 * than a node forks in RANGE_CHECK_MS) stays between allocation and the
 * next node's range. */
static void keep_pid_range(const struct cell_config *cfg, int fd)
{
    char buf[32];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return;
    buf[n] = '\0';
    unsigned long last = strtoul(buf, NULL, 10);
    /* Below the base: a burst of forks outran us and the kernel wrapped to
     * the low pids; the next ones are in range again. */
    if (last < cfg->pid_base || last >= cfg->pid_base + (cfg->pid_top - cfg->pid_base) / 4 * 3) {
        int len = snprintf(buf, sizeof buf, "%u", cfg->pid_base);
        (void)!pwrite(fd, buf, (size_t)len, 0);
    }
}

/* Show "drvs-cell VM" in ps instead of the forked caller's command line:
 * overwrite our (copy-on-write) argv area, found in /proc/self/stat fields
 * 48-49, as setproctitle does; PR_SET_MM would need CAP_SYS_RESOURCE. */
static void name_process(const char *vm)
{
    prctl(PR_SET_NAME, "drvs-cell", 0, 0, 0);
    char stat[4096];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0)
        return;
    stat[n] = '\0';
    char *p = strrchr(stat, ')');
    if (!p || !p[1] || !p[2] || !p[3])
        return;
    p += 4; /* past ") S ": field 4 on are numbers */
    unsigned long field[53] = {0};
    for (int i = 4; i < 53 && *p; i++) {
        field[i] = strtoul(p, &p, 10);
        while (*p == ' ')
            p++;
    }
    /* The environment (fields 50-51) is the caller's: no business of the cell. */
    unsigned long env_start = field[50], env_end = field[51];
    if (env_start && env_end > env_start && env_end - env_start <= 1 << 20)
        memset((char *)env_start, 0, env_end - env_start);
    unsigned long start = field[48], end = field[49];
    if (!start || end <= start || end - start > 65536)
        return;
    char *area = (char *)start;
    size_t len = end - start;
    memset(area, 0, len);
    snprintf(area, len, "drvs-cell %s", vm);
    /* A non-NUL last byte tells the kernel the area holds a title: it then
     * shows it up to its first NUL, without the padding. */
    if (len > strlen(area) + 1)
        area[len - 1] = ' ';
}

/* The init needs nothing of the host's files: give it an empty root of its
 * own (then no host mount stays pinned by the cell, and a program that may
 * ptrace cannot reach the host through /proc/1/root), and make it not
 * dumpable (its memory is the forked caller's). */
static void isolate_init(const struct cell_config *cfg, int ready_fd)
{
    const char *failed = enter_empty_root(cfg->rootdir);
    if (failed)
        die(ready_fd, JAIL_EXIT_SETUP, failed, cfg->rootdir);
}

/* Whether the idle check's period has passed since the last one. */
static int idle_check_due(struct timespec *next, int period_ms)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec < next->tv_sec || (now.tv_sec == next->tv_sec && now.tv_nsec < next->tv_nsec))
        return 0;
    long long ns = (long long)now.tv_nsec + (long long)period_ms * 1000000LL;
    next->tv_sec = now.tv_sec + ns / 1000000000LL;
    next->tv_nsec = ns % 1000000000LL;
    return 1;
}

/* Tell whoever takes the cell lock next that this init is on its way out:
 * the kernel drops our flock before the process is fully gone. */
static _Noreturn void init_exit(int lock_fd)
{
    (void)!pwrite(lock_fd, "dead", 4, 0);
    _exit(0);
}

static _Noreturn void cell_init_main(const struct cell_config *cfg, int ready_fd)
{
    name_process(cfg->hostname);
    if (join_cgroups(cfg->init_procs_fds, cfg->n_init_procs) < 0)
        die(ready_fd, JAIL_EXIT_SETUP, "cgroup-join-init", NULL);
    if (sethostname(cfg->hostname, strlen(cfg->hostname)) < 0)
        die(ready_fd, JAIL_EXIT_SETUP, "sethostname", cfg->hostname);
    if (cfg->new_net && loopback_up() < 0)
        die(ready_fd, JAIL_EXIT_SETUP, "loopback-up", "lo");
    setsid();
    int last_pid_fd = set_pid_range(cfg, ready_fd);
    /* Nothing of the caller's may stay open here (its stdout pipe would
     * never see EOF): stdio to /dev/null while there still is one. */
    keep_only_fds3(cfg->lock_fd, ready_fd, last_pid_fd);
    isolate_init(cfg, ready_fd);

    /* pid 1 only receives signals it handles: give the ones it waits for a
     * handler, then block them so sigtimedwait() takes them. */
    static const int wanted[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1};
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = noop_handler;
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof wanted / sizeof *wanted; i++) {
        sigaction(wanted[i], &sa, NULL);
        sigaddset(&set, wanted[i]);
    }
    sigprocmask(SIG_BLOCK, &set, NULL);
    close(ready_fd); /* EOF without a record: the cell is ready */

    /* A ranged cell looks at its pids every RANGE_CHECK_MS; idle checks
     * come every idle_check_ms (0: a pinned cell, removed by its owner
     * only, has none). */
    enum { RANGE_CHECK_MS = 50 };
    int tick = cfg->idle_check_ms;
    if (last_pid_fd >= 0 && (tick == 0 || tick > RANGE_CHECK_MS))
        tick = RANGE_CHECK_MS;
    struct timespec next_idle = {0, 0};
    idle_check_due(&next_idle, cfg->idle_check_ms); /* the first one period from now */
    for (;;) {
        struct timespec ts = {tick / 1000, (tick % 1000) * 1000000L};
        int sig = tick > 0 ? sigtimedwait(&set, NULL, &ts) : sigwaitinfo(&set, NULL);
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP)
            init_exit(cfg->lock_fd);
        if (last_pid_fd >= 0)
            keep_pid_range(cfg, last_pid_fd);
        if (sig == SIGCHLD || cfg->idle_check_ms == 0)
            continue;
        if (sig < 0 && tick != cfg->idle_check_ms && !idle_check_due(&next_idle, cfg->idle_check_ms))
            continue;
        /* Idle check (timeout or SIGUSR1).  The lock keeps out a run that
         * has joined our namespaces but not yet forked its program. */
        if (flock(cfg->lock_fd, LOCK_EX) == 0) {
            if (kill(-1, 0) < 0 && errno == ESRCH)
                init_exit(cfg->lock_fd);
            flock(cfg->lock_fd, LOCK_UN);
        }
    }
}

static ssize_t read_all(int fd, char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

pid_t jail_spawn_cell(const struct cell_config *cfg, char *err, size_t errlen)
{
    /* Two pipes: the helper tells the init's pid, the init tells its setup
     * result (EOF alone means ready); they may write in any order. */
    int pid_pipe[2], ready_pipe[2];
    err[0] = '\0';
    if (pipe2(pid_pipe, O_CLOEXEC) < 0)
        goto pipe_failed;
    if (pipe2(ready_pipe, O_CLOEXEC) < 0) {
        close(pid_pipe[0]);
        close(pid_pipe[1]);
        goto pipe_failed;
    }
    pid_t helper = fork();
    if (helper == 0) {
        close(pid_pipe[0]);
        close(ready_pipe[0]);
        reset_signals();
        int flags = CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | SIGCHLD;
        if (cfg->new_net)
            flags |= CLONE_NEWNET;
        pid_t init = (pid_t)syscall(SYS_clone, flags, NULL, NULL, NULL, 0);
        if (init == 0) {
            close(pid_pipe[1]);
            cell_init_main(cfg, ready_pipe[1]);
        }
        if (init < 0)
            die(ready_pipe[1], JAIL_EXIT_SETUP, "clone-namespaces", NULL);
        (void)!write(pid_pipe[1], &init, sizeof init);
        _exit(0);
    }
    close(pid_pipe[1]);
    close(ready_pipe[1]);
    pid_t init = -1;
    if (helper < 0) {
        snprintf(err, errlen, "%d\x1f" "fork-cell\x1f\x1f%d", JAIL_EXIT_SETUP, errno);
    } else {
        int status;
        while (waitpid(helper, &status, 0) < 0 && errno == EINTR)
            ;
        if (read_all(pid_pipe[0], (char *)&init, sizeof init) != sizeof init)
            init = -1;
        ssize_t n = read_all(ready_pipe[0], err, errlen - 1);
        err[n > 0 ? n : 0] = '\0';
        if (n > 0)
            init = -1;
        else if (init < 0)
            snprintf(err, errlen, "%d\x1f" "spawn-cell\x1f\x1f%d", JAIL_EXIT_SETUP, EIO);
    }
    close(pid_pipe[0]);
    close(ready_pipe[0]);
    return init;

pipe_failed:
    snprintf(err, errlen, "%d\x1fpipe\x1f\x1f%d", JAIL_EXIT_SETUP, errno);
    return -1;
}
