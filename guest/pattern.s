# ferry's memory-pattern guest: one 512-byte x86 boot sector.
#
# In the spirit of QEMU's own migration test (tests/migration/i386/a-b-bootblock):
# it keeps incrementing the first byte of every 4 KiB page in a range of guest RAM,
# so that at any instant the pages hold v+1 up to some page and v after it. A checker
# that reads the RAM of a stopped guest can then prove that nothing was lost or torn.
#
# Range: [start_mib, end_mib) from the two little-endian fields at offset 0x1f0,
# patched by `ferry lab guest pattern --touch`. end_mib = 0 means "to the end of RAM",
# which the firmware reports in CMOS 0x34/0x35 (64 KiB blocks above 16 MiB).
#
# Serial output: "ferry-pattern ready\n" once the range is zeroed (the checker must not
# look before that: firmware leaves data in high RAM), then 'P' every 16 passes.
        .code16
        .globl _start
_start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x7c00, %sp
        # RAM end from CMOS
        mov $0x35, %al
        out %al, $0x70
        in $0x71, %al
        mov %al, %ah
        mov $0x34, %al
        out %al, $0x70
        in $0x71, %al
        movzwl %ax, %eax
        shl $16, %eax
        add $0x1000000, %eax
        mov %eax, ram_end
        lgdt gdtdesc
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmp $8, $pm

        .code32
pm:
        mov $16, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        # fast A20
        in $0x92, %al
        or $2, %al
        out %al, $0x92
        mov start_mib, %esi
        shl $20, %esi
        mov end_mib, %ebp
        shl $20, %ebp
        jnz 1f
        mov ram_end, %ebp
1:
        mov %esi, %eax
zero:
        movb $0, (%eax)
        add $4096, %eax
        cmp %ebp, %eax
        jb zero
        mov $msg, %ecx
        mov $0x3f8, %dx
say:
        movb (%ecx), %al
        test %al, %al
        jz counted
        out %al, %dx
        inc %ecx
        jmp say
counted:
        xor %ebx, %ebx
mainloop:
        mov %esi, %eax
inner:
        incb (%eax)
        add $4096, %eax
        cmp %ebp, %eax
        jb inner
        inc %bl
        test $0x0f, %bl
        jnz mainloop
        mov $'P', %al
        out %al, %dx
        jmp mainloop

msg:    .asciz "ferry-pattern ready\n"
ram_end: .long 0
        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdtdesc:
        .word gdtdesc - gdt - 1
        .long gdt

        .org 0x1f0
start_mib: .long 1
end_mib:   .long 0
        .org 0x1fe
        .byte 0x55, 0xaa
