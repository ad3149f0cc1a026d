//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with the DSDT), MADT.
//!
//! The DSDT describes the PCI host bridge (configuration through ports
//! 0xCF8/0xCFC, the BAR window) and COM1. The platform is "hardware
//! reduced" like cloud-hypervisor's and Firecracker's: no PM timer or GPE
//! blocks; a sleep control register at [`SLEEP_PORT`] powers the guest off
//! and the reset register at [`RESET_PORT`] reboots it.

use acpi_tables::aml;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use crate::layout;

/// OEM id in every table.
const OEM_ID: [u8; 6] = *b"VMSHFT";
/// The sleep control/status register (one byte each, [`SLEEP_PORT`] and +1).
pub const SLEEP_PORT: u16 = 0x600;
/// The reset register.
pub const RESET_PORT: u16 = 0x602;
/// The value the guest writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x1;

/// The ACPI tables laid out from `base`, ready to copy into guest memory.
#[derive(Debug)]
pub struct Tables {
    /// Where the bytes go.
    pub base: u64,
    /// The bytes (RSDP first).
    pub bytes: Vec<u8>,
}

/// Builds the tables for `vcpus` processors.
pub fn build(base: u64, vcpus: u8) -> Tables {
    let dsdt = dsdt();
    let madt = madt(vcpus);
    // RSDP, then the tables, each on a 16-byte boundary.
    let mut bytes = vec![0u8; 36];
    let place = |table: &[u8], bytes: &mut Vec<u8>| {
        let at = bytes.len().next_multiple_of(16);
        bytes.resize(at, 0);
        bytes.extend_from_slice(table);
        base + at as u64
    };
    let dsdt_addr = place(dsdt.as_slice(), &mut bytes);
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.as_slice(), &mut bytes);
    let madt_addr = place(madt.as_slice(), &mut bytes);
    let xsdt = xsdt(&[fadt_addr, madt_addr]);
    let xsdt_addr = place(xsdt.as_slice(), &mut bytes);
    bytes[..36].copy_from_slice(&rsdp(xsdt_addr));
    Tables { base, bytes }
}

fn header(sig: &[u8; 4], rev: u8, table: &[u8; 8]) -> Sdt {
    Sdt::new(*sig, 36, rev, OEM_ID, *table, 1)
}

/// The ACPI 2.0 RSDP pointing at the XSDT.
pub fn rsdp(xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2;
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The byte that makes `data` sum to zero.
pub fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn xsdt(tables: &[u64]) -> Sdt {
    let mut x = header(b"XSDT", 1, b"VMSHXSDT");
    for t in tables {
        x.append_slice(&t.to_le_bytes());
    }
    x
}

/// A generic address structure for a one-byte I/O port.
fn gas_io(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The FADT (revision 6, 276 bytes), hardware-reduced.
fn fadt(dsdt: u64) -> Sdt {
    let mut f = header(b"FACP", 6, b"VMSHFACP");
    f.append_slice(&[0u8; 276 - 36]);
    // Flags: WBINVD, PWR_BUTTON and SLP_BUTTON absent (generic buttons not
    // present), RESET_REG_SUP, HW_REDUCED_ACPI.
    let flags: u32 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 10) | (1 << 20);
    f.write_u32(112, flags);
    // IAPC_BOOT_ARCH: no VGA, ASPM controls off, no CMOS RTC (ports
    // 0x70/0x71 are not emulated; the guest takes its time from kvmclock).
    f.write_u16(109, (1 << 2) | (1 << 4) | (1 << 5));
    f.write_bytes(116, &gas_io(RESET_PORT));
    f.write_u8(128, RESET_VALUE);
    f.write_u8(131, 3); // FADT minor version
    f.write_u64(140, dsdt); // X_DSDT
    f.write_bytes(244, &gas_io(SLEEP_PORT)); // SLEEP_CONTROL_REG
    f.write_bytes(256, &gas_io(SLEEP_PORT + 1)); // SLEEP_STATUS_REG
    f.write_u64(268, u64::from_le_bytes(*b"VMSHIFT\0")); // hypervisor vendor
    f
}

/// The MADT: one local APIC per vCPU and the IOAPIC.
fn madt(vcpus: u8) -> Sdt {
    let mut m = header(b"APIC", 5, b"VMSHMADT");
    m.append_slice(&(layout::LAPIC as u32).to_le_bytes());
    m.append_slice(&0u32.to_le_bytes()); // no dual 8259 (hardware-reduced)
    for id in 0..vcpus {
        // type 0, length 8, processor uid, APIC id, flags: enabled
        m.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![1u8, 12, 0, 0];
    ioapic.extend_from_slice(&(layout::IOAPIC as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    m.append_slice(&ioapic);
    m
}

/// The DSDT: the PCI root bridge and COM1.
fn dsdt() -> Sdt {
    let mut d = header(b"DSDT", 6, b"VMSHDSDT");
    let mut body = Vec::new();
    // Each object is serialized in the statement that builds it: the AML
    // builders borrow their children.
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0x0u16, 0x0u16),
                    &aml::IO::new(0xcf8, 0xcf8, 1, 0x8),
                    &aml::AddressSpace::new_io(0x0u16, 0x0cf7u16, None),
                    &aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        layout::PCI_MMIO_START as u32,
                        (layout::PCI_MMIO_END - 1) as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(0x3f8, 0x3f8, 0, 0x8),
                    &aml::Interrupt::new(true, true, false, false, 4),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // \_S5 so that a guest's poweroff writes SLP_TYP 5 to the sleep
    // control register.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8])).to_aml_bytes(&mut body);
    d.append_slice(&body);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Follows RSDP → XSDT → tables and returns each table's bytes.
    fn tables(t: &Tables) -> Vec<Vec<u8>> {
        let at = |addr: u64| (addr - t.base) as usize;
        let b = &t.bytes;
        let xsdt = at(u64_at(b, 24));
        let len = u32_at(b, xsdt + 4) as usize;
        let mut out = vec![b[xsdt..xsdt + len].to_vec()];
        for i in 0..(len - 36) / 8 {
            let p = at(u64_at(b, xsdt + 36 + 8 * i));
            let l = u32_at(b, p + 4) as usize;
            out.push(b[p..p + l].to_vec());
            if &b[p..p + 4] == b"FACP" {
                let d = at(u64_at(b, p + 140));
                let l = u32_at(b, d + 4) as usize;
                out.push(b[d..d + l].to_vec());
            }
        }
        out
    }

    #[test]
    fn rsdp_checksums_are_zero() {
        let t = build(layout::ACPI_START, 1);
        assert_eq!(&t.bytes[..8], b"RSD PTR ");
        assert_eq!(sum(&t.bytes[..20]), 0);
        assert_eq!(sum(&t.bytes[..36]), 0);
        assert_eq!(t.bytes[15], 2);
    }

    #[test]
    fn every_table_is_reachable_and_sums_to_zero() {
        let t = build(layout::ACPI_START, 2);
        let got = tables(&t);
        let sigs: Vec<&[u8]> = got.iter().map(|t| &t[..4]).collect();
        assert_eq!(sigs, vec![&b"XSDT"[..], b"FACP", b"DSDT", b"APIC"]);
        for table in &got {
            assert_eq!(sum(table), 0, "{}", String::from_utf8_lossy(&table[..4]));
        }
        // The tables fit below the end of the BIOS area.
        assert!(t.base + t.bytes.len() as u64 <= layout::BIOS_END);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_reset_register() {
        let t = build(layout::ACPI_START, 1);
        let fadt = tables(&t).into_iter().find(|t| &t[..4] == b"FACP").unwrap();
        assert_eq!(fadt.len(), 276);
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0);
        assert_ne!(u32_at(&fadt, 112) & (1 << 10), 0);
        assert_eq!(fadt[116], 1); // reset register in I/O space
        assert_eq!(u64_at(&fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(u64_at(&fadt, 248), u64::from(SLEEP_PORT));
        // IAPC_BOOT_ARCH says there is no CMOS RTC.
        assert_ne!(u16::from_le_bytes([fadt[109], fadt[110]]) & (1 << 5), 0);
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let t = build(layout::ACPI_START, 3);
        let madt = tables(&t).into_iter().find(|t| &t[..4] == b"APIC").unwrap();
        assert_eq!(u32_at(&madt, 36), layout::LAPIC as u32);
        let mut entries = Vec::new();
        let mut p = 44;
        while p < madt.len() {
            entries.push((madt[p], madt[p + 3]));
            p += madt[p + 1] as usize;
        }
        assert_eq!(entries, vec![(0, 0), (0, 1), (0, 2), (1, 0)]);
        assert_eq!(p, madt.len());
    }

    #[test]
    fn dsdt_names_the_pci_root_and_com1() {
        let t = build(layout::ACPI_START, 1);
        let dsdt = tables(&t).into_iter().find(|t| &t[..4] == b"DSDT").unwrap();
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0"));
        assert!(has(b"COM1"));
        assert!(has(b"_S5_"));
        // EISA id of PNP0A03 and PNP0501, compressed.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x03]));
        assert!(has(&[0x41, 0xd0, 0x05, 0x01]));
    }
}
