//! Where things live in the guest's physical address space.
//!
//! ```text
//! 0x0000_0500  GDT used to enter long mode (or the PVH entry)
//! 0x0000_6000  PVH start info, module list and memory map (vmlinux with a PVH note)
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  page tables: PML4, PDPT, 4 page directories (4 GiB of 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of low RAM (EBDA and the BIOS area are reserved)
//! 0x000e_0000  ACPI: RSDP, XSDT, FADT, MADT, DSDT (where Linux scans for the RSDP)
//! 0x0010_0000  bzImage protected-mode kernel (vmlinux: where its ELF says)
//!   …          initramfs at the top of low RAM
//! 0xc000_0000  PCI MMIO window (BARs), up to 0xfec0_0000
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 local APIC (in-kernel)
//! 4 GiB        RAM above the hole
//! ```

/// The boot GDT.
pub const GDT: u64 = 0x500;
/// The PVH `hvm_start_info` handed to a PVH entry in `ebx`.
pub const PVH_INFO: u64 = 0x6000;
/// The PVH module list (the initramfs).
pub const PVH_MODLIST: u64 = 0x6040;
/// The PVH memory map.
pub const PVH_MEMMAP: u64 = 0x6080;
// The start info (56 bytes), one module entry (32) and a memory map of up
// to 128 entries (24 each) fit between them and the zero page.
const _: () = assert!(PVH_INFO + 56 <= PVH_MODLIST);
const _: () = assert!(PVH_MODLIST + 32 <= PVH_MEMMAP);
const _: () = assert!(PVH_MEMMAP + 24 * 128 <= ZERO_PAGE);
/// The zero page handed to Linux in `rsi`.
pub const ZERO_PAGE: u64 = 0x7000;
/// The boot stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The top-level page table.
pub const PML4: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// The first of four page directories.
pub const PD: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// The longest command line vmshift passes (the kernel's own limit is in
/// its setup header).
pub const CMDLINE_MAX: usize = 0x10000;
/// End of the usable low RAM (start of the EBDA).
pub const LOW_RAM_END: u64 = 0x9fc00;
/// Start of the ACPI tables (the RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where high memory starts; a bzImage's kernel goes here.
pub const HIMEM: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole below 4 GiB; RAM stops here.
pub const MMIO_HOLE: u64 = 0xc000_0000;
/// Start of the PCI BAR window.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// End of the PCI BAR window.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// The IOAPIC.
pub const IOAPIC: u64 = 0xfec0_0000;
/// The local APIC.
pub const LAPIC: u64 = 0xfee0_0000;
/// 4 GiB: RAM beyond the hole continues here.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// The KVM TSS (three pages, Intel only) and the identity map page sit
/// just below the BIOS ROM.
pub const KVM_TSS: u64 = 0xfffb_d000;
/// The identity-map page KVM needs on Intel for real mode.
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;

/// The guest RAM ranges for `size` bytes of memory: below the hole and,
/// for what does not fit there, above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE), (FOUR_GIB, size - MMIO_HOLE)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_small_memory_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn ram_ranges_large_memory_skips_the_hole() {
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE), (FOUR_GIB, (4 << 30) - MMIO_HOLE)]
        );
    }
}
