//! A Windows-style guest as a VMware VM leaves it (`tests/guests/windows.sh`:
//! NTFS and the ESP made by Linux's own tools in libguestfs's appliance,
//! registry hives written by hivexsh). vmshift reads it offline; NTFS
//! listings must match ntfs-3g's `ntfsls`, registry values `hivexget`, and
//! the inspection virt-inspector's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vmshift_tests::{
    build_guest, finding_codes, json, tool_ok, virt_inspector_agrees, vmshift, vmshift_ok,
};

/// The fixture, built once for the tests of this file (~20 s); `c.ntfs` is
/// the NTFS partition on its own, for ntfs-3g's tools.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = build_guest("windows.sh");
        tool_ok(
            &dir,
            "qemu-img",
            &["convert", "-O", "qcow2", "windows.raw", "windows.qcow2"],
        );
        // Partition 3 starts at sector 239616 (see windows.sh).
        tool_ok(
            &dir,
            "dd",
            &[
                "if=windows.raw",
                "of=c.ntfs",
                "bs=512",
                "skip=239616",
                "conv=sparse",
                "status=none",
            ],
        );
        dir
    })
}

/// name → (is a directory, size) from `ntfsls -l -F -p DIR`.
fn ntfsls(d: &Path, dir: &str) -> BTreeMap<String, (bool, u64)> {
    let out = tool_ok(d, "ntfsls", &["-l", "-F", "-p", dir, "c.ntfs"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "    SIZE Mon DD HH:MM YYYY NAME[/]"
            let f: Vec<&str> = l.split_whitespace().collect();
            let size: u64 = f.first()?.parse().ok()?;
            let name = f.get(5..)?.join(" ");
            let dir = name.ends_with('/');
            Some((name.trim_end_matches('/').to_string(), (dir, size)))
        })
        .filter(|(n, _)| n != "." && n != "..")
        .collect()
}

/// name → (is a directory, size) from `vmshift guest ls -l`.
fn our_ls(d: &Path, path: &str) -> BTreeMap<String, (bool, u64)> {
    vmshift_ok(d, &["guest", "ls", "-l", "windows.qcow2", path])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f[4..].join(" ");
            (name, (l.starts_with('d'), f[1].parse().unwrap()))
        })
        .collect()
}

#[test]
fn ntfs_reads_as_ntfs_3g_reads_it() {
    let d = fixture();
    // Type, serial and label as blkid reads them; the ESP too.
    let fs = json(
        vmshift_ok(
            d,
            &["guest", "filesystems", "--output", "json", "windows.qcow2"],
        )
        .as_bytes(),
    );
    let ntfs = fs
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "/dev/sda3")
        .unwrap();
    let blkid = |tag: &str| {
        String::from_utf8_lossy(&tool_ok(d, "blkid", &["-s", tag, "-o", "value", "c.ntfs"]).stdout)
            .trim()
            .to_string()
    };
    assert_eq!(ntfs["type"], "ntfs");
    assert_eq!(ntfs["uuid"], blkid("UUID").as_str());
    assert_eq!(ntfs["label"], blkid("LABEL").as_str());
    assert_eq!(ntfs["readable"], true);
    for dir in [
        "/",
        "/Windows/System32",
        "/Windows/System32/config",
        "/Windows/System32/DriverStore/FileRepository",
        "/Program Files/VMware/VMware Tools",
    ] {
        let mut theirs = ntfsls(d, dir);
        assert!(!theirs.is_empty(), "{dir}");
        // ntfsls gives a directory's index size; vmshift none.
        for v in theirs.values_mut() {
            if v.0 {
                v.1 = 0;
            }
        }
        assert_eq!(our_ls(d, &format!("/dev/sda3:{dir}")), theirs, "{dir}");
    }
    // Files byte for byte; names without case, as Windows finds them.
    let cat = |p: &str| {
        let o = vmshift(d, &["guest", "cat", "windows.qcow2", p]);
        assert!(
            o.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let src = |n: &str| std::fs::read(d.join("src").join(n)).unwrap();
    assert_eq!(
        cat("/dev/sda3:/Windows/System32/config/SYSTEM"),
        src("SYSTEM")
    );
    assert_eq!(
        cat("/dev/sda3:/windows/system32/CONFIG/software"),
        src("SOFTWARE")
    );
    assert_eq!(cat("/dev/sda3:/hiberfil.sys"), src("hiberfil.sys"));
    assert_eq!(
        cat("/dev/sda1:/EFI/Microsoft/Boot/bootmgfw.efi"),
        src("bootmgfw.efi")
    );
    let o = vmshift(
        d,
        &[
            "guest",
            "cat",
            "windows.qcow2",
            "/dev/sda3:/Windows/nope.dll",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.dll"));
}

#[test]
fn windows_inspection_agrees_with_virt_inspector_and_hivex() {
    let d = fixture();
    let v = json(
        vmshift_ok(
            d,
            &["guest", "inspect", "--output", "json", "windows.qcow2"],
        )
        .as_bytes(),
    );
    let os = &v["operatingsystems"][0];
    virt_inspector_agrees(d, &["windows.qcow2"], os);
    // Registry facts as hivexget reads them from the same hives.
    let get = |hive: &str, key: &str, name: &str| {
        String::from_utf8_lossy(
            &tool_ok(d, "hivexget", &[&format!("src/{hive}"), key, name]).stdout,
        )
        .trim()
        .to_string()
    };
    let w = &os["windows"];
    let cv = r"\Microsoft\Windows NT\CurrentVersion";
    assert_eq!(w["edition"], get("SOFTWARE", cv, "EditionID").as_str());
    assert_eq!(
        w["build"],
        get("SOFTWARE", cv, "CurrentBuildNumber").as_str()
    );
    assert_eq!(w["system_root"], get("SOFTWARE", cv, "SystemRoot").as_str());
    for drv in w["drivers"].as_array().unwrap() {
        let key = format!(r"\ControlSet001\Services\{}", drv["name"].as_str().unwrap());
        assert_eq!(
            drv["start"].to_string(),
            get("SYSTEM", &key, "Start"),
            "{drv}"
        );
    }
    let starts: BTreeMap<&str, &str> = w["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["starts"].as_str().unwrap()))
        .collect();
    assert_eq!(starts["LSI_SAS"], "boot");
    assert_eq!(starts["storahci"], "on demand");
    assert_eq!(w["hibernated"], true);
    assert_eq!(os["vmware_tools"], true);
    let codes = finding_codes(os);
    assert_eq!(
        codes,
        [
            "windows-no-virtio-storage-driver",
            "windows-boot-driver-not-started",
            "windows-hibernated",
            "windows-no-virtio-net-driver",
            "guest-vmware-tools"
        ]
    );
    let text = vmshift_ok(d, &["guest", "inspect", "windows.qcow2"]);
    assert!(
        text.contains(
            r"reg add HKLM\SYSTEM\CurrentControlSet\Services\storahci /v Start /t REG_DWORD /d 0 /f"
        ),
        "{text}"
    );
}

/// The fixture as a VMware VM folder: BIOS firmware (the .vmx has no
/// `firmware = "efi"`, as an OVF export may lose it), LSI SAS and vmxnet3.
fn vmware_vm(d: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    tool_ok(
        t,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            d.join("windows.raw").to_str().unwrap(),
            "win.vmdk",
        ],
    );
    std::fs::write(
        t.join("win.vmx"),
        "config.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"win\"\nmemsize = \"4096\"\nguestOS = \"windows2019srvnext-64\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsisas1068\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"win.vmdk\"\nethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"vmxnet3\"\nethernet0.addressType = \"static\"\nethernet0.address = \"00:50:56:01:02:03\"\n",
    )
    .unwrap();
    dir
}

#[test]
fn vm_commands_read_the_windows_guest_and_convert_picks_what_it_drives() {
    let d = fixture();
    let dir = vmware_vm(d);
    let t = dir.path();
    // validate: the firmware the disk cannot boot with is an error.
    let o = vmshift(t, &["vm", "validate", "win.vmx"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{out}");
    for code in [
        "boot-firmware-mismatch",
        "windows-no-virtio-storage-driver",
        "windows-boot-driver-not-started",
        "windows-hibernated",
        "guest-vmware-tools",
    ] {
        assert!(out.contains(code), "{code}: {out}");
    }
    assert!(out.contains("bootmgfw.efi"), "{out}");
    // inspect --guest: the guest beside the model.
    let v = json(
        vmshift_ok(
            t,
            &["vm", "inspect", "--guest", "--output", "json", "win.vmx"],
        )
        .as_bytes(),
    );
    assert_eq!(v["guest"]["operatingsystems"][0]["type"], "windows");
    assert!(v["guest"]["boot"]["uefi"][0]
        .as_str()
        .unwrap()
        .ends_with("bootx64.efi"));
    assert!(v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "boot-firmware-mismatch"));
    // Without --guest the disks are not read.
    let v = json(vmshift_ok(t, &["vm", "inspect", "--output", "json", "win.vmx"]).as_bytes());
    assert!(v.get("guest").is_none());
    // convert: UEFI (what the disk boots), SATA (storahci; no VirtIO
    // storage driver), e1000e (no netkvm), each change saying why.
    let o = vmshift(
        t,
        &[
            "vm",
            "convert",
            "win.vmx",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "o",
        ],
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{out}");
    assert!(out.contains("firmware: bios → uefi"), "{out}");
    assert!(
        out.contains("the guest: Windows has no VirtIO storage driver"),
        "{out}"
    );
    assert!(
        out.contains("the guest: Windows has no VirtIO network driver"),
        "{out}"
    );
    let xml = std::fs::read_to_string(t.join("o/win.xml")).unwrap();
    assert!(xml.contains("<os firmware=\"efi\">"), "{xml}");
    assert!(xml.contains("bus=\"sata\""), "{xml}");
    assert!(xml.contains("<model type=\"e1000e\"/>"), "{xml}");
    // --virtio still wins over the guest's facts (flags first).
    let o = vmshift(
        t,
        &[
            "vm",
            "convert",
            "win.vmx",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "o2",
            "--virtio",
        ],
    );
    assert!(o.status.success());
    let xml = std::fs::read_to_string(t.join("o2/win.xml")).unwrap();
    assert!(!xml.contains("bus=\"sata\""), "{xml}");
    assert!(xml.contains("<model type=\"virtio\"/>"), "{xml}");
}

#[test]
fn a_dirty_ntfs_volume_is_seen_as_ntfsinfo_sees_it() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let d = fixture();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    tool_ok(
        t,
        "cp",
        &[
            "--sparse=always",
            d.join("windows.raw").to_str().unwrap(),
            "dirty.raw",
        ],
    );
    // Set VOLUME_DIRTY in $Volume's VOLUME_INFORMATION (MFT record 3), as
    // Windows leaves it after a crash.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.join("dirty.raw"))
        .unwrap();
    let part = 239_616u64 * 512;
    let mut boot = [0u8; 512];
    f.seek(SeekFrom::Start(part)).unwrap();
    f.read_exact(&mut boot).unwrap();
    let cluster = u64::from(u16::from_le_bytes([boot[11], boot[12]])) * u64::from(boot[13]);
    let mft = u64::from_le_bytes(boot[0x30..0x38].try_into().unwrap()) * cluster;
    let rec_size = match boot[0x40] as i8 {
        n if n < 0 => 1u64 << (-n),
        n => n as u64 * cluster,
    };
    let mirror = u64::from_le_bytes(boot[0x38..0x40].try_into().unwrap()) * cluster;
    let at = part + mft + 3 * rec_size;
    let mut rec = vec![0u8; rec_size as usize];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut rec).unwrap();
    assert_eq!(&rec[0..4], b"FILE");
    let mut a = usize::from(u16::from_le_bytes([rec[0x14], rec[0x15]]));
    loop {
        let ty = u32::from_le_bytes(rec[a..a + 4].try_into().unwrap());
        assert_ne!(ty, 0xffff_ffff, "no VOLUME_INFORMATION in $Volume");
        let len = u32::from_le_bytes(rec[a + 4..a + 8].try_into().unwrap()) as usize;
        if ty == 0x70 {
            let v = a + usize::from(u16::from_le_bytes([rec[a + 0x14], rec[a + 0x15]]));
            rec[v + 0x0a] |= 1;
            break;
        }
        a += len;
    }
    // And its copy in $MFTMirr, which ntfs-3g compares.
    for to in [at, part + mirror + 3 * rec_size] {
        f.seek(SeekFrom::Start(to)).unwrap();
        f.write_all(&rec).unwrap();
    }
    drop(f);
    tool_ok(
        t,
        "dd",
        &[
            "if=dirty.raw",
            "of=c.ntfs",
            "bs=512",
            "skip=239616",
            "conv=sparse",
            "status=none",
        ],
    );
    let info = String::from_utf8_lossy(&tool_ok(t, "ntfsinfo", &["-m", "-f", "c.ntfs"]).stdout)
        .to_string();
    assert!(info.contains("Volume Flags: 0x0001"), "{info}");
    let v = json(vmshift_ok(t, &["guest", "inspect", "--output", "json", "dirty.raw"]).as_bytes());
    let os = &v["operatingsystems"][0];
    assert_eq!(os["windows"]["ntfs_dirty"], true);
    let msg = os["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "windows-hibernated")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("marked dirty"), "{msg}");
}

/// A copy of the fixture with `edit` applied to its bytes.
fn damaged_copy(d: &Path, t: &Path, edit: impl Fn(&mut Vec<u8>)) {
    let mut img = std::fs::read(d.join("windows.raw")).unwrap();
    edit(&mut img);
    std::fs::write(t.join("bad.raw"), img).unwrap();
}

#[test]
fn damaged_ntfs_indexes_and_hives_are_errors_and_unknowns() {
    let d = fixture();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    // Every index block (INDX record) of the volume with its first entry's
    // length set to 0: the ntfs crate panics on that; vmshift must not.
    damaged_copy(d, t, |img| {
        let part = 239_616 * 512;
        let mut n = 0;
        for at in (part..img.len() - 4096).step_by(4096) {
            if &img[at..at + 4] == b"INDX" {
                let first = at
                    + 0x18
                    + u32::from_le_bytes(img[at + 0x18..at + 0x1c].try_into().unwrap()) as usize;
                img[first + 8] = 0;
                img[first + 9] = 0;
                n += 1;
            }
        }
        assert!(n > 0, "no INDX record");
    });
    let o = vmshift(
        t,
        &["guest", "ls", "bad.raw", "/dev/sda3:/Windows/System32"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("damaged NTFS structure") && !err.contains("panicked"),
        "{err}"
    );
    // inspect goes on (the root's own index is damaged too: no Windows
    // is found), and prints no panic.
    let o = vmshift(t, &["guest", "inspect", "bad.raw"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    // SYSTEM's Services key claiming 2^32-1 subkeys: the drivers are
    // unknown, never "none installed".
    damaged_copy(d, t, |img| {
        let sys = std::fs::read(d.join("src/SYSTEM")).unwrap();
        let name = sys
            .windows(8)
            .enumerate()
            .position(|(i, w)| w == b"Services" && i >= 0x4c && &sys[i - 0x4c..i - 0x4a] == b"nk")
            .unwrap();
        // The cell where NTFS put that part of the file: its offset within
        // a 4 KiB cluster is kept.
        let cell = &sys[name - 0x4c..name + 8];
        let nk = (name - 0x4c) % 4096;
        let nk = (nk..img.len() - cell.len())
            .step_by(4096)
            .find(|&p| &img[p..p + cell.len()] == cell)
            .expect("the Services key in the image");
        img[nk + 0x14..nk + 0x18].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    let v = json(vmshift_ok(t, &["guest", "inspect", "--output", "json", "bad.raw"]).as_bytes());
    let os = &v["operatingsystems"][0];
    assert_eq!(os["windows"]["drivers_read"], false);
    assert!(os["unknown"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u.as_str().unwrap().contains("SYSTEM hive: drivers")));
    let codes = finding_codes(os);
    assert_eq!(codes, ["windows-hibernated", "guest-vmware-tools"]);
}
