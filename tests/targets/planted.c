/*
 * planted: a target with planted memory regions that verifies its own memory.
 *
 *   planted [--identical N] [--zero Z] [--unique U] [--intra D] [--volatile V]
 *           [--seed S] [--threads T] [--blockers] [--alternate A] [--churn C]
 *           [--canaries] [--counters K] [--writers W]
 *
 * Each region is its own private anonymous mapping, every page written (present):
 *   identical  N pages; page i = xorshift stream of (seed, i): identical across
 *              processes started with the same seed, distinct within one process
 *   zero       Z pages written then zeroed (real anon pages full of zeros, like a
 *              pre-touched JVM heap)
 *   unique     U pages seeded by the pid: nobody else has them
 *   intra      D pages, all with the same content (derived from the seed): duplicated
 *              within the process (and across processes with the same seed)
 *   volatile   V pages rewritten continuously by a thread (content includes the pid)
 *   churn      C pages identical across processes started with the same seed (like
 *              "identical"), stored to continuously by a thread: every ~10 ms word 0
 *              of each page is written with the current CLOCK_REALTIME second, so the
 *              content stays identical across processes (it changes once a second, at
 *              the same time in all) while every merged copy is written again within
 *              ~10 ms (benchmarks/suite.py W3). Not part of "check"
 *   counters   K pages identical across processes with the same seed (distinct within
 *              one), stored to by W writer threads (--writers W): writer w owns pages
 *              w, w+W, ... and word w of each; every visit stores a fresh counter value
 *              there, 1 ms later the page's original word back (so a page differs from its
 *              copies elsewhere ~1 ms in 2K/W ms: mostly mergeable), then 1 ms to the next.
 *              Each store is re-read at once and checked again before the next store to
 *              that word (a store lost to a concurrent replacement of the page shows
 *              there): a canary, not part of "check"
 * --threads T  T extra threads spinning (busy) on their own stack
 * --sleepers S  S extra threads sleeping 20 ms at a time (idle pool workers)
 * --sparse N   one more private anonymous mapping of N pages of which only every 4th
 *              page (0, 4, 8, ...) is written, the rest never touched (not present):
 *              64-bit word k of touched page i is (i << 32) ^ k ^ 0x5350415253450000.
 *              READY then also carries sparse=0x.. sparse_pages=N sparse_touched=M.
 *              Not part of "check" (checking would read, hence map, untouched pages).
 * --blockers   threads blocked in read(pipe), futex (cond wait), nanosleep, poll; each
 *              checks its syscall's result and reports EINTR or kernel restart codes
 * --mergeable  madvise(MADV_MERGEABLE) every planted region, so the kernel's KSM scans
 *              exactly the planted pages (benchmarks/merge_vs_ksm.py); exits 2 if refused
 * --alternate A  A pages, the worst layout for the VMA budget: even pages identical
 *              across processes with the same seed (distinct within one), odd pages
 *              unique to the pid, so every duplicate is an isolated page (region
 *              "alternate", part of "check")
 *
 * --canaries   (implies --blockers; --counters 64 --writers 2 unless given) the kill
 *              tests' witnesses, each anomaly counted for the "canaries" command:
 *              - one canary thread: in a loop, inline asm loads rbx, rbp, r12-r15 with
 *                (0xC0DE00|j) << 40 | iteration (r12 >> 40 == 0xC0DE02), xmm0-15 / ymm0-15
 *                / (AVX-512F+BW) zmm0-31 and k1-k7 with distinct per-word values, spins 1000
 *                pauses, stores them all back and compares; MXCSR (0xff80: FTZ, toward
 *                zero) and the x87 control word (0x0e7f) set at start, checked every
 *                iteration; so are its signal mask (SIGUSR2 and SIGRTMIN+3 blocked,
 *                SIGUSR1 not) and its sigaltstack; its SIGUSR1 handler counts deliveries
 *                and must run on the alternate stack. No other thread takes SIGUSR1.
 *              - the counters writers (above)
 *              READY then also carries canaries=1 canary_tid=<tid> writers=W
 *              vector=xmm|ymm|zmm+k (the registers the canary thread checks)
 *
 * Prints one line: READY pid=.. identical=0x.. identical_pages=N zero=0x.. ...
 * Then answers commands on stdin, one line each:
 *   check          -> "OK pages=<n verified>" or "CORRUPT region=<r> page=<i> ..."
 *   write R I      -> writes one byte into page I of region R (identical|zero|unique|intra)
 *                     and updates its own expectation; "OK"
 *   set R I V      -> byte 0 of page I of region R = V, a store without reading the page
 *                     first (a write fault on a not-present page stays one); "OK"
 *   readinto R I N -> read() N pages from page I of region R out of a pipe, one page per
 *                     call, each its current content with byte 0 incremented: the kernel
 *                     writes the page (copy_to_user), not the process; "OK" or "ERR .."
 *   dontneed R I N -> madvise(MADV_DONTNEED) on N pages from page I of region R; the
 *                     expectation becomes zero pages; prints "OK" or "ERR errno=.."
 *   dontneedloop R U MS -> for MS milliseconds, madvise(MADV_DONTNEED) one page at a time,
 *                     cycling through region R's pages, each followed by one page of region
 *                     U (cycling too), and check after each call that the page reads all
 *                     zeros; "OK calls=<n> first=<pages of R dontneeded for the first time>
 *                     max_us=<slowest call>" or "ERR errno=<e> region=<r> page=<i>" or
 *                     "STALE region=<r> page=<i>" (stops at the first failure)
 *   errors         -> "ERRORS n" blocker anomalies seen so far (EINTR / restart codes)
 *   canaries       -> "CANARIES n <first anomaly's description, or ->" (--canaries)
 *   signal N       -> N SIGUSR1 to the canary thread, one at a time, each waited for up to
 *                     5 s (standard signals do not queue): "OK", or an anomaly and
 *                     "ERR undelivered sent=.. delivered=.." (--canaries only)
 *   signals        -> "SIGNALS delivered=<n>" SIGUSR1 handled by the canary thread
 *   mmap N         -> mmap N fresh anonymous pages, write each, munmap: "OK" or
 *                     "ERR errno=.." (ENOMEM once the process reaches vm.max_map_count)
 *   crash          -> abort(): SIGABRT, a kernel core dump if RLIMIT_CORE allows one
 *   expect R I V   -> byte 0 of page I of region R is now V (someone else wrote it:
 *                     a debugger's process_vm_writev or /proc/PID/mem); "OK"
 *   forkdontneed R I N / threaddontneed R I N -> MADV_DONTNEED of those pages from a child
 *                     forked now (which then checks its memory, like "fork") / from a
 *                     thread created now (then they are expected zero, like "dontneed")
 *   fork           -> fork; the child runs "check" on its own memory and exits 0 (OK) or 1;
 *                     "CHILD exit=<n> <child's verdict>" or "CHILD signal=<n>"
 *   probe R I      -> fork; the child writes byte 0 of page I of region R and exits 0:
 *                     "CHILD exit=0" or "CHILD signal=11" when the page is not writable
 *   exec PATH      -> fork; the child execs PATH (no arguments): "CHILD exit=<n>"
 *   mremap R move  -> move region R to a fresh address (mremap MAYMOVE|FIXED): "OK addr=0x.."
 *   mremap R N     -> resize region R to N pages (MREMAP_MAYMOVE); grown pages are expected
 *                     to read as zeros, as on anonymous memory: "OK addr=0x.." or "ERR errno=.."
 *   mprotect R I N P -> mprotect N pages from page I of region R to P (none|r|rw): "OK"
 *   munmap R I N   -> munmap N pages from page I of region R; they leave "check": "OK"
 *   refill R I N   -> mmap fresh anonymous memory (MAP_FIXED) at those N pages, which must
 *                     be unmapped, and write each: "OK" or "ERR errno=.."
 *   madvise R I N A -> madvise(A) on N pages from page I of region R, A one of
 *                     free|wipeonfork|remove|dontneed|cold|pageout; expectations unchanged:
 *                     "OK" or "ERR errno=.."
 *   brk N          -> sbrk(+N pages), write and verify them, sbrk(-N pages): "OK" or "ERR .."
 *   quit           -> exits 0
 *
 * --attr A       apply attribute A to the identical region after filling it: mlock,
 *                wipeonfork, dontdump, hugepage, dontfork, sequential, random, pkey (pkey_alloc + pkey_mprotect;
 *                exits 4 if refused), anonname (PR_SET_VMA_ANON_NAME; exits 4 if refused)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

enum { R_IDENT, R_ZERO, R_UNIQUE, R_INTRA, R_VOLATILE, R_ALT, R_CHURN, R_COUNTERS, NREG };
static const char *names[NREG] = {"identical", "zero", "unique", "intra", "volatile",
                                  "alternate", "churn", "counters"};
static unsigned char *base[NREG];
static size_t npages[NREG];
/* Expected content: regenerated from (kind, seed, page) plus a per-page override byte. */
static int16_t *override_byte[NREG]; /* -1: none; else byte 0 of the page has this value */
static unsigned char *zeroed[NREG];  /* page was DONTNEEDed: must read back all zeros */
static unsigned char *unmapped[NREG]; /* page was munmapped: not checked */
static uint64_t seed = 1;
/* The pid that seeds unique pages: a forked child checks its parent's content. */
static pid_t planted_pid;
static volatile int stop_flag;
static volatile long anomalies;
static unsigned char *sparse_base;
static size_t sparse_pages, sparse_touched;
/* Opt in to the kernel's KSM per region rather than with prctl(PR_SET_MEMORY_MERGE): the
 * whole-process switch would also register libc, heap and the expectation arrays, and
 * /sys/kernel/mm/ksm counters would then no longer count only the planted pages. */
static int mergeable;

static uint64_t xs(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *s = x;
}

static void fill(int r, size_t i, unsigned char *dst) {
    uint64_t *w = (uint64_t *)dst;
    uint64_t s;
    switch (r) {
    case R_ZERO: memset(dst, 0, PAGE); return;
    case R_IDENT: s = seed * 0x9E3779B97F4A7C15ULL + i + 1; break;
    case R_UNIQUE: s = ((uint64_t)planted_pid << 32) ^ (i * 0x2545F4914F6CDD1DULL) ^ 0xabcdefULL; break;
    case R_INTRA: s = seed * 0xD1B54A32D192ED03ULL + 7; break;
    case R_CHURN: s = seed * 0xC2B2AE3D27D4EB4FULL + i + 0x77; break;
    case R_COUNTERS: s = seed * 0x94D049BB133111EBULL + i + 0x3c; break;
    case R_ALT:
        s = (i % 2 == 0) ? seed * 0xA0761D6478BD642FULL + i + 0x51
                         : ((uint64_t)planted_pid << 32) ^ (i * 0xE7037ED1A0B428DBULL) ^ 0x5a5aULL;
        break;
    default: s = getpid() + i; break;
    }
    for (size_t k = 0; k < PAGE / 8; k++) w[k] = xs(&s);
}

static unsigned char *map_region(size_t n) {
    if (n == 0) return NULL;
    /* A PROT_NONE page on each side keeps the region its own VMA: the kernel would
     * otherwise merge it with a neighbouring anonymous mapping such as a thread's stack
     * (which procksm refuses to merge, whole VMA). */
    char *g = mmap(NULL, (n + 2) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED) { perror("mmap"); exit(2); }
    void *p = g + PAGE;
    if (mprotect(p, n * PAGE, PROT_READ | PROT_WRITE)) { perror("mprotect"); exit(2); }
    /* Keep THP away so the planted pages are 4 KiB anon pages, like most of a service's heap. */
    madvise(p, n * PAGE, MADV_NOHUGEPAGE);
    if (mergeable && madvise(p, n * PAGE, MADV_MERGEABLE)) {
        perror("madvise(MADV_MERGEABLE)");
        exit(2);
    }
    return p;
}

static void *volatile_writer(void *arg) {
    (void)arg;
    uint64_t gen = 0;
    while (!stop_flag) {
        for (size_t i = 0; i < npages[R_VOLATILE]; i++) {
            uint64_t *w = (uint64_t *)(base[R_VOLATILE] + i * PAGE);
            w[0] = getpid();
            w[1] = gen;
            w[2 + (gen % 500)] = gen;
        }
        gen++;
        usleep(2000);
    }
    return NULL;
}

static void *churn_writer(void *arg) {
    (void)arg;
    while (!stop_flag) {
        uint64_t epoch = (uint64_t)time(NULL);
        for (size_t i = 0; i < npages[R_CHURN]; i++)
            ((volatile uint64_t *)(base[R_CHURN] + i * PAGE))[0] = epoch;
        usleep(10000);
    }
    return NULL;
}

static void *spinner(void *arg) {
    volatile uint64_t x = (uintptr_t)arg;
    while (!stop_flag) x = x * 6364136223846793005ULL + 1;
    return NULL;
}

/* --sleepers: threads that sleep in short nanosleeps (like a pool's idle workers) */
static void *sleeper(void *arg) {
    (void)arg;
    while (!stop_flag) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* --- blockers: each checks that its blocking call returns exactly what it should --- */
static int block_pipe[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void anomaly(const char *what, long rc, int err) {
    fprintf(stderr, "planted[%d]: blocker %s returned %ld errno=%d\n", getpid(), what, rc, err);
    __sync_fetch_and_add(&anomalies, 1);
}

static void *blk_read(void *a) {
    (void)a;
    char c;
    while (!stop_flag) {
        ssize_t n = read(block_pipe[0], &c, 1);
        if (n != 1) anomaly("read", n, errno);
    }
    return NULL;
}
static void *blk_futex(void *a) {
    (void)a;
    pthread_mutex_lock(&mu);
    while (!stop_flag) {
        int rc = pthread_cond_wait(&cv, &mu);
        if (rc != 0) anomaly("cond_wait", rc, rc);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}
static void *blk_sleep(void *a) {
    (void)a;
    while (!stop_flag) {
        struct timespec ts = {3600, 0};
        int rc = nanosleep(&ts, NULL);
        if (rc != 0 && !stop_flag) anomaly("nanosleep", rc, errno);
    }
    return NULL;
}
static void *blk_poll(void *a) {
    (void)a;
    int p[2];
    if (pipe(p)) return NULL;
    while (!stop_flag) {
        struct pollfd pfd = {p[0], POLLIN, 0};
        int rc = poll(&pfd, 1, 3600 * 1000);
        if (rc != 0 && !stop_flag) anomaly("poll", rc, errno);
    }
    return NULL;
}

/* --- canaries (--canaries): threads that notice what a ptrace injection could disturb --- */
static volatile long canary_count;            /* anomalies seen by any canary */
static volatile int canary_first_taken, canary_first_ready;
static char canary_first[240];                /* description of the first one */

static void canary_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void canary_fail(const char *fmt, ...) {
    char msg[sizeof canary_first];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "planted[%d]: canary: %s\n", getpid(), msg);
    if (__sync_bool_compare_and_swap(&canary_first_taken, 0, 1)) {
        memcpy(canary_first, msg, sizeof msg);
        __sync_synchronize();
        canary_first_ready = 1;
    }
    __sync_fetch_and_add(&canary_count, 1);
}

/* The register canary thread's block: general registers loaded from gin and stored back
 * into gout by the asm (offsets hard-coded there), the AVX-512 mask registers k1..k7 from
 * kin[1..7] into kout[1..7]. */
struct regblk {
    uint64_t gin[6];    /* 0: rbx rbp r12 r13 r14 r15 */
    uint64_t gout[6];   /* 48 */
    uint64_t saved_rbp; /* 96: the frame's rbp while rbp holds the canary value */
    uint64_t spins;     /* 104: pause iterations with every canary register live */
    uint64_t kin[8];    /* 112 */
    uint64_t kout[8];   /* 176 */
};
_Static_assert(offsetof(struct regblk, gout) == 48 && offsetof(struct regblk, saved_rbp) == 96
               && offsetof(struct regblk, spins) == 104 && offsetof(struct regblk, kin) == 112
               && offsetof(struct regblk, kout) == 176, "asm offsets");
static const char *gpr_names[6] = {"rbx", "rbp", "r12", "r13", "r14", "r15"};
/* General register j holds (GPR_TAG | j) << 40 | (iteration & 2^40-1): a tracer can tell a
 * live canary value (tests/test_canary_target.py checks r12 >> 40 == 0xC0DE02). */
#define GPR_TAG 0xC0DE00ULL
#define MXCSR_CANARY 0xff80u /* FTZ, rounding toward zero, all exceptions masked */
#define MXCSR_FLAGS 0x3fu    /* the sticky exception flags: not compared */
#define X87_CW_CANARY 0x0e7f /* rounding toward zero, 53-bit precision */
#define X87_CW_MASK 0x0f3f

#define GPR_LOAD                                                                        \
    "mov %%rbp, 96(%%rdi)\n\t"                                                          \
    "mov 0(%%rdi), %%rbx\n\tmov 8(%%rdi), %%rbp\n\tmov 16(%%rdi), %%r12\n\t"            \
    "mov 24(%%rdi), %%r13\n\tmov 32(%%rdi), %%r14\n\tmov 40(%%rdi), %%r15\n\t"
#define SPIN "mov 104(%%rdi), %%rcx\n\t1: pause\n\tdec %%rcx\n\tjnz 1b\n\t"
#define GPR_STORE                                                                       \
    "mov %%rbx, 48(%%rdi)\n\tmov %%rbp, 56(%%rdi)\n\tmov %%r12, 64(%%rdi)\n\t"          \
    "mov %%r13, 72(%%rdi)\n\tmov %%r14, 80(%%rdi)\n\tmov %%r15, 88(%%rdi)\n\t"          \
    "mov 96(%%rdi), %%rbp\n\t"
#define IRP16 ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n\t"
#define IRP32 ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26," \
              "27,28,29,30,31\n\t"
#define GPR_CLOBBERS "rbx", "rcx", "r12", "r13", "r14", "r15", "cc", "memory"
#define XMM_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
                     "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

/* Each variant loads the general registers and xmm0-15 / ymm0-15 / zmm0-31 + k1-7 from
 * the block and vin, spins, and stores them back into the block and vout. rbp is not a
 * clobber (it may be the frame pointer): saved in the block, restored before leaving. */
__attribute__((noinline)) static void regs_sse(struct regblk *b, const uint64_t *vin,
                                               uint64_t *vout) {
    __asm__ volatile(GPR_LOAD IRP16 "movdqu \\i*16(%%rsi), %%xmm\\i\n\t.endr\n\t" SPIN
                     IRP16 "movdqu %%xmm\\i, \\i*16(%%rdx)\n\t.endr\n\t" GPR_STORE
                     : : "D"(b), "S"(vin), "d"(vout) : GPR_CLOBBERS, XMM_CLOBBERS);
}
__attribute__((noinline)) static void regs_avx(struct regblk *b, const uint64_t *vin,
                                               uint64_t *vout) {
    __asm__ volatile(GPR_LOAD IRP16 "vmovdqu \\i*32(%%rsi), %%ymm\\i\n\t.endr\n\t" SPIN
                     IRP16 "vmovdqu %%ymm\\i, \\i*32(%%rdx)\n\t.endr\n\t" GPR_STORE
                     "vzeroupper\n\t"
                     : : "D"(b), "S"(vin), "d"(vout) : GPR_CLOBBERS, XMM_CLOBBERS);
}
/* Only called when the CPU (and kernel) support AVX-512F and BW: the target attribute
 * lets this function name xmm16-31 and k1-7, the rest of the program stays baseline. */
__attribute__((noinline, target("avx512f,avx512bw"))) static void
regs_avx512(struct regblk *b, const uint64_t *vin, uint64_t *vout) {
    __asm__ volatile(GPR_LOAD IRP32 "vmovdqu64 \\i*64(%%rsi), %%zmm\\i\n\t.endr\n\t"
                     ".irp i,1,2,3,4,5,6,7\n\tkmovq 112+\\i*8(%%rdi), %%k\\i\n\t.endr\n\t" SPIN
                     IRP32 "vmovdqu64 %%zmm\\i, \\i*64(%%rdx)\n\t.endr\n\t"
                     ".irp i,1,2,3,4,5,6,7\n\tkmovq %%k\\i, 176+\\i*8(%%rdi)\n\t.endr\n\t"
                     GPR_STORE "vzeroupper\n\t"
                     : : "D"(b), "S"(vin), "d"(vout)
                     : GPR_CLOBBERS, XMM_CLOBBERS, "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
                       "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28",
                       "xmm29", "xmm30", "xmm31", "k1", "k2", "k3", "k4", "k5", "k6", "k7");
}

enum { VEC_XMM, VEC_YMM, VEC_ZMM };
static int vec_kind;
static const char *vec_names[] = {"xmm", "ymm", "zmm+k"};
static pthread_t canary_pthread;
static volatile pid_t canary_tid;
static volatile int canary_ready;
#define ALTSTACK_SIZE (256 * 1024UL)
static char *altstack;
static volatile long usr1_delivered;
static volatile int usr1_off_altstack;

static void on_usr1(int sig) {
    char here;
    (void)sig;
    if (&here < altstack || &here >= altstack + ALTSTACK_SIZE) usr1_off_altstack = 1;
    __sync_fetch_and_add(&usr1_delivered, 1);
}

static void canary_set_fpu(void) {
    unsigned mx = MXCSR_CANARY;
    unsigned short cw = X87_CW_CANARY;
    __asm__ volatile("ldmxcsr %0" : : "m"(mx));
    __asm__ volatile("fldcw %0" : : "m"(cw));
}

/* One thread: the register/FPU canary, the signal mask and alternate stack canary, and the
 * target of "signal N" (its SIGUSR1 handler runs on the alternate stack). */
static void *canary_thread(void *arg) {
    (void)arg;
    sigset_t s, want_mask, cur_mask;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    sigaddset(&s, SIGRTMIN + 3);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    pthread_sigmask(SIG_SETMASK, NULL, &want_mask);
    stack_t want_ss = {.ss_sp = altstack, .ss_flags = 0, .ss_size = ALTSTACK_SIZE}, cur_ss;
    if (sigaltstack(&want_ss, NULL)) { perror("sigaltstack"); exit(2); }
    canary_set_fpu();
    canary_tid = (pid_t)syscall(SYS_gettid);
    __sync_synchronize();
    canary_ready = 1;

    int nvec = vec_kind == VEC_ZMM ? 32 : 16;
    int words = vec_kind == VEC_ZMM ? 8 : vec_kind == VEC_YMM ? 4 : 2; /* 64-bit words/reg */
    static uint64_t vin[32 * 8] __attribute__((aligned(64)));
    static uint64_t vout[32 * 8] __attribute__((aligned(64)));
    struct regblk b;
    memset(&b, 0, sizeof b);
    for (uint64_t iter = 1; !stop_flag; iter++) {
        uint64_t low = iter & 0xffffffffffULL;
        for (int j = 0; j < 6; j++) b.gin[j] = (GPR_TAG | j) << 40 | low;
        for (int k = 1; k < 8; k++) b.kin[k] = (0x4B00ULL | k) << 48 | low;
        /* word q of register r: every word distinct, upper halves unlike the lower */
        for (int r = 0; r < nvec; r++)
            for (int q = 0; q < words; q++)
                vin[r * words + q] = (0xA500ULL | r) << 48 | (uint64_t)q << 40 | low;
        memset(b.gout, 0, sizeof b.gout);
        memset(b.kout, 0, sizeof b.kout);
        memset(vout, 0, sizeof vout);
        b.spins = 1000;
        if (vec_kind == VEC_ZMM) regs_avx512(&b, vin, vout);
        else if (vec_kind == VEC_YMM) regs_avx(&b, vin, vout);
        else regs_sse(&b, vin, vout);

        for (int j = 0; j < 6; j++)
            if (b.gout[j] != b.gin[j])
                canary_fail("register %s expected=%#" PRIx64 " got=%#" PRIx64, gpr_names[j],
                            b.gin[j], b.gout[j]);
        for (int r = 0; r < nvec; r++)
            for (int q = 0; q < words; q++)
                if (vout[r * words + q] != vin[r * words + q]) {
                    canary_fail("register %cmm%d word %d expected=%#" PRIx64 " got=%#" PRIx64,
                                "xyz"[vec_kind], r, q, vin[r * words + q], vout[r * words + q]);
                    break;
                }
        if (vec_kind == VEC_ZMM)
            for (int k = 1; k < 8; k++)
                if (b.kout[k] != b.kin[k])
                    canary_fail("register k%d expected=%#" PRIx64 " got=%#" PRIx64, k, b.kin[k],
                                b.kout[k]);
        unsigned mx;
        unsigned short cw;
        __asm__ volatile("stmxcsr %0" : "=m"(mx));
        __asm__ volatile("fnstcw %0" : "=m"(cw));
        if ((mx & ~MXCSR_FLAGS) != MXCSR_CANARY || (cw & X87_CW_MASK) != (X87_CW_CANARY & X87_CW_MASK)) {
            canary_fail("fpu control mxcsr=%#x (expected %#x) x87cw=%#x (expected %#x)", mx,
                        MXCSR_CANARY, cw, X87_CW_CANARY);
            canary_set_fpu();
        }

        pthread_sigmask(SIG_SETMASK, NULL, &cur_mask);
        for (int sig = 1; sig <= SIGRTMAX; sig++)
            if (sigismember(&cur_mask, sig) != sigismember(&want_mask, sig)) {
                canary_fail("signal mask: signal %d blocked=%d, expected %d", sig,
                            sigismember(&cur_mask, sig), sigismember(&want_mask, sig));
                pthread_sigmask(SIG_SETMASK, &want_mask, NULL);
                break;
            }
        if (sigaltstack(NULL, &cur_ss) || cur_ss.ss_sp != want_ss.ss_sp
            || cur_ss.ss_size != want_ss.ss_size || cur_ss.ss_flags != want_ss.ss_flags) {
            canary_fail("sigaltstack sp=%p size=%zu flags=%d (expected sp=%p size=%zu flags=0)",
                        cur_ss.ss_sp, cur_ss.ss_size, cur_ss.ss_flags, want_ss.ss_sp,
                        want_ss.ss_size);
            sigaltstack(&want_ss, NULL);
        }
        if (usr1_off_altstack) {
            usr1_off_altstack = 0;
            canary_fail("the SIGUSR1 handler ran off the alternate stack");
        }
    }
    return NULL;
}

/* "signal N": N SIGUSR1 to the canary thread, one at a time (a second standard signal sent
 * while the first is pending would merge with it), each waited for up to 5 s. */
static void send_usr1(long n) {
    for (long k = 0; k < n; k++) {
        long before = usr1_delivered;
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int rc = pthread_kill(canary_pthread, SIGUSR1);
        if (rc) { printf("ERR errno=%d\n", rc); return; }
        while (usr1_delivered == before) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if (t.tv_sec - t0.tv_sec >= 5) {
                canary_fail("SIGUSR1 %ld of %ld not delivered within 5 s", k + 1, n);
                printf("ERR undelivered sent=%ld delivered=%ld\n", k + 1, usr1_delivered);
                return;
            }
            usleep(100);
        }
    }
    printf("OK\n");
}

/* --- counters: writer w owns pages w, w+W, w+2W, ... of the region and word w of each --- */
static int nwriters;
static uint64_t *counter_base;   /* the seed-derived content of word (owner) of each page */
static uint64_t *counter_expect; /* what the owner last stored there */
#define COUNTER_TAG 0x5743000000000000ULL

/* Each visit stores a fresh counter value, then 1 ms later the page's original word back,
 * so a page differs from its copies in other processes ~1 ms out of every 2K/W ms and
 * stays mostly mergeable; every store is checked right after (re-read) and again before the next
 * store to the same word (a store lost to a concurrent page replacement shows there). */
static void *counter_writer(void *arg) {
    int w = (int)(uintptr_t)arg;
    uint64_t ctr = 0;
    struct timespec ms = {0, 1000000};
    while (!stop_flag) {
        for (size_t p = (size_t)w; p < npages[R_COUNTERS] && !stop_flag; p += (size_t)nwriters) {
            volatile uint64_t *word = (volatile uint64_t *)(base[R_COUNTERS] + p * PAGE) + w;
            uint64_t vals[2] = {COUNTER_TAG | (uint64_t)w << 40 | ++ctr, counter_base[p]};
            for (int k = 0; k < 2; k++) {
                uint64_t got = *word;
                if (got != counter_expect[p])
                    canary_fail("counters page=%zu word=%d expected=%#" PRIx64 " got=%#" PRIx64
                                " (before the next store)", p, w, counter_expect[p], got);
                *word = vals[k];
                got = *word;
                if (got != vals[k])
                    canary_fail("counters page=%zu word=%d expected=%#" PRIx64 " got=%#" PRIx64
                                " (right after the store)", p, w, vals[k], got);
                counter_expect[p] = vals[k];
                nanosleep(&ms, NULL);
            }
        }
    }
    return NULL;
}

static int verify_page(int r, size_t i, unsigned char *tmp, char *msg, size_t msglen) {
    unsigned char *p = base[r] + i * PAGE;
    if (unmapped[r][i]) return 1;
    if (zeroed[r][i]) memset(tmp, 0, PAGE);
    else fill(r, i, tmp);
    if (override_byte[r][i] >= 0) tmp[0] = (unsigned char)override_byte[r][i];
    if (memcmp(p, tmp, PAGE) != 0) {
        size_t k = 0;
        while (p[k] == tmp[k]) k++;
        snprintf(msg, msglen, "CORRUPT region=%s page=%zu offset=%zu expected=%u got=%u", names[r],
                 i, k, tmp[k], p[k]);
        return 0;
    }
    return 1;
}

static int region_by_name(const char *s) {
    for (int r = 0; r < NREG; r++)
        if (!strcmp(s, names[r])) return r;
    return -1;
}

/* Verify every checked region; returns the number of pages verified, or -1 with msg set. */
static long check_all(unsigned char *tmp, char *msg, size_t msglen) {
    long ok = 0;
    for (int r = 0; r < NREG; r++) {
        if (r == R_VOLATILE || r == R_CHURN || r == R_COUNTERS) continue;
        for (size_t p = 0; p < npages[r]; p++) {
            if (!verify_page(r, p, tmp, msg, msglen)) return -1;
            if (!unmapped[r][p]) ok++;
        }
    }
    return ok;
}

static void apply_attr(const char *attr, unsigned char *p, size_t n) {
    int rc = 0;
    if (!strcmp(attr, "mlock")) rc = mlock(p, n * PAGE);
    else if (!strcmp(attr, "wipeonfork")) rc = madvise(p, n * PAGE, MADV_WIPEONFORK);
    else if (!strcmp(attr, "dontdump")) rc = madvise(p, n * PAGE, MADV_DONTDUMP);
    else if (!strcmp(attr, "hugepage")) rc = madvise(p, n * PAGE, MADV_HUGEPAGE);
    else if (!strcmp(attr, "dontfork")) rc = madvise(p, n * PAGE, MADV_DONTFORK);
    else if (!strcmp(attr, "sequential")) rc = madvise(p, n * PAGE, MADV_SEQUENTIAL);
    else if (!strcmp(attr, "random")) rc = madvise(p, n * PAGE, MADV_RANDOM);
    else if (!strcmp(attr, "pkey")) {
        long key = syscall(SYS_pkey_alloc, 0, 0);
        if (key < 0) { fprintf(stderr, "planted: pkey_alloc: %s\n", strerror(errno)); exit(4); }
        rc = (int)syscall(SYS_pkey_mprotect, p, n * PAGE, PROT_READ | PROT_WRITE, key);
    } else if (!strcmp(attr, "anonname")) {
        rc = prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, p, n * PAGE, "planted");
        if (rc) { fprintf(stderr, "planted: PR_SET_VMA_ANON_NAME: %s\n", strerror(errno)); exit(4); }
    } else { fprintf(stderr, "planted: unknown --attr %s\n", attr); exit(2); }
    if (rc) { fprintf(stderr, "planted: --attr %s: %s\n", attr, strerror(errno)); exit(4); }
}

static int parse_prot(const char *s) {
    if (!strcmp(s, "none")) return PROT_NONE;
    if (!strcmp(s, "r")) return PROT_READ;
    if (!strcmp(s, "rw")) return PROT_READ | PROT_WRITE;
    return -1;
}

static int parse_advice(const char *s) {
    if (!strcmp(s, "free")) return MADV_FREE;
    if (!strcmp(s, "wipeonfork")) return MADV_WIPEONFORK;
    if (!strcmp(s, "remove")) return MADV_REMOVE;
    if (!strcmp(s, "dontneed")) return MADV_DONTNEED;
    if (!strcmp(s, "cold")) return MADV_COLD;
    if (!strcmp(s, "pageout")) return MADV_PAGEOUT;
    return -1;
}

/* Wait for a child and print how it ended, with what it wrote into the pipe (if any). */
static void report_child(pid_t pid, int rfd) {
    char buf[256] = "";
    if (rfd >= 0) {
        ssize_t got = read(rfd, buf, sizeof buf - 1);
        buf[got > 0 ? got : 0] = 0;
        close(rfd);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid) { printf("ERR errno=%d\n", errno); return; }
    if (WIFSIGNALED(status)) printf("CHILD signal=%d\n", WTERMSIG(status));
    else printf("CHILD exit=%d%s%s\n", WEXITSTATUS(status), buf[0] ? " " : "", buf);
}

/* Grow the per-page expectation tables of region r to n pages (new pages read as zeros). */
static void resize_tables(int r, size_t n) {
    override_byte[r] = realloc(override_byte[r], (n + 1) * sizeof(int16_t));
    zeroed[r] = realloc(zeroed[r], n + 1);
    unmapped[r] = realloc(unmapped[r], n + 1);
    for (size_t p = npages[r]; p < n; p++) override_byte[r][p] = -1, zeroed[r][p] = 1,
                                           unmapped[r][p] = 0;
    npages[r] = n;
}

/* pages [i, i+n) of region r were dropped: they read zeros now */
static void mark_zeroed(int r, size_t i, size_t n) {
    for (size_t p = i; p < i + n; p++) zeroed[r][p] = 1, override_byte[r][p] = -1;
}

struct dontneed_job { unsigned char *addr; size_t len; int err; };

static void *dontneed_thread(void *arg) {
    struct dontneed_job *job = arg;
    if (madvise(job->addr, job->len, MADV_DONTNEED)) job->err = errno;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = 0, sleepers = 0, blockers = 0, canaries = 0, writers = -1;
    long counters = -1;
    const char *attr = NULL;
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a];
        const char *v = a + 1 < argc ? argv[a + 1] : "0";
        if (!strcmp(k, "--identical")) npages[R_IDENT] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--zero")) npages[R_ZERO] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--unique")) npages[R_UNIQUE] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--intra")) npages[R_INTRA] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--volatile")) npages[R_VOLATILE] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--seed")) seed = strtoull(v, 0, 0), a++;
        else if (!strcmp(k, "--threads")) threads = atoi(v), a++;
        else if (!strcmp(k, "--sleepers")) sleepers = atoi(v), a++;
        else if (!strcmp(k, "--blockers")) blockers = 1;
        else if (!strcmp(k, "--sparse")) sparse_pages = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--mergeable")) mergeable = 1;
        else if (!strcmp(k, "--alternate")) npages[R_ALT] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--churn")) npages[R_CHURN] = strtoul(v, 0, 0), a++;
        else if (!strcmp(k, "--attr")) attr = v, a++;
        else if (!strcmp(k, "--canaries")) canaries = 1;
        else if (!strcmp(k, "--writers")) writers = atoi(v), a++;
        else if (!strcmp(k, "--counters")) counters = strtol(v, 0, 0), a++;
        else { fprintf(stderr, "planted: unknown option %s\n", k); return 2; }
    }
    if (canaries) blockers = 1;
    if (counters < 0) counters = canaries ? 64 : 0;
    if (writers < 0) writers = canaries ? 2 : 0;
    npages[R_COUNTERS] = (size_t)counters;
    /* writer w owns word w of its pages: at most one writer per page and per word */
    nwriters = writers < counters ? writers : (int)counters;
    if (nwriters > (int)(PAGE / 8)) nwriters = PAGE / 8;
    setvbuf(stdout, NULL, _IOLBF, 0);
    planted_pid = getpid();
    for (int r = 0; r < NREG; r++) {
        base[r] = map_region(npages[r]);
        override_byte[r] = malloc((npages[r] + 1) * sizeof(int16_t));
        zeroed[r] = calloc(npages[r] + 1, 1);
        unmapped[r] = calloc(npages[r] + 1, 1);
        for (size_t i = 0; i < npages[r]; i++) override_byte[r][i] = -1;
        for (size_t i = 0; i < npages[r]; i++) {
            base[r][i * PAGE] = 1; /* fault in a private page even for zero pages */
            fill(r, i, base[r] + i * PAGE);
        }
    }
    if (attr && npages[R_IDENT]) apply_attr(attr, base[R_IDENT], npages[R_IDENT]);
    sparse_base = map_region(sparse_pages);
    for (size_t i = 0; i < sparse_pages; i += 4) {
        uint64_t *w = (uint64_t *)(sparse_base + i * PAGE);
        for (size_t k = 0; k < PAGE / 8; k++) w[k] = ((uint64_t)i << 32) ^ k ^ 0x5350415253450000ULL;
        sparse_touched++;
    }
    pthread_t th;
    sigset_t usr1, main_mask;
    if (canaries) {
        /* SIGUSR1 ("signal N") is for the canary thread only: no other thread takes it */
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sa.sa_flags = SA_ONSTACK | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGUSR1, &sa, NULL);
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &usr1, &main_mask);
    }
    if (nwriters > 0) {
        counter_base = calloc(npages[R_COUNTERS], sizeof *counter_base);
        counter_expect = calloc(npages[R_COUNTERS], sizeof *counter_expect);
        for (size_t p = 0; p < npages[R_COUNTERS]; p++)
            counter_base[p] = counter_expect[p] =
                ((uint64_t *)(base[R_COUNTERS] + p * PAGE))[p % (size_t)nwriters];
        for (int w = 0; w < nwriters; w++)
            pthread_create(&th, NULL, counter_writer, (void *)(uintptr_t)w);
    }
    if (canaries) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
            vec_kind = VEC_ZMM;
        else if (__builtin_cpu_supports("avx")) vec_kind = VEC_YMM;
        else vec_kind = VEC_XMM;
        altstack = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (altstack == MAP_FAILED) { perror("mmap"); return 2; }
        pthread_create(&canary_pthread, NULL, canary_thread, NULL);
        while (!canary_ready) usleep(1000);
    }
    if (npages[R_VOLATILE]) pthread_create(&th, NULL, volatile_writer, NULL);
    if (npages[R_CHURN]) pthread_create(&th, NULL, churn_writer, NULL);
    for (int t = 0; t < threads; t++) pthread_create(&th, NULL, spinner, (void *)(uintptr_t)t);
    for (int t = 0; t < sleepers; t++) pthread_create(&th, NULL, sleeper, NULL);
    if (blockers) {
        if (pipe(block_pipe)) return 2;
        pthread_create(&th, NULL, blk_read, NULL);
        pthread_create(&th, NULL, blk_futex, NULL);
        pthread_create(&th, NULL, blk_sleep, NULL);
        pthread_create(&th, NULL, blk_poll, NULL);
    }
    if (canaries) pthread_sigmask(SIG_SETMASK, &main_mask, NULL);
    printf("READY pid=%d", getpid());
    for (int r = 0; r < NREG; r++)
        printf(" %s=%#lx %s_pages=%zu", names[r], (unsigned long)(uintptr_t)base[r], names[r],
               npages[r]);
    if (sparse_pages)
        printf(" sparse=%#lx sparse_pages=%zu sparse_touched=%zu",
               (unsigned long)(uintptr_t)sparse_base, sparse_pages, sparse_touched);
    printf(" threads=%d blockers=%d", threads, blockers);
    if (canaries)
        printf(" canaries=1 canary_tid=%d writers=%d vector=%s", (int)canary_tid, nwriters,
               vec_names[vec_kind]);
    printf("\n");

    char line[256];
    unsigned char *tmp = malloc(PAGE);
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "", reg[32] = "";
        size_t i = 0, n = 0;
        int got = sscanf(line, "%31s %31s %zu %zu", cmd, reg, &i, &n);
        if (got < 1) continue;
        if (!strcmp(cmd, "check")) {
            char msg[256] = "";
            long ok = check_all(tmp, msg, sizeof msg);
            if (ok < 0) printf("%s\n", msg);
            else printf("OK pages=%ld\n", ok);
        } else if (!strcmp(cmd, "write") && got >= 3) {
            int r = region_by_name(reg);
            if (r < 0 || i >= npages[r]) { printf("ERR bad region/page\n"); continue; }
            unsigned char v = (unsigned char)(base[r][i * PAGE] + 1);
            base[r][i * PAGE] = v;
            override_byte[r][i] = v;
            printf("OK\n");
        } else if (!strcmp(cmd, "set") && got >= 4) {
            int r = region_by_name(reg);
            if (r < 0 || i >= npages[r] || n > 255) { printf("ERR bad region/page\n"); continue; }
            ((volatile unsigned char *)base[r])[i * PAGE] = (unsigned char)n;
            override_byte[r][i] = (int16_t)n;
            printf("OK\n");
        } else if (!strcmp(cmd, "readinto") && got >= 4) {
            int r = region_by_name(reg);
            int pfd[2];
            if (r < 0 || i + n > npages[r]) { printf("ERR bad region/page\n"); continue; }
            if (pipe(pfd)) { printf("ERR errno=%d\n", errno); continue; }
            int bad = 0;
            for (size_t p = i; p < i + n && !bad; p++) {
                memcpy(tmp, base[r] + p * PAGE, PAGE);
                tmp[0]++;
                bad = write(pfd[1], tmp, PAGE) != (ssize_t)PAGE
                      || read(pfd[0], base[r] + p * PAGE, PAGE) != (ssize_t)PAGE;
                if (!bad) override_byte[r][p] = tmp[0];
            }
            close(pfd[0]);
            close(pfd[1]);
            if (bad) printf("ERR errno=%d\n", errno);
            else printf("OK\n");
        } else if (!strcmp(cmd, "dontneed") && got >= 4) {
            int r = region_by_name(reg);
            if (r < 0 || i + n > npages[r]) { printf("ERR bad region/page\n"); continue; }
            if (madvise(base[r] + i * PAGE, n * PAGE, MADV_DONTNEED)) {
                printf("ERR errno=%d\n", errno);
                continue;
            }
            mark_zeroed(r, i, n);
            printf("OK\n");
        } else if (!strcmp(cmd, "dontneedloop")) {
            char reg2[32] = "";
            size_t ms = 0;
            int r = region_by_name(reg), u = -1;
            if (sscanf(line, "%*s %*s %31s %zu", reg2, &ms) == 2) u = region_by_name(reg2);
            if (r < 0 || u < 0 || !npages[r] || !npages[u]) { printf("ERR bad region\n"); continue; }
            struct timespec t0, a, b;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            long calls = 0, first = 0, max_us = 0, fail = 0;
            for (size_t k = 0; !fail; k++) {
                clock_gettime(CLOCK_MONOTONIC, &a);
                if ((a.tv_sec - t0.tv_sec) * 1000 + (a.tv_nsec - t0.tv_nsec) / 1000000 >= (long)ms)
                    break;
                int rr[2] = {r, u};
                for (int q = 0; q < 2 && !fail; q++) {
                    size_t pg = k % npages[rr[q]];
                    unsigned char *pp = base[rr[q]] + pg * PAGE;
                    if (rr[q] == r && !zeroed[r][pg]) first++;
                    clock_gettime(CLOCK_MONOTONIC, &a);
                    int rc = madvise(pp, PAGE, MADV_DONTNEED);
                    clock_gettime(CLOCK_MONOTONIC, &b);
                    long us = (b.tv_sec - a.tv_sec) * 1000000 + (b.tv_nsec - a.tv_nsec) / 1000;
                    if (us > max_us) max_us = us;
                    calls++;
                    if (rc) {
                        printf("ERR errno=%d region=%s page=%zu\n", errno, names[rr[q]], pg);
                        fail = 1;
                        break;
                    }
                    mark_zeroed(rr[q], pg, 1);
                    for (size_t w = 0; w < PAGE / 8; w++)
                        if (((volatile uint64_t *)pp)[w]) { fail = 1; break; }
                    if (fail) printf("STALE region=%s page=%zu\n", names[rr[q]], pg);
                }
            }
            if (!fail) printf("OK calls=%ld first=%ld max_us=%ld\n", calls, first, max_us);
        } else if (!strcmp(cmd, "mmap") && got >= 2) {
            size_t n = strtoul(reg, 0, 0);
            unsigned char *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) { printf("ERR errno=%d\n", errno); continue; }
            for (size_t p = 0; p < n; p++) m[p * PAGE] = 1;
            munmap(m, n * PAGE);
            printf("OK\n");
        } else if (!strcmp(cmd, "expect") && got >= 4) {
            int r = region_by_name(reg);
            if (r < 0 || i >= npages[r] || n > 255) { printf("ERR bad region/page\n"); continue; }
            override_byte[r][i] = (int16_t)n;
            printf("OK\n");
        } else if (!strcmp(cmd, "threaddontneed") && got >= 4) {
            /* MADV_DONTNEED from a thread created now (after any merge): the pages are
             * expected zero afterwards, like "dontneed" */
            int r = region_by_name(reg);
            if (r < 0 || i + n > npages[r]) { printf("ERR bad region/page\n"); continue; }
            struct dontneed_job job = { base[r] + i * PAGE, n * PAGE, 0 };
            pthread_t th;
            pthread_create(&th, NULL, dontneed_thread, &job);
            pthread_join(th, NULL);
            if (job.err) { printf("ERR errno=%d\n", job.err); continue; }
            mark_zeroed(r, i, n);
            printf("OK\n");
        } else if (!strcmp(cmd, "fork") || (!strcmp(cmd, "forkdontneed") && got >= 4)) {
            /* forkdontneed: the child forked now (after any merge) first drops those
             * pages with MADV_DONTNEED, which must read zeros there, then checks */
            int r = -1;
            if (strcmp(cmd, "fork")) {
                r = region_by_name(reg);
                if (r < 0 || i + n > npages[r]) { printf("ERR bad region/page\n"); continue; }
            }
            int pfd[2];
            if (pipe(pfd)) { printf("ERR errno=%d\n", errno); continue; }
            fflush(stdout);
            pid_t c = fork();
            if (c < 0) { printf("ERR errno=%d\n", errno); continue; }
            if (c == 0) {
                char msg[256] = "";
                if (r >= 0 && madvise(base[r] + i * PAGE, n * PAGE, MADV_DONTNEED)) {
                    snprintf(msg, sizeof msg, "ERR errno=%d", errno);
                    if (write(pfd[1], msg, strlen(msg)) < 0) _exit(3);
                    _exit(2);
                }
                if (r >= 0) mark_zeroed(r, i, n);
                long ok = check_all(tmp, msg, sizeof msg);
                if (ok >= 0) snprintf(msg, sizeof msg, "OK pages=%ld", ok);
                if (write(pfd[1], msg, strlen(msg)) < 0) _exit(3);
                _exit(ok < 0 ? 1 : 0);
            }
            close(pfd[1]);
            report_child(c, pfd[0]);
        } else if (!strcmp(cmd, "probe") && got >= 3) {
            int r = region_by_name(reg);
            if (r < 0 || i >= npages[r]) { printf("ERR bad region/page\n"); continue; }
            fflush(stdout);
            pid_t c = fork();
            if (c < 0) { printf("ERR errno=%d\n", errno); continue; }
            if (c == 0) {
                signal(SIGSEGV, SIG_DFL);
                ((volatile unsigned char *)base[r])[i * PAGE] ^= 0x5a;
                _exit(0);
            }
            report_child(c, -1);
        } else if (!strcmp(cmd, "exec") && got >= 2) {
            fflush(stdout);
            pid_t c = fork();
            if (c < 0) { printf("ERR errno=%d\n", errno); continue; }
            if (c == 0) {
                char *args[] = {reg, NULL};
                execv(reg, args);
                _exit(127);
            }
            report_child(c, -1);
        } else if (!strcmp(cmd, "mremap") && got >= 2) {
            int r = region_by_name(reg);
            char arg[32] = "";
            if (r < 0 || sscanf(line, "%*s %*s %31s", arg) != 1) { printf("ERR bad region\n"); continue; }
            size_t old = npages[r] * PAGE;
            void *to;
            if (!strcmp(arg, "move")) {
                /* a fresh place, reserved first so MREMAP_FIXED replaces only our own mapping */
                void *dst = mmap(NULL, old, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (dst == MAP_FAILED) { printf("ERR errno=%d\n", errno); continue; }
                to = mremap(base[r], old, old, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
            } else {
                size_t want = strtoul(arg, 0, 0);
                to = mremap(base[r], old, want * PAGE, MREMAP_MAYMOVE);
                if (to != MAP_FAILED) {
                    if (want > npages[r]) resize_tables(r, want);
                    else npages[r] = want;
                }
            }
            if (to == MAP_FAILED) { printf("ERR errno=%d\n", errno); continue; }
            base[r] = to;
            printf("OK addr=%#lx\n", (unsigned long)(uintptr_t)to);
        } else if (!strcmp(cmd, "mprotect") && got >= 4) {
            int r = region_by_name(reg);
            char ps[16] = "";
            int prot = sscanf(line, "%*s %*s %*u %*u %15s", ps) == 1 ? parse_prot(ps) : -1;
            if (r < 0 || i + n > npages[r] || prot < 0) { printf("ERR bad arguments\n"); continue; }
            if (mprotect(base[r] + i * PAGE, n * PAGE, prot)) { printf("ERR errno=%d\n", errno); continue; }
            printf("OK\n");
        } else if (!strcmp(cmd, "munmap") && got >= 4) {
            int r = region_by_name(reg);
            if (r < 0 || i + n > npages[r]) { printf("ERR bad region/page\n"); continue; }
            if (munmap(base[r] + i * PAGE, n * PAGE)) { printf("ERR errno=%d\n", errno); continue; }
            for (size_t p = i; p < i + n; p++) unmapped[r][p] = 1;
            printf("OK\n");
        } else if (!strcmp(cmd, "refill") && got >= 4) {
            int r = region_by_name(reg);
            if (r < 0 || i + n > npages[r]) { printf("ERR bad region/page\n"); continue; }
            unsigned char *at = base[r] + i * PAGE;
            void *m = mmap(at, n * PAGE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (m == MAP_FAILED) { printf("ERR errno=%d\n", errno); continue; }
            for (size_t p = 0; p < n; p++) at[p * PAGE] = 0x5a;
            printf("OK\n");
        } else if (!strcmp(cmd, "madvise") && got >= 4) {
            int r = region_by_name(reg);
            char as[16] = "";
            int adv = sscanf(line, "%*s %*s %*u %*u %15s", as) == 1 ? parse_advice(as) : -1;
            if (r < 0 || i + n > npages[r] || adv < 0) { printf("ERR bad arguments\n"); continue; }
            if (madvise(base[r] + i * PAGE, n * PAGE, adv)) { printf("ERR errno=%d\n", errno); continue; }
            printf("OK\n");
        } else if (!strcmp(cmd, "brk") && got >= 2) {
            size_t k = strtoul(reg, 0, 0);
            unsigned char *old = sbrk((intptr_t)(k * PAGE));
            if (old == (void *)-1) { printf("ERR errno=%d\n", errno); continue; }
            /* fresh brk memory reads as zeros, then holds what we write */
            int bad = 0;
            for (size_t b = 0; b < k * PAGE; b++) bad |= old[b];
            for (size_t b = 0; b < k * PAGE; b++) old[b] = (unsigned char)(b * 31 + 7);
            for (size_t b = 0; b < k * PAGE; b++) bad |= old[b] != (unsigned char)(b * 31 + 7);
            if (sbrk(-(intptr_t)(k * PAGE)) == (void *)-1) { printf("ERR errno=%d\n", errno); continue; }
            printf(bad ? "ERR content\n" : "OK\n");
        } else if (!strcmp(cmd, "errors")) {
            printf("ERRORS %ld\n", anomalies);
        } else if (!strcmp(cmd, "canaries")) {
            long n = canary_count;
            printf("CANARIES %ld %s\n", n,
                   n == 0 ? "-" : canary_first_ready ? canary_first : "(being recorded)");
        } else if (!strcmp(cmd, "signal") && got >= 2 && canaries) {
            send_usr1(strtol(reg, 0, 0));
        } else if (!strcmp(cmd, "signals")) {
            printf("SIGNALS delivered=%ld\n", usr1_delivered);
        } else if (!strcmp(cmd, "crash")) {
            abort();
        } else if (!strcmp(cmd, "quit")) {
            break;
        } else {
            printf("ERR unknown command\n");
        }
    }
    stop_flag = 1;
    return anomalies || canary_count ? 3 : 0;
}
