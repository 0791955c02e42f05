/* procksm cow observer (compiled and loaded with bcc by procksm/observe/bcc_loader.py, a
 * short-lived child; the daemon attaches and reads it without bcc).
 *
 * COW breaks: a write to a page that procksm merged (a MAP_PRIVATE mapping of a sealed
 * memfd) faults, and the kernel copies the page. Measured on this kernel (6.18, x86_64):
 * a user write to a present merged page faults with error_code 0x7 (present|write|user),
 * a user write to a not-present one (after MADV_DONTNEED) with 0x6, and a kernel write
 * such as read() into the page faults in `page_fault_kernel` with 0x3. Writes through
 * get_user_pages (process_vm_writev, /proc/PID/mem, O_DIRECT) COW without any fault
 * event: user space finds those in pagemap (CowObserver.reconcile).
 *
 * The filter is in the kernel: a Bloom bit for the fault's 64 KiB chunk (any target's),
 * then the tgid's target bit, then one hash lookup of (tgid, region) -> 512-bit map of
 * armed pages. A hit clears the page's bit with an atomic fetch-and, so a page counts
 * once: later writes to the now-private page, and fork COWs of pages that are not armed,
 * never reach user space. Measured with kernel.bpf_stats_enabled (2-vCPU VM, retpolines):
 * an empty program on page_fault_user runs in 51 ns per fault including the stats'
 * clock reads, the tgid check (helper call + array) adds 11 ns, the Bloom check 4 ns.
 *
 * Lifecycle: sched fork/exec/exit (and task_newtask), which run per process event.
 * There is no syscalls:* tracepoint here, deliberately: enabling any one sets
 * TIF_SYSCALL_TRACEPOINT on every task of the machine (kernel/trace/trace_syscalls.c,
 * syscall_regfunc), so every system call of every process takes the slow entry/exit
 * path; measured +34 % per getppid (169 -> 226 ns) in a process that is not a target
 * (benchmarks/bpf_overhead.py). A target's munmap/mremap/madvise/brk are found by user
 * space instead: it checks each COW break's address against the target's mappings, and
 * the periodic reconcile re-reads them (procksm/observe/target.py).
 */
#include <uapi/linux/ptrace.h>

#include "cow.h"

#ifndef PROCKSM_TGID_WORDS
#define PROCKSM_TGID_WORDS 65536 /* PID_MAX_LIMIT (4 Mi on 64-bit) / 64: any tgid fits */
#endif
#ifndef PROCKSM_MAX_REGIONS
#define PROCKSM_MAX_REGIONS 32768 /* 64 GiB of merged ranges */
#endif
#ifndef PROCKSM_RING_PAGES
#define PROCKSM_RING_PAGES 64
#endif

#define PF_WRITE 0x2UL
#define CLONE_THREAD_FLAG 0x00010000UL

/* Bit t of word t/64: tgid t is a target. Array lookups are inlined by the verifier. */
BPF_ARRAY(target_bits, u64, PROCKSM_TGID_WORDS);
/* See cow.h. Written by user space only: a bit is set before the first page of its
 * chunks is armed in `merged` and cleared after the last one was disarmed. */
BPF_ARRAY(chunk_bloom, u64, 1 << (PROCKSM_BLOOM_BITS - 6));
/* Armed merged pages. Not preallocated: its size follows the merged ranges. */
BPF_F_TABLE("hash", struct procksm_region_key, struct procksm_region_bits, merged,
            PROCKSM_MAX_REGIONS, BPF_F_NO_PREALLOC);
/* Targets that exec'd: their regions describe an address space that is gone. Set here,
 * cleared by user space once it dropped the regions. */
BPF_HASH(stale, u32, u32, 4096);
/* fork: task_newtask (which sees clone_flags) marks child pids that are processes. */
BPF_HASH(new_procs, u32, u32, 4096);

BPF_PERCPU_ARRAY(totals, u64, C_NR);
/* Settings from user space: [CFG_FOLLOW_CHILDREN] = 1 makes a target's forked child a
 * target at once, so its exec and first COW breaks are seen before user space reacts. */
BPF_ARRAY(config, u32, CFG_NR);

/* A ring buffer (5.8+), read by procksm/observe/ring_buffer.py. Kernels without one get
 * the pagemap observer: a perf buffer's reader (a ring per CPU) is not worth keeping for
 * kernels older than 5.8. */
BPF_RINGBUF_OUTPUT(events, PROCKSM_RING_PAGES);

static __always_inline void count(u32 idx) {
    u64 *c = totals.lookup(&idx);
    if (c)
        *c += 1;
}

static __always_inline int is_target(u32 tgid) {
    u32 w = tgid >> 6;
    u64 *word = target_bits.lookup(&w);
    return word && (*word & (1ULL << (tgid & 63)));
}

/* Every event wakes the reader: COW breaks, fork, exec and exit are rare and wanted at
 * once (BPF_RB_* flags 0: adaptive, wake only a reader that has caught up). */
static __always_inline void emit(struct procksm_event *e) {
    e->ts_ns = bpf_ktime_get_ns();
    if (events.ringbuf_output(e, sizeof(*e), 0) < 0)
        count(C_LOST);
}

static __always_inline int on_fault(unsigned long addr, unsigned long err, u32 kind) {
    if (!(err & PF_WRITE))
        return 0;
    u32 h = ((addr >> PROCKSM_BLOOM_SHIFT) * PROCKSM_BLOOM_MULT) >> (64 - PROCKSM_BLOOM_BITS);
    u32 hw = h >> 6;
    u64 *bloom = chunk_bloom.lookup(&hw);
    if (!bloom || !(*bloom & (1ULL << (h & 63))))
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    struct procksm_region_key key = {};
    key.tgid = tgid;
    key.region = addr >> PROCKSM_REGION_SHIFT;
    struct procksm_region_bits *b = merged.lookup(&key);
    if (!b)
        return 0;
    u32 page = (addr >> 12) & 511;
    u64 mask = 1ULL << (page & 63);
    u64 *word = &b->bits[(page >> 6) & 7];
    /* Most faults here are on pages that are not armed (fresh memory next to a merged
     * range, private copies): a plain load first keeps the atomic (and the stale lookup
     * below) off their path. */
    if (!(*word & mask))
        return 0;
    if (stale.lookup(&tgid)) {
        count(C_STALE);
        return 0;
    }
    /* Two threads may fault on the same page at once: the one that clears the bit counts. */
    u64 old = __sync_fetch_and_and(word, ~mask);
    if (!(old & mask))
        return 0;
    count(kind == EV_COW_USER ? C_COW_USER : C_COW_KERNEL);
    struct procksm_event e = {};
    e.kind = kind;
    e.tgid = tgid;
    e.tid = (u32)pid_tgid;
    e.aux = (u32)err;
    e.addr = addr & ~4095UL;
    emit(&e);
    return 0;
}

/* Raw tracepoints: TP_PROTO(unsigned long address, struct pt_regs *regs,
 * unsigned long error_code). No record is built for them, unlike perf tracepoints:
 * they are on the path of every page fault of the machine. */
RAW_TRACEPOINT_PROBE(page_fault_user) {
    return on_fault(ctx->args[0], ctx->args[2], EV_COW_USER);
}

RAW_TRACEPOINT_PROBE(page_fault_kernel) {
    return on_fault(ctx->args[0], ctx->args[2], EV_COW_KERNEL);
}

/* --- lifecycle --- */

static __always_inline u32 current_tgid(void) {
    return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline void lifecycle(u32 kind, u32 tgid, u32 aux) {
    struct procksm_event e = {};
    e.kind = kind;
    e.tgid = tgid;
    e.tid = (u32)bpf_get_current_pid_tgid();
    e.aux = aux;
    count(C_LIFECYCLE);
    emit(&e);
}

TRACEPOINT_PROBE(task, task_newtask) {
    u32 tgid = current_tgid();
    if (!is_target(tgid) || (args->clone_flags & CLONE_THREAD_FLAG))
        return 0;
    u32 child = args->pid, one = 1;
    new_procs.update(&child, &one);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 child = args->child_pid;
    /* only children that task_newtask saw as processes of a target */
    if (!new_procs.lookup(&child))
        return 0;
    new_procs.delete(&child);
    u32 cfg = CFG_FOLLOW_CHILDREN;
    u32 *follow = config.lookup(&cfg);
    if (follow && *follow) {
        u32 w = child >> 6;
        u64 *word = target_bits.lookup(&w);
        if (word)
            __sync_fetch_and_or(word, 1ULL << (child & 63));
    }
    lifecycle(EV_FORK, current_tgid(), child);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = current_tgid();
    if (!is_target(tgid))
        return 0;
    u32 one = 1;
    stale.update(&tgid, &one);
    lifecycle(EV_EXEC, tgid, args->old_pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u32 tgid = current_tgid();
    if (!args->group_dead || !is_target(tgid))
        return 0;
    /* the tgid may be reused by an unrelated process: stop filtering for it now */
    u32 w = tgid >> 6;
    u64 *word = target_bits.lookup(&w);
    if (word)
        __sync_fetch_and_and(word, ~(1ULL << (tgid & 63)));
    lifecycle(EV_EXIT, tgid, 0);
    return 0;
}
