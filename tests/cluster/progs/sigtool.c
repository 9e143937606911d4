/* A test program for VM-wide signals: plain libc calls, as any program
 * makes them.
 *   sigtool wait FILE        write our pid to FILE, print each signal
 *                            (with sender pid and code), exit on SIGUSR1
 *   sigtool kill PID SIG     kill(2); prints "ok" or the error name
 *   sigtool queue PID SIG V  sigqueue(3) with value V
 *   sigtool tgkill TGID TID SIG
 *   sigtool count FILE       write our pid to FILE, count SIGRTMIN (queued:
 *                            each one counts), print the count on SIGUSR1
 *   sigtool busy-kill PID SIG  kill(2) while a child keeps interrupting us
 *                            with a SA_RESTART signal handler */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t got, from, code, value, rt_count, interrupts;

static void on_rt(int sig)
{
    (void)sig;
    rt_count++;
}

static void on_interrupt(int sig)
{
    (void)sig;
    interrupts++;
}

static void on_signal(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    got = sig;
    from = si->si_pid;
    code = si->si_code;
    value = si->si_value.sival_int;
}

static int report(int rc)
{
    printf("%s\n", rc == 0 ? "ok" : strerrorname_np(errno));
    return rc == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && !strcmp(argv[1], "wait")) {
        struct sigaction sa = {.sa_sigaction = on_signal, .sa_flags = SA_SIGINFO};
        sigaction(SIGUSR1, &sa, NULL);
        sigaction(SIGUSR2, &sa, NULL);
        FILE *f = fopen(argv[2], "w");
        if (!f)
            return 2;
        fprintf(f, "%d\n", getpid());
        fclose(f);
        for (;;) {
            pause();
            printf("sig=%d from=%d code=%d value=%d\n", (int)got, (int)from, (int)code, (int)value);
            if (got == SIGUSR1)
                return 0;
        }
    }
    if (argc == 3 && !strcmp(argv[1], "count")) {
        signal(SIGRTMIN, on_rt);
        sigset_t usr1;
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        sigprocmask(SIG_BLOCK, &usr1, NULL);
        FILE *f = fopen(argv[2], "w");
        if (!f)
            return 2;
        fprintf(f, "%d\n", getpid());
        fclose(f);
        int sig;
        sigwait(&usr1, &sig);
        printf("count=%d\n", (int)rt_count);
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "busy-kill")) {
        struct sigaction sa = {.sa_handler = on_interrupt, .sa_flags = SA_RESTART};
        sigaction(SIGUSR2, &sa, NULL);
        pid_t me = getpid(), child = fork();
        if (child == 0) {
            for (;;) { /* interrupt the parent every millisecond */
                kill(me, SIGUSR2);
                usleep(1000);
            }
        }
        int rc = kill(atoi(argv[2]), atoi(argv[3]));
        int err = errno;
        kill(child, SIGKILL);
        errno = err;
        fprintf(stderr, "interrupted %d times\n", (int)interrupts);
        return report(rc);
    }
    if (argc == 4 && !strcmp(argv[1], "kill"))
        return report(kill(atoi(argv[2]), atoi(argv[3])));
    if (argc == 5 && !strcmp(argv[1], "queue"))
        return report(sigqueue(atoi(argv[2]), atoi(argv[3]), (union sigval){.sival_int = atoi(argv[4])}));
    if (argc == 5 && !strcmp(argv[1], "tgkill"))
        return report((int)syscall(SYS_tgkill, atoi(argv[2]), atoi(argv[3]), atoi(argv[4])));
    fprintf(stderr, "usage: sigtool wait FILE | kill PID SIG | queue PID SIG V | tgkill TGID TID SIG\n");
    return 2;
}
