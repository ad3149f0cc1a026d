//! vCPU setup for the 64-bit Linux entry: CPUID, boot MSRs, long-mode
//! segments and paging, the FPU, and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot;
use crate::error::{Error, Result};
use crate::layout;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// CPUID for vCPU `id` of `count`: what KVM supports, with the APIC id,
/// the logical processor count and the hypervisor bit set.
pub fn cpuid(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// A segment register from a GDT entry.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Puts the boot vCPU at the kernel's entry: the 64-bit one with the zero
/// page in `rsi`, or the PVH one with the start info in `ebx`.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: boot::Entry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("reading sregs"))?;
    let pvh = matches!(entry, boot::Entry::Pvh(_));
    let gdt = if pvh { boot::gdt_pvh() } else { boot::gdt() };
    let code = segment(gdt[2], 0x10);
    let data = segment(gdt[3], 0x18);
    let tss = segment(gdt[4], 0x20);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let regs = match entry {
        boot::Entry::Linux64(rip) => {
            // Protected mode with paging, long mode, PAE.
            sregs.cr0 = 0x8000_0011;
            sregs.cr3 = layout::PML4;
            sregs.cr4 = 0x20;
            sregs.efer = 0x500;
            kvm_regs {
                rflags: 0x2,
                rip,
                rsp: layout::BOOT_STACK,
                rbp: layout::BOOT_STACK,
                rsi: layout::ZERO_PAGE,
                ..Default::default()
            }
        }
        boot::Entry::Pvh(rip) => {
            // Protected mode (and ET), no paging, no long mode.
            sregs.cr0 = 0x11;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            kvm_regs {
                rflags: 0x2,
                rip,
                rbx: layout::PVH_INFO,
                ..Default::default()
            }
        }
    };
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("setting sregs"))?;
    vcpu.set_regs(&regs)
        .map_err(Error::kvm("setting registers"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("setting the FPU"))?;
    Ok(())
}

/// The MSRs every vCPU starts with.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        // Fast string operations.
        (MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, write-back by default.
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|(index, data)| kvm_msr_entry {
        index: *index,
        data: *data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::Config(format!("building the MSR list: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::kvm("setting MSRs"))?;
    if set != entries.len() {
        return Err(Error::Config(format!(
            "KVM accepted {set} of {} boot MSRs (MSR {:#x} was refused)",
            entries.len(),
            entries[set].index
        )));
    }
    Ok(())
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(Error::kvm("reading the local APIC"))?;
    let mut set = |reg: usize, mode: u32| {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set(0x350, 0x7);
    set(0x360, 0x4);
    vcpu.set_lapic(&lapic)
        .map_err(Error::kvm("setting the local APIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_from_gdt_is_long_mode() {
        let s = segment(boot::gdt()[2], 0x10);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, 0x10));
        assert_eq!(
            (s.type_, s.present, s.l, s.db, s.s, s.g),
            (0xb, 1, 1, 0, 1, 1)
        );
        let d = segment(boot::gdt()[3], 0x18);
        assert_eq!((d.type_, d.db, d.l), (0x3, 1, 0));
        assert_eq!(segment(0, 0).unusable, 1);
        let c = segment(boot::gdt_pvh()[2], 0x10);
        assert_eq!((c.l, c.db, c.type_, c.limit), (0, 1, 0xb, 0xffff_ffff));
        let t = segment(boot::gdt_pvh()[4], 0x20);
        assert_eq!((t.type_, t.limit, t.s, t.present), (0xb, 0x67, 0, 1));
    }
}
