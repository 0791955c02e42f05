/* Empty programs for benchmarks/fault_hooks.py: what each way of running BPF on a page
 * fault or a system call costs by itself, before any filter of procksm's. */
#include <uapi/linux/bpf_perf_event.h>

RAW_TRACEPOINT_PROBE(page_fault_user) {
    return 0;
}

RAW_TRACEPOINT_PROBE(page_fault_kernel) {
    return 0;
}

int on_perf_event(struct bpf_perf_event_data *ctx) {
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_munmap) {
    return 0;
}
