/*
 * fault_loop: a page-fault-heavy loop for benchmarks/bpf_overhead.py.
 *
 *   fault_loop [--dup D]
 *
 * Maps D pages that all hold the same bytes (something for procksm to merge, so the
 * process can be a target with merged ranges), prints "READY dup=0x.. dup_pages=D",
 * then answers commands on stdin:
 *   run I P  -> I times: mmap P fresh anonymous pages, store one byte in each (one write
 *               fault per page), munmap; prints "NS <wall ns> CPU_NS <ns on a CPU> FAULTS <I*P>"
 *               (CPU time: the process's own, so that time other processes take on a
 *               shared machine does not count)
 *   sys I    -> I getppid() calls (the cheapest system call: what a syscall tracepoint
 *               adds to every call shows); prints the same line, FAULTS = I (calls)
 *   quit
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static long long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    size_t dup = 64;
    if (argc == 3 && !strcmp(argv[1], "--dup")) dup = strtoul(argv[2], 0, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char *d = mmap(NULL, dup * PAGE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (d == MAP_FAILED) return 2;
    madvise(d, dup * PAGE, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < dup * PAGE; i++) d[i] = (unsigned char)((i % PAGE) * 7 % 251 + 1);
    printf("READY dup=%#lx dup_pages=%zu\n", (unsigned long)d, dup);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long iters = 0, pages = 0;
        if (sscanf(line, "run %lu %lu", &iters, &pages) == 2) {
            long long t0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
            for (unsigned long k = 0; k < iters; k++) {
                volatile unsigned char *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (m == MAP_FAILED) return 3;
                for (unsigned long p = 0; p < pages; p++) m[p * PAGE] = 1;
                munmap((void *)m, pages * PAGE);
            }
            long long c1 = now_ns(CLOCK_PROCESS_CPUTIME_ID), t1 = now_ns(CLOCK_MONOTONIC);
            printf("NS %lld CPU_NS %lld FAULTS %lu\n", t1 - t0, c1 - c0, iters * pages);
        } else if (sscanf(line, "sys %lu", &iters) == 1) {
            long long t0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
            for (unsigned long k = 0; k < iters; k++) syscall(SYS_getppid);
            long long c1 = now_ns(CLOCK_PROCESS_CPUTIME_ID), t1 = now_ns(CLOCK_MONOTONIC);
            printf("NS %lld CPU_NS %lld FAULTS %lu\n", t1 - t0, c1 - c0, iters);
        } else if (!strncmp(line, "quit", 4)) {
            break;
        }
    }
    return 0;
}
