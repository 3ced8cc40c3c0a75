/*
 * ferry's KVM guest: a 32-bit protected-mode program that dirties its
 * memory at the pace the runner sets, and can verify every page it wrote.
 *
 * Build (needs GNU binutils; the result is checked in as guest.bin):
 *     make guest
 * which runs
 *     as --32 -o guest.o guest.S && objcopy -O binary guest.o guest.bin
 *
 * The runner loads guest.bin at CODE (0x1000), sets flat 32-bit segments,
 * EIP = CODE, ESP = STACK_TOP, and fills the mailbox at page 0.
 *
 * Guest-physical layout (all addresses absolute, paging off):
 *   0x0000  mailbox: MAGIC, WS_PAGES, DATA_START, LCG, WRITES, RESULT, BAD
 *   0x1000  this code
 *   0x8000  the version table: one u32 per working-set page (grows up);
 *           the stack grows down from 0x8000
 *   DATA_START << 12: the working set, WS_PAGES pages
 *
 * Page i of the working set at version v holds i XOR (v * 0x9E3779B9) in
 * its first and its last word; version 0 is a page never written (zero).
 * Two words, not the whole page: on this machine kind the guest's code is
 * emulated instruction by instruction (nested KVM, no paging), so every
 * instruction counts; the first and last word still catch a page that was
 * not copied, or copied from the wrong version.  The table and the
 * mailbox live in guest RAM, so they migrate with it.
 *
 * I/O ports (the runner answers them):
 *   in  0x10  -> a command: N > 0: write N pages; 0: nothing now, ask again;
 *               0xFFFFFFFF: verify every page, then report on port 0x11
 *   out 0x11  <- the verification result: 0 ok, 1 bad page (index in BAD),
 *               2 versions do not add up to WRITES
 */

        .code32
        .set MAGIC,      0x0000
        .set WS_PAGES,   0x0004
        .set DATA_START, 0x0008
        .set LCG,        0x000c
        .set WRITES,     0x0010
        .set RESULT,     0x0014
        .set BAD,        0x0018
        .set TABLE,      0x8000
        .set STACK_TOP,  0x8000
        .set PORT_COMMAND, 0x10
        .set PORT_RESULT,  0x11
        .set VERIFY,     0xffffffff
        .set GOLDEN,     0x9e3779b9
        .set LAST_WORD,  4092

start:
        mov     $STACK_TOP, %esp

next_command:
        in      $PORT_COMMAND, %eax
        cmp     $VERIFY, %eax
        je      verify
        mov     %eax, %ecx
        test    %ecx, %ecx
        jz      next_command

write_one_page:
        /* LCG step: the page sequence is a function of the state in RAM */
        mov     LCG, %eax
        imul    $1103515245, %eax, %eax
        add     $12345, %eax
        mov     %eax, LCG
        shr     $8, %eax
        xor     %edx, %edx
        divl    WS_PAGES                /* edx = page index in the working set */
        mov     TABLE(,%edx,4), %eax
        inc     %eax
        mov     %eax, TABLE(,%edx,4)    /* its new version */
        imul    $GOLDEN, %eax, %eax
        xor     %edx, %eax              /* the word that fills the page */
        mov     %edx, %edi
        add     DATA_START, %edi
        shl     $12, %edi
        mov     %eax, (%edi)                /* the page's first word... */
        mov     %eax, LAST_WORD(%edi)       /* ...and its last */
        incl    WRITES
        dec     %ecx
        jnz     write_one_page
        jmp     next_command

verify:
        xor     %esi, %esi              /* page index */
        xor     %ebx, %ebx              /* sum of versions */
verify_page:
        cmp     WS_PAGES, %esi
        jae     verify_sum
        mov     TABLE(,%esi,4), %eax
        add     %eax, %ebx
        test    %eax, %eax
        jz      expect_zero
        imul    $GOLDEN, %eax, %eax
        xor     %esi, %eax
        jmp     scan_page
expect_zero:
        xor     %eax, %eax
scan_page:
        mov     %esi, %edi
        add     DATA_START, %edi
        shl     $12, %edi
        cmp     %eax, (%edi)
        jne     bad_page
        cmp     %eax, LAST_WORD(%edi)
        jne     bad_page
        inc     %esi
        jmp     verify_page
bad_page:
        mov     %esi, BAD
        movl    $1, RESULT
        jmp     report
verify_sum:
        cmp     WRITES, %ebx
        jne     bad_sum
        movl    $0, RESULT
        jmp     report
bad_sum:
        movl    $2, RESULT
report:
        mov     RESULT, %eax
        out     %eax, $PORT_RESULT
        jmp     next_command
