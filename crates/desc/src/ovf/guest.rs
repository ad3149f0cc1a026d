//! The guest OS of an `OperatingSystemSection`: the CIM `ovf:id` (DMTF
//! `CIM_OperatingSystem.OSType`) and VMware's `vmw:osType` (a vSphere
//! guest id such as `ubuntu64Guest`), which wins when present because it
//! is the more precise of the two.
//!
//! The version follows the `.vmx` reading so that every source names a
//! guest alike: Windows releases as `"2019"`, `"10"`, `"2008r2"`; other
//! guests as VMware's id without its bitness (`ubuntu`, `rhel8`).

use vmshift_model::{Guest, OsFamily};

/// `CIM_OperatingSystem.OSType` values 0–123 (DMTF CIM schema; 0–115 as
/// in CIM 2.x's ValueMap, 116–123 the later additions).
const CIM_OS: [&str; 124] = [
    "Unknown",
    "Other",
    "MACOS",
    "ATTUNIX",
    "DGUX",
    "DECNT",
    "Tru64 UNIX",
    "OpenVMS",
    "HPUX",
    "AIX",
    "MVS",
    "OS400",
    "OS/2",
    "JavaVM",
    "MSDOS",
    "WIN3x",
    "WIN95",
    "WIN98",
    "WINNT",
    "WINCE",
    "NCR3000",
    "NetWare",
    "OSF",
    "DC/OS",
    "Reliant UNIX",
    "SCO UnixWare",
    "SCO OpenServer",
    "Sequent",
    "IRIX",
    "Solaris",
    "SunOS",
    "U6000",
    "ASERIES",
    "HP NonStop OS",
    "HP NonStop OSS",
    "BS2000",
    "LINUX",
    "Lynx",
    "XENIX",
    "VM",
    "Interactive UNIX",
    "BSDUNIX",
    "FreeBSD",
    "NetBSD",
    "GNU Hurd",
    "OS9",
    "MACH Kernel",
    "Inferno",
    "QNX",
    "EPOC",
    "IxWorks",
    "VxWorks",
    "MiNT",
    "BeOS",
    "HP MPE",
    "NextStep",
    "PalmPilot",
    "Rhapsody",
    "Windows 2000",
    "Dedicated",
    "OS/390",
    "VSE",
    "TPF",
    "Windows (R) Me",
    "Caldera Open UNIX",
    "OpenBSD",
    "Not Applicable",
    "Windows XP",
    "z/OS",
    "Microsoft Windows Server 2003",
    "Microsoft Windows Server 2003 64-Bit",
    "Windows XP 64-Bit",
    "Windows XP Embedded",
    "Windows Vista",
    "Windows Vista 64-Bit",
    "Windows Embedded for Point of Service",
    "Microsoft Windows Server 2008",
    "Microsoft Windows Server 2008 64-Bit",
    "FreeBSD 64-Bit",
    "RedHat Enterprise Linux",
    "RedHat Enterprise Linux 64-Bit",
    "Solaris 64-Bit",
    "SUSE",
    "SUSE 64-Bit",
    "SLES",
    "SLES 64-Bit",
    "Novell OES",
    "Novell Linux Desktop",
    "Sun Java Desktop System",
    "Mandriva",
    "Mandriva 64-Bit",
    "TurboLinux",
    "TurboLinux 64-Bit",
    "Ubuntu",
    "Ubuntu 64-Bit",
    "Debian",
    "Debian 64-Bit",
    "Linux 2.4.x",
    "Linux 2.4.x 64-Bit",
    "Linux 2.6.x",
    "Linux 2.6.x 64-Bit",
    "Linux 64-Bit",
    "Other 64-Bit",
    "Microsoft Windows Server 2008 R2",
    "VMware ESXi",
    "Microsoft Windows 7",
    "CentOS 32-bit",
    "CentOS 64-bit",
    "Oracle Linux 32-bit",
    "Oracle Linux 64-bit",
    "eComStation 32-bitx",
    "Microsoft Windows Server 2011",
    "Microsoft Windows Server 2012",
    "Microsoft Windows 8",
    "Microsoft Windows 8 64-bit",
    "Microsoft Windows Server 2012 R2",
    "Microsoft Windows Server 2016",
    "Microsoft Windows 8.1",
    "Microsoft Windows 8.1 64-bit",
    "Microsoft Windows 10",
    "Microsoft Windows 10 64-bit",
    "Microsoft Windows Server 2019",
    "Microsoft Windows 11 64-bit",
    "Microsoft Windows Server 2022",
];

/// The DMTF name of CIM OS type `id`.
pub(crate) fn cim_name(id: u16) -> Option<&'static str> {
    CIM_OS.get(usize::from(id)).copied()
}

/// What a CIM OS type says: family, version (in the `.vmx` reading's
/// terms) and whether it is 64-bit (`None` when the type does not say).
fn from_cim(id: u16) -> (OsFamily, Option<&'static str>, Option<bool>) {
    use OsFamily::{Bsd, Linux, Other, Solaris, Windows};
    match id {
        15..=19 => (Windows, None, Some(false)),
        58 => (Windows, Some("2000"), Some(false)),
        63 => (Windows, Some("me"), Some(false)),
        67 | 72 => (Windows, Some("xp"), Some(false)),
        71 => (Windows, Some("xp"), Some(true)),
        69 => (Windows, Some("2003"), Some(false)),
        70 => (Windows, Some("2003"), Some(true)),
        73 => (Windows, Some("vista"), Some(false)),
        74 => (Windows, Some("vista"), Some(true)),
        75 => (Windows, None, Some(false)),
        76 => (Windows, Some("2008"), Some(false)),
        77 => (Windows, Some("2008"), Some(true)),
        103 => (Windows, Some("2008r2"), Some(true)),
        105 => (Windows, Some("7"), None),
        111 => (Windows, Some("2008r2"), Some(true)),
        112 | 115 => (Windows, Some("2012"), Some(true)),
        113 | 117 => (Windows, Some("8"), Some(false)),
        114 | 118 => (Windows, Some("8"), Some(true)),
        116 => (Windows, Some("2016"), Some(true)),
        119 => (Windows, Some("10"), Some(false)),
        120 => (Windows, Some("10"), Some(true)),
        121 => (Windows, Some("2019"), Some(true)),
        122 => (Windows, Some("11"), Some(true)),
        123 => (Windows, Some("2022"), Some(true)),
        79 => (Linux, Some("rhel"), Some(false)),
        80 => (Linux, Some("rhel"), Some(true)),
        82 => (Linux, Some("suse"), Some(false)),
        83 => (Linux, Some("suse"), Some(true)),
        84 => (Linux, Some("sles"), Some(false)),
        85 => (Linux, Some("sles"), Some(true)),
        89 => (Linux, Some("mandriva"), Some(false)),
        90 => (Linux, Some("mandriva"), Some(true)),
        91 => (Linux, Some("turbolinux"), Some(false)),
        92 => (Linux, Some("turbolinux"), Some(true)),
        93 => (Linux, Some("ubuntu"), Some(false)),
        94 => (Linux, Some("ubuntu"), Some(true)),
        95 => (Linux, Some("debian"), Some(false)),
        96 => (Linux, Some("debian"), Some(true)),
        97 | 99 => (Linux, None, Some(false)),
        98 | 100 | 101 => (Linux, None, Some(true)),
        106 => (Linux, Some("centos"), Some(false)),
        107 => (Linux, Some("centos"), Some(true)),
        108 => (Linux, Some("oraclelinux"), Some(false)),
        109 => (Linux, Some("oraclelinux"), Some(true)),
        36 | 86..=88 => (Linux, None, None),
        41 | 42 | 43 | 65 => (Bsd, None, None),
        78 => (Bsd, None, Some(true)),
        29 | 30 => (Solaris, None, None),
        81 => (Solaris, None, Some(true)),
        102 | 104 => (Other, None, Some(true)),
        _ => (Other, None, None),
    }
}

/// Windows releases by vSphere guest id prefix (lower case, longest
/// first where one prefix contains another).
const WINDOWS: &[(&str, &str)] = &[
    ("win31", "3.1"),
    ("win95", "95"),
    ("win98", "98"),
    ("winme", "me"),
    ("winnt", "nt"),
    ("win2000", "2000"),
    ("winxp", "xp"),
    ("winnet", "2003"),
    ("winlonghorn", "2008"),
    ("winvista", "vista"),
    ("windows7server", "2008r2"),
    ("windows7", "7"),
    ("windows8server", "2012"),
    ("windows8", "8"),
    ("windows9server", "2016"),
    ("windows9", "10"),
    ("windows2019srvnext", "2022"),
    ("windows2022srvnext", "2025"),
    ("windows2019srv", "2019"),
    ("windows11", "11"),
    ("windows12", "12"),
];

/// vSphere guest id stems of Linux distributions whose id does not say
/// "linux".
const LINUX: &[&str] = &[
    "ubuntu",
    "debian",
    "rhel",
    "centos",
    "sles",
    "suse",
    "opensuse",
    "fedora",
    "mandrake",
    "mandriva",
    "redhat",
    "asianux",
    "coreos",
    "vmwarephoton",
    "nld",
    "oes",
    "sjds",
    "rocky",
    "alma",
    "fusionos",
    "pardus",
    "prolinux",
    "kylin",
];

/// Family, version and bitness of a vSphere guest id (`ubuntu64Guest`,
/// `windows2019srv_64Guest`); `None` for an id that names no family.
fn from_vmware(id: &str) -> Option<(OsFamily, Option<String>, bool)> {
    let lower = id.to_ascii_lowercase();
    let stem = lower.strip_suffix("guest").unwrap_or(&lower);
    let x86_64 = stem.contains("64") || stem.starts_with("vmkernel");
    let base = stem
        .strip_suffix("_64")
        .or_else(|| stem.strip_suffix("64"))
        .unwrap_or(stem);
    if base.is_empty() {
        return None;
    }
    if base.starts_with("win") {
        let v = WINDOWS
            .iter()
            .filter(|(p, _)| base.starts_with(p))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, v)| v.to_string());
        return Some((OsFamily::Windows, v, x86_64));
    }
    let family = if base.contains("linux") || LINUX.iter().any(|p| base.starts_with(p)) {
        OsFamily::Linux
    } else if ["freebsd", "netbsd", "openbsd"]
        .iter()
        .any(|p| base.starts_with(p))
    {
        OsFamily::Bsd
    } else if base.starts_with("solaris") {
        OsFamily::Solaris
    } else if [
        "other",
        "darwin",
        "dos",
        "netware",
        "os2",
        "ecomstation",
        "unixware",
        "openserver",
        "vmkernel",
        "crx",
        "sco",
    ]
    .iter()
    .any(|p| base.starts_with(p))
    {
        OsFamily::Other
    } else {
        return None;
    };
    let version = (family != OsFamily::Other).then(|| base.to_string());
    Some((family, version, x86_64))
}

/// The guest of an `OperatingSystemSection` with CIM type `cim` and
/// VMware id `vmware`. `source_id` is the VMware id when there is one,
/// else the CIM number. Returns whether either value was recognised.
pub(crate) fn guest(cim: Option<u16>, vmware: Option<&str>) -> (Guest, bool) {
    let from_id = cim.map(from_cim);
    let from_vmw = vmware.and_then(from_vmware);
    let known_cim = cim.is_some_and(|c| cim_name(c).is_some());
    let mut g = Guest {
        source_id: vmware
            .map(str::to_string)
            .or_else(|| cim.map(|c| c.to_string())),
        ..Guest::default()
    };
    if let Some((family, version, bits)) = from_id {
        g.family = family;
        g.version = version.map(str::to_string);
        g.x86_64 = bits.unwrap_or(true);
    }
    if let Some((family, version, x86_64)) = from_vmw.clone() {
        g.family = family;
        g.version = version.or(g.version);
        g.x86_64 = x86_64;
    }
    (g, from_vmw.is_some() || known_cim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmware_id_wins_over_the_cim_type() {
        let (g, known) = guest(Some(101), Some("ubuntu64Guest"));
        assert!(known);
        assert_eq!(g.family, OsFamily::Linux);
        assert_eq!(g.version.as_deref(), Some("ubuntu"));
        assert_eq!(g.source_id.as_deref(), Some("ubuntu64Guest"));
        assert!(g.x86_64);
    }

    #[test]
    fn windows_ids_give_the_release_as_vmx_does() {
        for (id, v) in [
            ("windows2019srv_64Guest", "2019"),
            ("windows2019srvNext_64Guest", "2022"),
            ("windows9_64Guest", "10"),
            ("windows9Server64Guest", "2016"),
            ("windows7Server64Guest", "2008r2"),
            ("windows11_64Guest", "11"),
            ("winNetEnterprise64Guest", "2003"),
        ] {
            let (g, _) = guest(Some(1), Some(id));
            assert_eq!(g.family, OsFamily::Windows, "{id}");
            assert_eq!(g.version.as_deref(), Some(v), "{id}");
            assert!(g.x86_64, "{id}");
        }
        let (g, _) = guest(None, Some("windows7Guest"));
        assert!(!g.x86_64);
    }

    #[test]
    fn cim_types_alone_give_family_and_bitness() {
        let (g, _) = guest(Some(80), None);
        assert_eq!(
            (g.family, g.version.as_deref(), g.x86_64),
            (OsFamily::Linux, Some("rhel"), true)
        );
        assert_eq!(g.source_id.as_deref(), Some("80"));
        let (g, _) = guest(Some(107), None);
        assert_eq!(g.family, OsFamily::Linux, "107 is CentOS 64-bit");
        let (g, _) = guest(Some(103), None);
        assert_eq!(
            (g.family, g.version.as_deref()),
            (OsFamily::Windows, Some("2008r2"))
        );
        let (g, _) = guest(Some(93), None);
        assert!(!g.x86_64);
        let (g, _) = guest(Some(78), None);
        assert_eq!(g.family, OsFamily::Bsd);
        assert_eq!(cim_name(101), Some("Linux 64-Bit"));
        assert_eq!(cim_name(102), Some("Other 64-Bit"));
    }

    #[test]
    fn unknown_values_are_reported_as_unknown() {
        let (g, known) = guest(Some(9999), Some("marsOS64Guest"));
        assert!(!known);
        assert_eq!(g.family, OsFamily::Other);
        assert_eq!(g.source_id.as_deref(), Some("marsOS64Guest"));
    }
}
