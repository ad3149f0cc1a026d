//! The probe guest: a freestanding program (no Linux) that vmshift-kvm
//! boots in place of a kernel to test itself and vmshift's disk drivers on
//! any /dev/kvm. It finds each virtio-blk device on PCI bus 0, sets it up
//! through the modern virtio-pci registers, reads by polling (no
//! interrupts), prints the partition table and the first partition's file
//! system superblock to COM1, and resets through the i8042.
//!
//! Built by crates/kvm/build.rs with the host's rustc (`#![no_std]`,
//! panic=abort, static, linked at 2 MiB by probe.ld); not a workspace
//! member. Every line it prints starts with "VMSHIFT-PROBE".

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};

// Entry: enable SSE (the compiler uses it), take our own stack, run.
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "mov rax, cr0",
    "and rax, ~4",
    "or rax, 2",
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, 0x600",
    "mov cr4, rax",
    "lea rsp, [rip + {stack} + 65536]",
    "call {main}",
    "2: hlt",
    "jmp 2b",
    stack = sym STACK,
    main = sym probe_main,
);

#[repr(align(16))]
#[allow(dead_code)] // only its address is used
struct Stack([u8; 65536]);
static mut STACK: Stack = Stack([0; 65536]);

// --- port I/O, serial, reset ----------------------------------------------

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O in a guest the VMM fully emulates.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v) };
}
fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v) };
}
fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v) };
    v
}

fn putc(c: u8) {
    outb(0x3f8, c);
}
fn puts(s: &str) {
    for b in s.bytes() {
        putc(b);
    }
}
fn hex(v: u64, digits: u32) {
    puts("0x");
    hex_digits(v, digits);
}
fn hex_digits(v: u64, digits: u32) {
    for i in (0..digits).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}
fn dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for b in &buf[i..] {
        putc(*b);
    }
}
fn line(s: &str) {
    puts("VMSHIFT-PROBE ");
    puts(s);
}

fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting is always safe.
        unsafe { asm!("hlt") };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    line("error panic\n");
    reset()
}

// The host's libcore is built for unwinding and names this symbol; the
// probe never unwinds (panic=abort), so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

// The compiler's calls for block copies (core has no libc here).
#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller's contract; volatile keeps LLVM from turning
        // the loop back into a memcpy call.
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
    }
    d
}
#[no_mangle]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) < (s as usize) {
        // SAFETY: the caller's contract.
        unsafe { memcpy(d, s, n) }
    } else {
        for i in (0..n).rev() {
            // SAFETY: the caller's contract.
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
        d
    }
}
#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller's contract.
        unsafe { write_volatile(d.add(i), c as u8) };
    }
    d
}
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { memcmp(a, b, n) }
}

// --- PCI ------------------------------------------------------------------

fn cfg_read(slot: u32, reg: u32) -> u32 {
    outl(0xcf8, 0x8000_0000 | (slot << 11) | (reg & 0xfc));
    inl(0xcfc)
}
fn cfg_write(slot: u32, reg: u32, v: u32) {
    outl(0xcf8, 0x8000_0000 | (slot << 11) | (reg & 0xfc));
    outl(0xcfc, v);
}
fn cfg_byte(slot: u32, reg: u32) -> u8 {
    (cfg_read(slot, reg) >> ((reg & 3) * 8)) as u8
}

fn mmio_r32(a: u64) -> u32 {
    // SAFETY: `a` is inside a BAR the VMM decodes.
    unsafe { read_volatile(a as *const u32) }
}
fn mmio_w32(a: u64, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u32, v) }
}
fn mmio_w16(a: u64, v: u16) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u16, v) }
}
fn mmio_r16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u16) }
}
fn mmio_w8(a: u64, v: u8) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u8, v) }
}
fn mmio_r8(a: u64) -> u8 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u8) }
}

// --- virtio-blk by polling --------------------------------------------------

const QSIZE: usize = 16;

#[repr(C, align(4096))]
struct Ring {
    desc: [[u64; 2]; QSIZE],
    avail: [u16; 3 + QSIZE],
    _pad: [u8; 4096 - 16 * QSIZE - 2 * (3 + QSIZE)],
    used: [u32; 1 + 2 * QSIZE + 1],
}
static mut RING: Ring = Ring {
    desc: [[0; 2]; QSIZE],
    avail: [0; 3 + QSIZE],
    _pad: [0; 4096 - 16 * QSIZE - 2 * (3 + QSIZE)],
    used: [0; 1 + 2 * QSIZE + 1],
};
#[repr(C, align(4096))]
struct Buffers {
    header: [u8; 16],
    status: [u8; 16],
    data: [u8; 4096],
}
static mut BUF: Buffers = Buffers {
    header: [0; 16],
    status: [0; 16],
    data: [0; 4096],
};

struct Blk {
    notify: u64,
    device: u64,
    next: u16,
}

impl Blk {
    /// Finds the virtio structures in the capability list and brings the
    /// device up with queue 0.
    fn new(slot: u32) -> Option<Blk> {
        cfg_write(slot, 4, cfg_read(slot, 4) | 0x6);
        let bar = u64::from(cfg_read(slot, 0x10) & !0xf);
        let (mut common, mut notify, mut device) = (0, 0, 0);
        let mut p = u32::from(cfg_byte(slot, 0x34));
        let mut guard = 0;
        while p != 0 && guard < 48 {
            if cfg_byte(slot, p) == 0x09 {
                let kind = cfg_byte(slot, p + 3);
                let off = u64::from(cfg_read(slot, p + 8));
                match kind {
                    1 => common = bar + off,
                    2 => notify = bar + off,
                    4 => device = bar + off,
                    _ => {}
                }
            }
            p = u32::from(cfg_byte(slot, p + 1));
            guard += 1;
        }
        if common == 0 || notify == 0 || device == 0 {
            return None;
        }
        mmio_w8(common + 0x14, 0);
        mmio_w8(common + 0x14, 1 | 2);
        mmio_w32(common + 0x08, 1);
        mmio_w32(common + 0x0c, 1); // VERSION_1
        mmio_w8(common + 0x14, 1 | 2 | 8);
        if mmio_r8(common + 0x14) & 8 == 0 {
            return None;
        }
        mmio_w16(common + 0x16, 0);
        mmio_w16(common + 0x18, QSIZE as u16);
        let ring = &raw const RING as u64;
        let avail = ring + 16 * QSIZE as u64;
        let used = ring + 4096;
        for (reg, v) in [(0x20, ring), (0x28, avail), (0x30, used)] {
            mmio_w32(common + reg, v as u32);
            mmio_w32(common + reg + 4, (v >> 32) as u32);
        }
        mmio_w16(common + 0x1c, 1);
        if mmio_r16(common + 0x1c) != 1 {
            return None;
        }
        mmio_w8(common + 0x14, 1 | 2 | 8 | 4);
        Some(Blk {
            notify,
            device,
            next: 0,
        })
    }

    fn capacity(&self) -> u64 {
        u64::from(mmio_r32(self.device)) | (u64::from(mmio_r32(self.device + 4)) << 32)
    }

    /// Reads `len` (≤ 4096) bytes at `sector` into BUF.data; the status.
    fn read(&mut self, sector: u64, len: u32) -> u8 {
        let b = &raw mut BUF;
        // SAFETY: one vCPU, no interrupts: nothing else touches the
        // buffers and rings while the request is built and polled.
        unsafe {
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            write_volatile(&raw mut (*b).header, h);
            write_volatile(&raw mut (*b).status[0], 0xff);
            let r = &raw mut RING;
            let hdr = &raw const (*b).header as u64;
            let data = &raw const (*b).data as u64;
            let st = &raw const (*b).status as u64;
            (*r).desc[0] = [hdr, 16 | (1 << 32) | (1 << 48)];
            (*r).desc[1] = [data, u64::from(len) | ((1 | 2) << 32) | (2 << 48)];
            (*r).desc[2] = [st, 1 | (2 << 32)];
            let slot = 2 + usize::from(self.next) % QSIZE;
            write_volatile(&raw mut (*r).avail[slot], 0);
            self.next = self.next.wrapping_add(1);
            write_volatile(&raw mut (*r).avail[1], self.next);
            mmio_w16(self.notify, 0);
            let used_idx = &raw const (*r).used[0];
            let mut spins = 0u64;
            while (read_volatile(used_idx) >> 16) as u16 != self.next {
                spins += 1;
                if spins > 200_000_000 {
                    return 0xfe;
                }
                core::hint::spin_loop();
            }
            read_volatile(&raw const (*b).status[0])
        }
    }
}

fn data() -> &'static [u8; 4096] {
    // SAFETY: read after the request completed; see Blk::read.
    unsafe { &*(&raw const BUF.data) }
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) | (le32(b, at + 4) << 32)
}

/// Reads and prints what one disk holds. False on a read error.
fn probe_disk(slot: u32, blk: &mut Blk) -> bool {
    line("disk 00:");
    hex_digits(u64::from(slot), 2);
    puts(".0 virtio-blk sectors ");
    dec(blk.capacity());
    puts("\n");
    let fail = |what: &str, st: u8| {
        line("error ");
        puts(what);
        puts(" status ");
        dec(u64::from(st));
        puts("\n");
        false
    };
    let st = blk.read(0, 512);
    if st != 0 {
        return fail("reading the MBR", st);
    }
    let mbr = *data();
    if mbr[510] != 0x55 || mbr[511] != 0xaa {
        line("table none\n");
        return true;
    }
    let mut first: Option<u64> = None;
    if mbr[446 + 4] == 0xee {
        let st = blk.read(1, 512);
        if st != 0 {
            return fail("reading the GPT header", st);
        }
        let h = *data();
        if &h[0..8] != b"EFI PART" {
            line("table gpt-damaged\n");
            return true;
        }
        let entries = le64(&h, 72);
        let count = le32(&h, 80).min(128);
        let esize = le32(&h, 84);
        if !(128..=512).contains(&esize) || esize % 8 != 0 {
            line("table gpt-bad-entry-size\n");
            return true;
        }
        line("table gpt entries ");
        dec(count);
        puts("\n");
        let per = 512 / esize;
        for i in 0..count {
            if i % per == 0 {
                let st = blk.read(entries + i / per, 512);
                if st != 0 {
                    return fail("reading GPT entries", st);
                }
            }
            let d = *data();
            let e = ((i % per) * esize) as usize;
            if d[e..e + 16].iter().all(|b| *b == 0) {
                continue;
            }
            let start = le64(&d, e + 32);
            let end = le64(&d, e + 40);
            line("part ");
            dec(i + 1);
            puts(" start ");
            dec(start);
            puts(" sectors ");
            dec(end.saturating_sub(start) + 1);
            puts("\n");
            first.get_or_insert(start);
        }
    } else {
        line("table mbr signature ");
        hex(le32(&mbr, 440), 8);
        puts("\n");
        for i in 0..4 {
            let e = 446 + 16 * i;
            let kind = mbr[e + 4];
            if kind == 0 {
                continue;
            }
            let start = le32(&mbr, e + 8);
            line("part ");
            dec(i as u64 + 1);
            puts(" type ");
            hex(u64::from(kind), 2);
            puts(" start ");
            dec(start);
            puts(" sectors ");
            dec(le32(&mbr, e + 12));
            puts("\n");
            first.get_or_insert(start);
        }
    }
    let Some(start) = first else {
        return true;
    };
    // Enough of the partition's start for ext's superblock (at 1024), XFS
    // (at 0) and NTFS/FAT (the boot sector).
    let st = blk.read(start, 4096);
    if st != 0 {
        return fail("reading the first partition", st);
    }
    let d = *data();
    line("fs ");
    if d[1024 + 56] == 0x53 && d[1024 + 57] == 0xef {
        puts("ext magic 0xef53 blocks ");
        dec(le32(&d, 1024 + 4));
        puts(" uuid ");
        for (i, b) in d[1024 + 104..1024 + 120].iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                putc(b'-');
            }
            let s = [b >> 4, b & 0xf];
            for n in s {
                putc(if n < 10 { b'0' + n } else { b'a' + n - 10 });
            }
        }
    } else if &d[0..4] == b"XFSB" {
        puts("xfs");
    } else if &d[3..11] == b"NTFS    " {
        puts("ntfs");
    } else if &d[82..87] == b"FAT32" || &d[54..57] == b"FAT" {
        puts("fat");
    } else {
        puts("unknown first bytes ");
        hex(le64(&d, 0), 16);
    }
    puts("\n");
    true
}

#[no_mangle]
extern "C" fn probe_main() -> ! {
    line("start\n");
    let mut disks = 0;
    let mut ok = true;
    for slot in 1..32u32 {
        let id = cfg_read(slot, 0);
        if id != 0x1042_1af4 {
            continue;
        }
        disks += 1;
        match Blk::new(slot) {
            Some(mut blk) => ok &= probe_disk(slot, &mut blk),
            None => {
                line("error virtio setup refused\n");
                ok = false;
            }
        }
    }
    if disks == 0 {
        line("error no virtio-blk device\n");
        ok = false;
    }
    line(if ok { "done\n" } else { "failed\n" });
    reset()
}
