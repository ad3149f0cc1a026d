//! Linux direct boot: the kernel (bzImage or ELF vmlinux), the initramfs,
//! the command line, the zero page with its e820 map, and the page tables
//! and GDT the 64-bit entry point expects (Documentation/arch/x86/boot.rst,
//! "64-bit BOOT PROTOCOL"). An ELF vmlinux with a PVH note
//! (`XEN_ELFNOTE_PHYS32_ENTRY`, Linux's `CONFIG_PVH`) is entered there
//! instead, in 32-bit protected mode with an `hvm_start_info` in `ebx`
//! (Xen's `arch-x86/hvm/start_info.h`, the protocol QEMU and Firecracker
//! use for `vmlinux`).

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::error::{Error, Result};
use crate::layout;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `XLF_KERNEL_64`: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// `LOADED_HIGH | CAN_USE_HEAP` in `loadflags`.
const LOADFLAGS: u8 = 0x01 | 0x80;
/// The "HdrS" magic of the setup header.
const HDRS: u32 = 0x5372_6448;
/// `type_of_loader` for a loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux's 64-bit entry: long mode, identity paging, the zero page in
    /// `rsi`.
    Linux64(u64),
    /// The PVH entry of an ELF vmlinux: 32-bit protected mode without
    /// paging, the `hvm_start_info` in `ebx`.
    Pvh(u64),
}

impl Entry {
    /// The protocol's name, as reports say it.
    pub fn protocol(&self) -> &'static str {
        match self {
            Entry::Linux64(_) => "64-bit boot protocol",
            Entry::Pvh(_) => "PVH",
        }
    }
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where and how the boot vCPU starts.
    pub entry: Entry,
    /// The first byte after the kernel image.
    pub end: u64,
    /// The setup header to copy into the zero page.
    pub header: linux_loader::loader::bootparam::setup_header,
}

/// A kernel or initramfs in memory, with the name messages use.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Where it came from (a path, or a path inside the guest).
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Blob {
    /// Reads a file.
    pub fn read(path: &std::path::Path) -> Result<Blob> {
        let data = std::fs::read(path).map_err(|e| Error::Kernel {
            name: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        Ok(Blob {
            name: path.display().to_string(),
            data,
        })
    }
}

/// Loads a bzImage or an uncompressed ELF `vmlinux` (told apart by the ELF
/// magic).
pub fn load_kernel(mem: &GuestMemoryMmap, blob: &Blob) -> Result<LoadedKernel> {
    let kernel_err = |msg: String| Error::Kernel {
        name: blob.name.clone(),
        msg,
    };
    let mut file = Cursor::new(&blob.data[..]);
    if blob.data.starts_with(b"\x7fELF") {
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM)))
            .map_err(|e| kernel_err(format!("not a loadable x86-64 ELF kernel: {e}")))?;
        let mut header = linux_loader::loader::bootparam::setup_header {
            boot_flag: 0xaa55,
            header: HDRS,
            kernel_alignment: 0x0100_0000,
            // An ELF kernel brings no header: allow the initramfs anywhere
            // below 2 GiB, as the kernel's own default does for 64-bit.
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2048,
            version: 0x020f,
            ..Default::default()
        };
        header.xloadflags = XLF_KERNEL_64;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Entry::Pvh(a.raw_value()),
            _ => Entry::Linux64(r.kernel_load.raw_value()),
        };
        Ok(LoadedKernel {
            entry,
            end: r.kernel_end,
            header,
        })
    } else {
        // At 1 MiB whatever the file's own code32_start says.
        let r = BzImage::load(
            mem,
            Some(GuestAddress(layout::HIMEM)),
            &mut file,
            Some(GuestAddress(layout::HIMEM)),
        )
        .map_err(|e| kernel_err(format!("not a bzImage or ELF kernel: {e}")))?;
        let header = r
            .setup_header
            .ok_or_else(|| kernel_err("the bzImage has no setup header".into()))?;
        let version = header.version;
        let xloadflags = header.xloadflags;
        if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(kernel_err(format!(
                "boot protocol {}.{:02} without a 64-bit entry point; vmshift boots x86-64 kernels with protocol 2.12 or later",
                version >> 8,
                version & 0xff
            )));
        }
        // The decompressor works in [load, load + init_size) (and at
        // pref_address when it relocates itself there): nothing may lie
        // below the end of either.
        let load = r.kernel_load.raw_value();
        let init_end = load + u64::from(header.init_size);
        let pref_end = header
            .pref_address
            .saturating_add(u64::from(header.init_size));
        Ok(LoadedKernel {
            entry: Entry::Linux64(load + 0x200),
            end: r.kernel_end.max(init_end).max(pref_end),
            header,
        })
    }
}

/// Places the initramfs as high as the kernel allows, below the MMIO hole
/// and above the kernel. Returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    blob: &Blob,
    kernel: &LoadedKernel,
) -> Result<(u64, u64)> {
    let data = &blob.data;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= layout::MMIO_HOLE)
        .max()
        .unwrap_or(0);
    let max = u64::from(kernel.header.initrd_addr_max).saturating_add(1);
    let top = low_end.min(max);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(a) if a >= kernel.end => {
            mem.write_slice(data, GuestAddress(a))
                .map_err(|e| Error::Memory(format!("writing the initramfs at {a:#x}: {e}")))?;
            Ok((a, size))
        }
        _ => Err(Error::Kernel {
            name: blob.name.clone(),
            msg: format!(
                "the initramfs ({} MiB) does not fit in guest memory between the kernel and {top:#x}; give the VM more memory (--memory)",
                size >> 20
            ),
        }),
    }
}

/// The e820 map for guest RAM of `size` bytes: low RAM, the reserved BIOS
/// area holding the ACPI tables, RAM up to the MMIO hole and RAM above
/// 4 GiB.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::LOW_RAM_END, E820_RAM),
        (
            layout::LOW_RAM_END,
            layout::BIOS_END - layout::LOW_RAM_END,
            E820_RESERVED,
        ),
    ];
    for (start, len) in layout::ram_ranges(size) {
        let (start, len) = if start == 0 {
            (layout::HIMEM, len.saturating_sub(layout::HIMEM))
        } else {
            (start, len)
        };
        if len > 0 {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

/// What the zero page says besides the kernel's own header.
#[derive(Debug, Clone, Copy)]
pub struct BootParams {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Initramfs address and size.
    pub initrd: Option<(u64, u64)>,
    /// Where the RSDP is.
    pub rsdp: u64,
}

/// Builds the zero page.
pub fn zero_page(kernel: &LoadedKernel, p: &BootParams) -> boot_params {
    let mut bp = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    bp.hdr.type_of_loader = LOADER_UNDEFINED;
    bp.hdr.loadflags |= LOADFLAGS;
    bp.hdr.heap_end_ptr = 0xfe00;
    bp.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    bp.hdr.cmdline_size = p.cmdline_len as u32 + 1;
    if let Some((addr, size)) = p.initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
        bp.ext_ramdisk_image = (addr >> 32) as u32;
        bp.ext_ramdisk_size = (size >> 32) as u32;
    }
    bp.acpi_rsdp_addr = p.rsdp;
    let map = e820_map(p.mem_size);
    for (slot, (addr, size, type_)) in bp.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    bp.e820_entries = map.len() as u8;
    bp
}

/// Writes the command line, the zero page, the GDT and the page tables.
pub fn write_boot_data(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    p: &BootParams,
) -> Result<()> {
    let limit = (kernel.header.cmdline_size as usize).clamp(256, layout::CMDLINE_MAX) - 1;
    if cmdline.len() > limit {
        return Err(Error::Config(format!(
            "the kernel command line is {} bytes; this kernel takes at most {limit}",
            cmdline.len()
        )));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::Config(
            "the kernel command line contains a NUL byte".into(),
        ));
    }
    let w = |what: &str, data: &[u8], at: u64| {
        mem.write_slice(data, GuestAddress(at))
            .map_err(|e| Error::Memory(format!("writing the {what} at {at:#x}: {e}")))
    };
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    w("command line", &line, layout::CMDLINE)?;
    let bp = zero_page(kernel, p);
    mem.write_obj(bp, GuestAddress(layout::ZERO_PAGE))
        .map_err(|e| Error::Memory(format!("writing the zero page: {e}")))?;
    let gdt: Vec<u8> = match kernel.entry {
        Entry::Linux64(_) => gdt(),
        Entry::Pvh(_) => gdt_pvh(),
    }
    .iter()
    .flat_map(|e| e.to_le_bytes())
    .collect();
    w("GDT", &gdt, layout::GDT)?;
    w("page tables", &page_tables(), layout::PML4)?;
    if let Entry::Pvh(_) = kernel.entry {
        let (info, modules, map) = pvh_start_info(p);
        let modules: Vec<u8> = modules
            .iter()
            .flat_map(|m| le(&[m.paddr, m.size, m.cmdline_paddr, m.reserved]))
            .collect();
        let map: Vec<u8> = map
            .iter()
            .flat_map(|e| {
                le(&[
                    e.addr,
                    e.size,
                    u64::from(e.type_) | u64::from(e.reserved) << 32,
                ])
            })
            .collect();
        w("PVH module list", &modules, layout::PVH_MODLIST)?;
        w("PVH memory map", &map, layout::PVH_MEMMAP)?;
        w("PVH start info", &start_info_bytes(&info), layout::PVH_INFO)?;
    }
    Ok(())
}

/// `u64`s as little-endian bytes.
fn le(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The start info as the guest reads it (56 bytes, little-endian).
pub fn start_info_bytes(i: &hvm_start_info) -> Vec<u8> {
    let pair = |a: u32, b: u32| u64::from(a) | u64::from(b) << 32;
    le(&[
        pair(i.magic, i.version),
        pair(i.flags, i.nr_modules),
        i.modlist_paddr,
        i.cmdline_paddr,
        i.rsdp_paddr,
        i.memmap_paddr,
        pair(i.memmap_entries, i.reserved),
    ])
}

/// The PVH start info with its module list (the initramfs, if any) and
/// memory map (the same ranges as the e820 map).
pub fn pvh_start_info(
    p: &BootParams,
) -> (
    hvm_start_info,
    Vec<hvm_modlist_entry>,
    Vec<hvm_memmap_table_entry>,
) {
    let modules: Vec<hvm_modlist_entry> = p
        .initrd
        .iter()
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr: *paddr,
            size: *size,
            ..Default::default()
        })
        .collect();
    let map: Vec<hvm_memmap_table_entry> = e820_map(p.mem_size)
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST
        },
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: p.rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    (info, modules, map)
}

/// The boot GDT: null, null, code (`__BOOT_CS` = 0x10), data
/// (`__BOOT_DS` = 0x18), TSS (0x20).
pub fn gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The GDT for the PVH entry: the same selectors with a flat 32-bit code
/// segment (the kernel loads its own GDT before it enables long mode).
pub fn gdt_pvh() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// A segment descriptor from its flags (access byte in bits 0–7, the
/// G/DB/L/AVL nibble in bits 12–15), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Page tables identity-mapping the first 4 GiB with 2 MiB pages: PML4,
/// PDPT and four page directories, laid out contiguously from
/// [`layout::PML4`].
pub fn page_tables() -> Vec<u8> {
    let mut t = vec![0u8; 6 * 4096];
    let put = |t: &mut Vec<u8>, at: usize, v: u64| t[at..at + 8].copy_from_slice(&v.to_le_bytes());
    // present | writable
    put(&mut t, 0, layout::PDPT | 0x3);
    for i in 0..4u64 {
        put(&mut t, 4096 + 8 * i as usize, (layout::PD + i * 4096) | 0x3);
    }
    for i in 0..(4 * 512u64) {
        // present | writable | page size (2 MiB)
        put(&mut t, 2 * 4096 + 8 * i as usize, (i << 21) | 0x83);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest_has_low_ram_bios_hole_and_high_ram() {
        assert_eq!(
            e820_map(256 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x10_0000 - 0x9fc00, E820_RESERVED),
                (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_guest_continues_above_4g() {
        let map = e820_map(6 << 30);
        assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
        assert_eq!(map[3], (1 << 32, (6 << 30) - 0xc000_0000, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (6 << 30) - 0x10_0000 + 0x9fc00);
    }

    #[test]
    fn gdt_code_segment_is_64_bit_flat() {
        // The descriptor Linux's own boot GDT uses for __KERNEL_CS.
        assert_eq!(gdt()[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt()[3], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_map_4g_identity() {
        let t = page_tables();
        let at = |i: usize| u64::from_le_bytes(t[i..i + 8].try_into().unwrap());
        assert_eq!(at(0), layout::PDPT | 3);
        assert_eq!(at(4096 + 24), (layout::PD + 3 * 4096) | 3);
        // The last 2 MiB page maps 4 GiB - 2 MiB.
        assert_eq!(at(6 * 4096 - 8), ((4u64 << 30) - (2 << 20)) | 0x83);
        assert_eq!(layout::PDPT - layout::PML4, 4096);
        assert_eq!(layout::PD - layout::PML4, 2 * 4096);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let kernel = LoadedKernel {
            entry: Entry::Linux64(0x100200),
            end: 0x200000,
            header: linux_loader::loader::bootparam::setup_header {
                header: HDRS,
                version: 0x020f,
                ..Default::default()
            },
        };
        let bp = zero_page(
            &kernel,
            &BootParams {
                mem_size: 512 << 20,
                cmdline_len: 20,
                initrd: Some((0x1f00_0000, 0x12345)),
                rsdp: layout::ACPI_START,
            },
        );
        let (ptr, size, img, rd) = (
            bp.hdr.cmd_line_ptr,
            bp.hdr.cmdline_size,
            bp.hdr.ramdisk_image,
            bp.hdr.ramdisk_size,
        );
        assert_eq!((ptr, size), (layout::CMDLINE as u32, 21));
        assert_eq!((img, rd), (0x1f00_0000, 0x12345));
        let (loader, flags) = (bp.hdr.type_of_loader, bp.hdr.loadflags);
        assert_eq!(loader, 0xff);
        assert_eq!(flags & LOADFLAGS, LOADFLAGS);
        let rsdp = bp.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe0000);
        assert_eq!(bp.e820_entries, 3);
        let last = bp.e820_table[2];
        let (a, s, t) = (last.addr, last.size, last.r#type);
        assert_eq!((a, s, t), (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM));
    }

    #[test]
    fn pvh_start_info_names_cmdline_initrd_rsdp_and_memory_map() {
        let p = BootParams {
            mem_size: 5 << 30,
            cmdline_len: 10,
            initrd: Some((0x3f00_0000, 0x4321)),
            rsdp: layout::ACPI_START,
        };
        let (info, modules, map) = pvh_start_info(&p);
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, layout::PVH_MODLIST);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_paddr, layout::PVH_MEMMAP);
        assert_eq!((modules[0].paddr, modules[0].size), (0x3f00_0000, 0x4321));
        assert_eq!(info.memmap_entries as usize, map.len());
        let e820 = e820_map(5 << 30);
        assert_eq!(map.len(), e820.len());
        for (m, e) in map.iter().zip(&e820) {
            assert_eq!((m.addr, m.size, m.type_), *e);
        }
        let bytes = start_info_bytes(&info);
        assert_eq!(bytes.len(), 56);
        assert_eq!(&bytes[..4], &0x336e_c578u32.to_le_bytes());
        assert_eq!(&bytes[24..32], &layout::CMDLINE.to_le_bytes());
        assert_eq!(&bytes[48..52], &(map.len() as u32).to_le_bytes());
        let none = pvh_start_info(&BootParams { initrd: None, ..p }).0;
        assert_eq!((none.nr_modules, none.modlist_paddr), (0, 0));
    }

    #[test]
    fn pvh_gdt_code_segment_is_32_bit_flat() {
        assert_eq!(gdt_pvh()[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_pvh()[3], 0x00cf_9300_0000_ffff);
    }
}
