/* A test program for VM-wide signals: plain libc calls, as any program
 * makes them.
 *   sigtool wait FILE        write our pid to FILE, print each signal
 *                            (with sender pid and code), exit on SIGUSR1
 *   sigtool kill PID SIG     kill(2); prints "ok" or the error name
 *   sigtool queue PID SIG V  sigqueue(3) with value V
 *   sigtool tgkill TGID TID SIG */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t got, from, code, value;

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
    if (argc == 4 && !strcmp(argv[1], "kill"))
        return report(kill(atoi(argv[2]), atoi(argv[3])));
    if (argc == 5 && !strcmp(argv[1], "queue"))
        return report(sigqueue(atoi(argv[2]), atoi(argv[3]), (union sigval){.sival_int = atoi(argv[4])}));
    if (argc == 5 && !strcmp(argv[1], "tgkill"))
        return report((int)syscall(SYS_tgkill, atoi(argv[2]), atoi(argv[3]), atoi(argv[4])));
    fprintf(stderr, "usage: sigtool wait FILE | kill PID SIG | queue PID SIG V | tgkill TGID TID SIG\n");
    return 2;
}
