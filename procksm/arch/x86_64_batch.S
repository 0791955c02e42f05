/*
 * procksm's call routine: runs a table of system calls in a stopped thread in one go
 * (procksm.arch.x86_64_batch describes the table; procksm.attach.call_batch runs it).
 * The bytes procksm maps in a target are in procksm/arch/x86_64_batch.py; a test
 * assembles this file and compares (tests/unit/test_call_batch.py).
 *
 * In:  rdi = first entry, rsi = number of entries, rdx = the header (done word, then
 *      the park's timespec); rsp = the thread's chain of frames (procksm.attach.return_frames).
 * Entry (10 quadwords): flags, nr, a0..a5, expect, result (preset to NOT_RUN).
 * Flags: 1 EXPECT (abort the rest unless result == expect), 2 ALWAYS (run after an
 *      abort too), 4 ARG_FROM (argument slot bits 4-7 := result of entry bits 8-23;
 *      skipped when that result is negative: failed or not run), 8 LOAD (no system
 *      call: result := the quadword at a0), 1<<24 EQUAL (no system call: result := a3
 *      if the a2 bytes at a0 and at a1 are equal, else -EBADMSG), 1<<25 ZERO (no system
 *      call: result := a1 if the a1 bytes at a0 are all zero, else -EBADMSG). EQUAL
 *      and ZERO lengths are a positive multiple of 32.
 * Out: every entry's result; header.done = 1, and a FUTEX_WAKE on it (not private:
 *      procksm waits on the same word in its own MAP_SHARED mapping of the page; with
 *      nobody waiting, e.g. procksm dead, it wakes nobody and its result is ignored);
 *      then ppoll(NULL, 0, &park, NULL, 8) parks the thread where procksm interrupts it.
 *      If procksm is dead, the park times out and `ret` leads through the thread's
 *      frames back to its own state. No rt_sigreturn runs before the park: it would
 *      reset the thread's restart block.
 */
	.intel_syntax noprefix
	.text
	.globl	procksm_batch
procksm_batch:
	mov	r12, rdi
	mov	r13, rsi
	mov	r14, rdx
	mov	rbp, rdi
	xor	r15d, r15d		/* aborted */
.Lnext:
	test	r13, r13
	jz	.Lfinish
	mov	rbx, [r12]
	test	r15, r15
	jz	.Lrun
	test	ebx, 2
	jz	.Ladvance
.Lrun:
	test	ebx, 4
	jz	.Largs
	mov	ecx, ebx
	shr	ecx, 8
	and	ecx, 0xffff
	imul	rcx, rcx, 80
	mov	rax, [rbp + rcx + 72]
	test	rax, rax
	js	.Ladvance
	mov	ecx, ebx
	shr	ecx, 4
	and	ecx, 15
	mov	[r12 + rcx*8 + 16], rax
.Largs:
	test	ebx, 0x3000000
	jnz	.Lcompare
	test	ebx, 8
	jz	.Lsyscall
	mov	rax, [r12 + 16]
	mov	rax, [rax]
	jmp	.Lgot
.Lsyscall:
	mov	rax, [r12 + 8]
	mov	rdi, [r12 + 16]
	mov	rsi, [r12 + 24]
	mov	rdx, [r12 + 32]
	mov	r10, [r12 + 40]
	mov	r8, [r12 + 48]
	mov	r9, [r12 + 56]
	syscall
.Lgot:
	mov	[r12 + 72], rax
	test	ebx, 1
	jz	.Ladvance
	cmp	rax, [r12 + 64]
	je	.Ladvance
	mov	r15d, 1
.Ladvance:
	add	r12, 80
	dec	r13
	jmp	.Lnext
.Lfinish:
	mov	qword ptr [r14], 1
	mov	rdi, r14
	mov	esi, 1			/* FUTEX_WAKE */
	mov	edx, 1
	mov	eax, 202		/* futex */
.Lwake:
	syscall
	lea	rdx, [r14 + 8]
	xor	edi, edi
	xor	esi, esi
	xor	r10d, r10d
	mov	r8d, 8
	mov	eax, 271		/* ppoll */
.Lpark:
	syscall
	ret
/* EQUAL, ZERO: the bytes are read in 32-byte steps, four quadwords xor-ed and or-ed */
.Lcompare:
	mov	rsi, [r12 + 16]
	test	ebx, 0x1000000
	jz	.Lzero
	mov	rdi, [r12 + 24]
	mov	rcx, [r12 + 32]
.Lequal_loop:
	mov	rax, [rsi]
	xor	rax, [rdi]
	mov	rdx, [rsi + 8]
	xor	rdx, [rdi + 8]
	or	rax, rdx
	mov	rdx, [rsi + 16]
	xor	rdx, [rdi + 16]
	or	rax, rdx
	mov	rdx, [rsi + 24]
	xor	rdx, [rdi + 24]
	or	rax, rdx
	jnz	.Lunequal
	add	rsi, 32
	add	rdi, 32
	sub	rcx, 32
	ja	.Lequal_loop
	mov	rax, [r12 + 40]
	jmp	.Lgot
.Lzero:
	mov	rcx, [r12 + 24]
.Lzero_loop:
	mov	rax, [rsi]
	or	rax, [rsi + 8]
	or	rax, [rsi + 16]
	or	rax, [rsi + 24]
	jnz	.Lunequal
	add	rsi, 32
	sub	rcx, 32
	ja	.Lzero_loop
	mov	rax, [r12 + 24]
	jmp	.Lgot
.Lunequal:
	mov	rax, -74		/* -EBADMSG */
	jmp	.Lgot
	.globl	procksm_batch_park
	.set	procksm_batch_park, .Lpark - procksm_batch
	.globl	procksm_batch_wake
	.set	procksm_batch_wake, .Lwake - procksm_batch
