/* procksm cow observer: what the BPF side (cow.bpf.c) and procksm/observe/ share.
 *
 * procksm/observe/cow_header.py mirrors these numbers (EV_*, C_*, the event layout); a
 * test reads this file and checks that they agree, so change both together.
 */
#ifndef PROCKSM_COW_H
#define PROCKSM_COW_H

/* One merged-range entry covers a 2 MiB region: 512 pages, one bit each (1 = a merged
 * page whose first write has not been seen yet). */
#define PROCKSM_REGION_SHIFT 21
#define PROCKSM_REGION_WORDS 8

/* A one-hash Bloom filter over the 64 KiB chunks (of all targets) that hold armed
 * pages: bit (((address >> SHIFT) * MULT) mod 2^64) >> (64 - BITS). Checked first, from
 * the fault address alone: a fault anywhere else costs no helper call and no hash
 * lookup. Chunks, not regions: a target's own fresh memory often lies in the same 2 MiB
 * region as its merged pages (mmap places new mappings next to old ones). */
#define PROCKSM_BLOOM_SHIFT 16
#define PROCKSM_BLOOM_BITS 21
#define PROCKSM_BLOOM_MULT 0x9E3779B97F4A7C15ULL

/* Event kinds. */
#define EV_COW_USER 1        /* write fault from user mode on an armed merged page */
#define EV_COW_KERNEL 2      /* write fault from kernel mode (copy_to_user, e.g. read()) */
#define EV_FORK 3            /* aux = child pid (a new process, not a thread) */
#define EV_EXEC 4            /* aux = old pid (tid of the thread that called execve) */
#define EV_EXIT 5            /* the whole thread group is gone */

/* Per-CPU counters (index into the `totals` array). */
#define C_COW_USER 0
#define C_COW_KERNEL 1
#define C_LIFECYCLE 2
#define C_LOST 3   /* events the ring (or perf) buffer had no room for */
#define C_STALE 4  /* write faults on regions of a target that exec'd, not yet dropped */
#define C_NR 5

/* Settings (index into the `config` array). */
#define CFG_FOLLOW_CHILDREN 0
#define CFG_NR 1

/* 32 bytes, no padding: cow_header.EVENT_FORMAT = "<QIIIIQ". */
struct procksm_event {
    __u64 ts_ns;
    __u32 kind;
    __u32 tgid;
    __u32 tid;
    __u32 aux;   /* fault: error_code; fork: child pid; exec: old pid */
    __u64 addr;  /* fault: the page's address */
};

struct procksm_region_key {
    __u32 tgid;
    __u32 pad;
    __u64 region; /* address >> PROCKSM_REGION_SHIFT */
};

struct procksm_region_bits {
    __u64 bits[PROCKSM_REGION_WORDS];
};

#endif
