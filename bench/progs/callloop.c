/* Time one system call, call by call: callloop N getppid | callloop N kill PID SIG
 * Prints "median_us p99_us" (first 10% of calls are warm-up). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int n = atoi(argv[1]);
    int is_kill = !strcmp(argv[2], "kill");
    if (is_kill && argc != 5)
        return 2;
    pid_t pid = is_kill ? atoi(argv[3]) : 0;
    int sig = is_kill ? atoi(argv[4]) : 0;
    int warm = n / 10;
    double *t = calloc((size_t)n, sizeof *t);
    for (int i = 0; i < n + warm; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        long r = is_kill ? syscall(SYS_kill, pid, sig) : syscall(SYS_getppid);
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (is_kill && r != 0) {
            perror("kill");
            return 1;
        }
        if (i >= warm)
            t[i - warm] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
    }
    qsort(t, (size_t)n, sizeof *t, cmp);
    printf("%.3f %.3f\n", t[n / 2], t[(int)(n * 0.99)]);
    return 0;
}
