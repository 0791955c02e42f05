/*
 * lifecycle: a target for `procksm attach` that changes under the daemon.
 *
 *   lifecycle [--pages N] [--seed S] [--zero Z]
 *
 * One private anonymous region of N pages, page i = xorshift stream of (seed, i): identical
 * across processes started with the same seed, distinct within one; Z more pages written
 * then zeroed (a second region). Prints
 *   READY pid=.. region=0x.. pages=N zero=0x.. zero_pages=Z
 * then answers commands on stdin, one line each:
 *   check          -> "OK pages=<n>" or "CORRUPT page=<i>" (unmapped pages are skipped)
 *   write I        -> change byte 0 of page I (and the expectation): "OK"
 *   thread         -> start one more thread that sleeps: "OK threads=<n>"
 *   fork           -> fork a child that keeps its memory and sleeps; on SIGTERM the
 *                     child checks its memory and exits 0 (OK) or 1: "CHILD pid=<n>"
 *   reap           -> wait for the forked child: "CHILD exit=<n>" or "CHILD signal=<n>"
 *   exec           -> exec this program again (same pid, new image) with the same
 *                     arguments; the new image prints a new READY line
 *   munmap I N     -> munmap N pages from page I; they leave "check": "OK"
 *   move           -> mremap the region to a fresh address: "OK addr=0x.."
 *   quit           -> exits 0
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL

static unsigned char *base;
static size_t npages;
static uint64_t seed = 1;
static unsigned char *gone;      /* per page: unmapped */
static int16_t *override_byte;   /* per page: -1 or the byte 0 written with "write" */
static volatile sig_atomic_t term;

static void fill_page(unsigned char *p, size_t i) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + i * 0xBF58476D1CE4E5B9ULL + 1;
    uint64_t *w = (uint64_t *)p;
    for (size_t k = 0; k < PAGE / 8; k++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[k] = x;
    }
}

static long check(char *msg, size_t len) {
    unsigned char *tmp = malloc(PAGE);
    long ok = 0;
    for (size_t i = 0; i < npages; i++) {
        if (gone[i]) continue;
        fill_page(tmp, i);
        if (override_byte[i] >= 0) tmp[0] = (unsigned char)override_byte[i];
        if (memcmp(tmp, base + i * PAGE, PAGE)) {
            snprintf(msg, len, "CORRUPT page=%zu", i);
            free(tmp);
            return -1;
        }
        ok++;
    }
    free(tmp);
    return ok;
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

static void on_term(int sig) { (void)sig; term = 1; }

int main(int argc, char **argv) {
    size_t zpages = 0;
    npages = 256;
    for (int a = 1; a + 1 < argc; a += 2) {
        if (!strcmp(argv[a], "--pages")) npages = strtoul(argv[a + 1], 0, 0);
        else if (!strcmp(argv[a], "--seed")) seed = strtoull(argv[a + 1], 0, 0);
        else if (!strcmp(argv[a], "--zero")) zpages = strtoul(argv[a + 1], 0, 0);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    base = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *zero = NULL;
    if (zpages) {
        zero = mmap(NULL, zpages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(zero, 0x5a, zpages * PAGE);
        memset(zero, 0, zpages * PAGE);
    }
    if (base == MAP_FAILED || zero == MAP_FAILED) return 2;
    gone = calloc(npages, 1);
    override_byte = malloc(npages * sizeof *override_byte);
    for (size_t i = 0; i < npages; i++) {
        fill_page(base + i * PAGE, i);
        override_byte[i] = -1;
    }
    printf("READY pid=%d region=%#lx pages=%zu zero=%#lx zero_pages=%zu\n", getpid(),
           (unsigned long)(uintptr_t)base, npages, (unsigned long)(uintptr_t)zero, zpages);
    int threads = 1;
    pid_t child = -1;
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "";
        size_t i = 0, n = 0;
        int got = sscanf(line, "%31s %zu %zu", cmd, &i, &n);
        if (got < 1) continue;
        if (!strcmp(cmd, "check")) {
            char msg[128] = "";
            long ok = check(msg, sizeof msg);
            if (ok < 0) printf("%s\n", msg);
            else printf("OK pages=%ld\n", ok);
        } else if (!strcmp(cmd, "write") && got >= 2 && i < npages) {
            unsigned char v = (unsigned char)(base[i * PAGE] + 1);
            base[i * PAGE] = v;
            override_byte[i] = v;
            printf("OK\n");
        } else if (!strcmp(cmd, "thread")) {
            pthread_t t;
            if (pthread_create(&t, NULL, sleeper, NULL)) { printf("ERR\n"); continue; }
            printf("OK threads=%d\n", ++threads);
        } else if (!strcmp(cmd, "fork")) {
            fflush(stdout);
            child = fork();
            if (child == 0) {
                signal(SIGTERM, on_term);
                while (!term) pause();
                char msg[128] = "";
                _exit(check(msg, sizeof msg) < 0 ? 1 : 0);
            }
            printf("CHILD pid=%d\n", child);
        } else if (!strcmp(cmd, "reap")) {
            int st = 0;
            if (child <= 0 || waitpid(child, &st, 0) < 0) { printf("ERR\n"); continue; }
            if (WIFEXITED(st)) printf("CHILD exit=%d\n", WEXITSTATUS(st));
            else printf("CHILD signal=%d\n", WTERMSIG(st));
            child = -1;
        } else if (!strcmp(cmd, "exec")) {
            fflush(stdout);
            execv("/proc/self/exe", argv);
            printf("ERR exec\n");
        } else if (!strcmp(cmd, "munmap") && got >= 3 && i + n <= npages) {
            if (munmap(base + i * PAGE, n * PAGE)) { printf("ERR\n"); continue; }
            for (size_t p = i; p < i + n; p++) gone[p] = 1;
            printf("OK\n");
        } else if (!strcmp(cmd, "move")) {
            void *dst = mmap(NULL, npages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            void *to = mremap(base, npages * PAGE, npages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
            if (to == MAP_FAILED) { printf("ERR\n"); continue; }
            base = to;
            printf("OK addr=%#lx\n", (unsigned long)(uintptr_t)to);
        } else if (!strcmp(cmd, "quit")) {
            break;
        } else {
            printf("ERR unknown command\n");
        }
    }
    return 0;
}
