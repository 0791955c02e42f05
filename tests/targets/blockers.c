/*
 * blockers: a target whose threads sit in blocking system calls and check that each call
 * returns exactly what it should, so a test can stop/inject/resume it many times and ask
 * whether anything leaked into the application (EINTR, errno 512..516, short sleeps, lost
 * or altered signals).
 *
 *   blockers [--bare] [--spinners N] [--sleepers N] [--spawn] [--exit-main]
 *
 * Threads (names visible in /proc/PID/task/TID/comm):
 *   b-read    read(2) on a pipe; every byte written by `poke` must arrive, nothing else
 *   b-futex   raw FUTEX_WAIT on a word that never changes: must never return
 *   b-sleep   nanosleep(1 s) in a loop, measuring CLOCK_MONOTONIC: never short, rc 0
 *   b-clock   clock_nanosleep(TIMER_ABSTIME) 1 s ticks: rc 0, never before the deadline
 *   b-poll    poll(2) on an idle pipe with a 1 h timeout: must not return
 *   b-epoll   epoll_wait(2) with timeout -1 on an idle pipe: must not return
 *   b-accept  accept(2) on a listening AF_UNIX socket nobody connects to: must not return
 *   b-select  select(2) without timeout on an idle pipe: must not return
 *   b-sig     pause() in a loop; SIGRTMIN (only unblocked in this thread) is counted and
 *             its si_value summed, so lost, duplicated or altered signals show up
 *   b-spin    (--spinners N) busy loops counting iterations
 *   b-nap     (--sleepers N) nanosleep(1 h); restart codes are anomalies
 *   b-spawn   (--spawn) creates short-lived threads in a loop (each lives ~200 us)
 *   --bare    none of the b-* blockers above b-spin: only the main thread plus what the
 *             other options ask for (for measuring pauses)
 *   --exit-main  the main thread answers commands from a helper thread and calls
 *             pthread_exit(): /proc/PID/status then shows the leader as a zombie
 *
 * Prints "READY pid=N sig=SIGRTMIN_NUMBER", then answers one line per command on stdin:
 *   errors   -> "ERRORS n" anomalies so far (each also printed on stderr)
 *   counts   -> "COUNTS reads=.. sleeps=.. ticks=.. sigs=.. sigsum=.. spins=.. spawned=.."
 *   poke     -> writes one byte to b-read's pipe, waits until it was read; "OK reads=n"
 *   vfork MS -> a new thread b-vfork vfork()s a child that sleeps MS milliseconds before
 *               _exit: the thread waits in uninterruptible sleep (state D) until then,
 *               where PTRACE_INTERRUPT cannot stop it; "OK tid=N"
 *   exec     -> execs itself as `blockers --bare` (which prints its READY line)
 *   quit     -> exits 0 (3 if anomalies were seen)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile long anomalies, reads, sleeps, ticks, sigs, sigsum, spins, spawned;
static int read_pipe[2], idle_pipe[2];

static void anomaly(const char *what, long rc, int err) {
    fprintf(stderr, "blockers[%d]: %s returned %ld errno=%d\n", getpid(), what, rc, err);
    __sync_fetch_and_add(&anomalies, 1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void block_rtmin(void) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
}

static void *b_read(void *a) {
    (void)a;
    for (;;) {
        char c;
        ssize_t n = read(read_pipe[0], &c, 1);
        if (n != 1) anomaly("read", n, errno);
        else __sync_fetch_and_add(&reads, 1);
    }
    return NULL;
}

static void *b_futex(void *a) {
    (void)a;
    static int word;
    for (;;) {
        long rc = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        anomaly("futex", rc, errno);
    }
    return NULL;
}

static void *b_sleep(void *a) {
    (void)a;
    for (;;) {
        struct timespec ts = {1, 0};
        double t0 = now();
        int rc = nanosleep(&ts, NULL);
        double dt = now() - t0;
        if (rc != 0) anomaly("nanosleep", rc, errno);
        else if (dt < 1.0) anomaly("nanosleep-short", (long)(dt * 1e6), 0);
        else __sync_fetch_and_add(&sleeps, 1);
    }
    return NULL;
}

static void *b_clock(void *a) {
    (void)a;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    for (;;) {
        deadline.tv_sec += 1;
        int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL);
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (rc != 0) anomaly("clock_nanosleep", rc, rc);
        else if (t.tv_sec < deadline.tv_sec ||
                 (t.tv_sec == deadline.tv_sec && t.tv_nsec < deadline.tv_nsec))
            anomaly("clock_nanosleep-early", 0, 0);
        else __sync_fetch_and_add(&ticks, 1);
    }
    return NULL;
}

static void *b_poll(void *a) {
    (void)a;
    for (;;) {
        struct pollfd pfd = {idle_pipe[0], POLLIN, 0};
        int rc = poll(&pfd, 1, 3600 * 1000);
        anomaly("poll", rc, errno);
    }
    return NULL;
}

static void *b_epoll(void *a) {
    (void)a;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, idle_pipe[0], &ev);
    for (;;) {
        int rc = epoll_wait(ep, &ev, 1, -1);
        anomaly("epoll_wait", rc, errno);
    }
    return NULL;
}

static void *b_accept(void *a) {
    (void)a;
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    /* Abstract name: nothing to clean up on disk. */
    int len = snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "blockers-%d", getpid());
    if (bind(s, (struct sockaddr *)&sa, offsetof(struct sockaddr_un, sun_path) + 1 + len) ||
        listen(s, 1)) {
        anomaly("bind/listen", -1, errno);
        return NULL;
    }
    for (;;) {
        int rc = accept(s, NULL, NULL);
        anomaly("accept", rc, errno);
    }
    return NULL;
}

static void *b_select(void *a) {
    (void)a;
    for (;;) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(idle_pipe[0], &r);
        int rc = select(idle_pipe[0] + 1, &r, NULL, NULL, NULL);
        anomaly("select", rc, errno);
    }
    return NULL;
}

static void on_rtmin(int sig, siginfo_t *si, void *uc) {
    (void)sig, (void)uc;
    __sync_fetch_and_add(&sigs, 1);
    __sync_fetch_and_add(&sigsum, si->si_value.sival_int);
}

static void *b_sig(void *a) {
    (void)a;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGRTMIN);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    for (;;) pause(); /* returns -1 EINTR after each handled signal: expected */
    return NULL;
}

static void *b_spin(void *a) {
    (void)a;
    for (;;) __sync_fetch_and_add(&spins, 1);
    return NULL;
}

static void *b_nap(void *a) {
    (void)a;
    for (;;) {
        struct timespec ts = {3600, 0};
        int rc = nanosleep(&ts, NULL);
        if (rc != 0) anomaly("nap", rc, errno);
    }
    return NULL;
}

static void *short_lived(void *a) {
    (void)a;
    usleep(200);
    return NULL;
}

static void *b_spawn(void *a) {
    (void)a;
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, NULL) == 0) {
            pthread_detach(t);
            __sync_fetch_and_add(&spawned, 1);
        }
        usleep(100);
    }
    return NULL;
}

static pthread_t start(void *(*fn)(void *), const char *name) {
    pthread_t t;
    if (pthread_create(&t, NULL, fn, NULL)) {
        perror("pthread_create");
        exit(2);
    }
    pthread_setname_np(t, name);
    return t;
}

static volatile long vfork_ms, vfork_tid;

static void *b_vfork(void *a) {
    (void)a;
    vfork_tid = syscall(SYS_gettid);
    pid_t child = vfork();
    if (child == 0) {
        struct timespec ts = {vfork_ms / 1000, (vfork_ms % 1000) * 1000000L};
        syscall(SYS_nanosleep, &ts, NULL); /* raw syscalls only: we share the parent's memory */
        syscall(SYS_exit, 0);
    }
    if (child > 0) waitpid(child, NULL, 0);
    return NULL;
}

static void *command_loop(void *a) {
    (void)a;
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "errors", 6)) {
            printf("ERRORS %ld\n", anomalies);
        } else if (!strncmp(line, "counts", 6)) {
            printf("COUNTS reads=%ld sleeps=%ld ticks=%ld sigs=%ld sigsum=%ld spins=%ld "
                   "spawned=%ld\n",
                   reads, sleeps, ticks, sigs, sigsum, spins, spawned);
        } else if (!strncmp(line, "poke", 4)) {
            long before = reads;
            if (write(read_pipe[1], "x", 1) != 1) anomaly("poke-write", -1, errno);
            double t0 = now();
            while (reads == before && now() - t0 < 5) usleep(100);
            printf("OK reads=%ld\n", reads);
        } else if (!strncmp(line, "vfork", 5)) {
            vfork_ms = atol(line + 5);
            vfork_tid = 0;
            pthread_t t = start(b_vfork, "b-vfork");
            pthread_detach(t);
            while (!vfork_tid) usleep(100);
            usleep(20000); /* let it reach vfork() */
            printf("OK tid=%ld\n", vfork_tid);
        } else if (!strncmp(line, "exec", 4)) {
            execl("/proc/self/exe", "blockers", "--bare", (char *)NULL);
            printf("ERR exec errno=%d\n", errno);
        } else if (!strncmp(line, "quit", 4)) {
            break;
        } else {
            printf("ERR unknown command\n");
        }
    }
    exit(anomalies ? 3 : 0);
    return NULL;
}

int main(int argc, char **argv) {
    int spinners = 0, sleepers = 0, spawn = 0, exit_main = 0, bare = 0;
    for (int a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--spinners") && a + 1 < argc) spinners = atoi(argv[++a]);
        else if (!strcmp(argv[a], "--sleepers") && a + 1 < argc) sleepers = atoi(argv[++a]);
        else if (!strcmp(argv[a], "--spawn")) spawn = 1;
        else if (!strcmp(argv[a], "--bare")) bare = 1;
        else if (!strcmp(argv[a], "--exit-main")) exit_main = 1;
        else {
            fprintf(stderr, "blockers: unknown option %s\n", argv[a]);
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(read_pipe) || pipe(idle_pipe)) return 2;
    /* SIGRTMIN is blocked everywhere but in b-sig, so every queued one is handled there. */
    block_rtmin();
    struct sigaction sa = {.sa_sigaction = on_rtmin, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigaction(SIGRTMIN, &sa, NULL);

    if (!bare) {
        start(b_read, "b-read");
        start(b_futex, "b-futex");
        start(b_sleep, "b-sleep");
        start(b_clock, "b-clock");
        start(b_poll, "b-poll");
        start(b_epoll, "b-epoll");
        start(b_accept, "b-accept");
        start(b_select, "b-select");
        start(b_sig, "b-sig");
    }
    for (int i = 0; i < spinners; i++) start(b_spin, "b-spin");
    for (int i = 0; i < sleepers; i++) start(b_nap, "b-nap");
    if (spawn) start(b_spawn, "b-spawn");

    printf("READY pid=%d sig=%d\n", getpid(), SIGRTMIN);
    if (exit_main) {
        start(command_loop, "b-command");
        pthread_exit(NULL);
    }
    command_loop(NULL);
    return 0;
}
