/* What the kernel itself spends to merge isolated pages the way procksm's call routine
 * does (benchmarks/isolated_pages.py runs it): for every other page of a private
 * anonymous region (W2's layout; MADV_NOHUGEPAGE like planted's regions), mmap a sealed-
 * memfd page over it with MAP_PRIVATE | MAP_FIXED, give it its advice again, and
 * MADV_POPULATE_READ it. No ptrace, no Python: a floor for any design that maps pages.
 *
 *   isolated_pages PAGES ADVICE POPULATE   -> "pages=N cpu_s=X wall_s=Y"
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#define PAGE 4096L

static double clock_s(clockid_t id)
{
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: isolated_pages PAGES ADVICE(0|1) POPULATE(0|1)\n");
        return 2;
    }
    long pages = atol(argv[1]);
    int advice = atoi(argv[2]), populate = atoi(argv[3]);
    long slots = pages / 2;
    int fd = memfd_create("slots", 0);
    if (fd < 0 || ftruncate(fd, slots * PAGE)) { perror("memfd"); return 1; }
    char *s = mmap(0, slots * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *r = mmap(0, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED || r == MAP_FAILED) { perror("mmap"); return 1; }
    for (long i = 0; i < slots; i++)
        memset(s + i * PAGE, 1 + i % 251, PAGE);
    munmap(s, slots * PAGE);
    madvise(r, pages * PAGE, MADV_NOHUGEPAGE);
    memset(r, 7, pages * PAGE); /* every page present, as in a real heap */
    double w0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
    for (long i = 0; i < pages; i += 2) {
        char *a = r + i * PAGE;
        if (mmap(a, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, (i / 2) * PAGE) != a) {
            perror("mmap over a page");
            return 1;
        }
        if (advice && madvise(a, PAGE, MADV_NOHUGEPAGE)) { perror("madvise"); return 1; }
        if (populate && madvise(a, PAGE, MADV_POPULATE_READ)) { perror("populate"); return 1; }
    }
    double cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0, wall = clock_s(CLOCK_MONOTONIC) - w0;
    printf("pages=%ld cpu_s=%.6f wall_s=%.6f\n", slots, cpu, wall);
    return 0;
}
