//! `vmshift vm`: whole VMs from the sample folders in fixtures/vms,
//! converted and checked against the peers (qemu-img compare for disks,
//! libvirt's RelaxNG schema for the XML).

use std::path::{Path, PathBuf};

use vmshift_tests::{json, names_in, tool, tool_ok, vmshift, vmshift_ok};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vms")
}

/// A copy of the sample VM folder `name` (tests never write into the repo).
fn sample(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn inspect(dir: &Path, file: &str) -> serde_json::Value {
    json(vmshift_ok(dir, &["vm", "inspect", "--output", "json", file]).as_bytes())
}

/// The fields a conversion must keep.
fn essentials(v: &serde_json::Value) -> serde_json::Value {
    let vm = &v["vm"];
    let macs: Vec<_> = vm["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["mac"].clone())
        .collect();
    serde_json::json!({
        "memory": vm["memory-mib"],
        "cpu": vm["cpu"],
        "firmware": vm["firmware"]["kind"],
        "secure-boot": vm["firmware"]["secure-boot"],
        "macs": macs,
        "uuid": vm["uuid"],
    })
}

/// `vmshift vm convert --to libvirt --out OUT VMX` in `dir`; its report.
fn to_libvirt(dir: &Path, out: &str, vmx: &str) -> String {
    vmshift_ok(
        dir,
        &["vm", "convert", "--to", "libvirt", "--out", out, vmx],
    )
}

fn validate_xml(dir: &Path, xml: &Path) {
    let out = tool(dir, "virt-xml-validate", &[xml.to_str().unwrap(), "domain"]);
    assert!(
        out.status.success(),
        "{}: {}{}",
        xml.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_sample_vmx_inspects_as_toml_and_json() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["linux-web", "winsrv", "esxi-db", "ws-snap"] {
        let d = sample(dir.path(), name);
        let file = format!("{name}.vmx");
        let v = inspect(&d, &file);
        let display = if name == "winsrv" {
            "winsrv-2019"
        } else {
            name
        };
        assert_eq!(v["vm"]["name"], display);
        let toml = vmshift_ok(&d, &["vm", "inspect", &file]);
        assert!(toml.contains(&format!("name = \"{display}\"")), "{toml}");
    }
}

#[test]
fn linux_vm_to_libvirt_keeps_disks_macs_topology_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "linux-web");
    let out = to_libvirt(&d, "out", "linux-web.vmx");
    assert!(
        out.contains("changed nics[0].model: e1000 → virtio"),
        "{out}"
    );
    assert!(out.contains("media-missing"), "the ISO is not there: {out}");
    assert!(out.contains("linux-nic-names"), "{out}");
    let xml = d.join("out/linux-web.xml");
    validate_xml(&d, &xml);
    assert_eq!(
        essentials(&inspect(&d, "out/linux-web.xml")),
        essentials(&inspect(&d, "linux-web.vmx"))
    );
    // Disks in order, each the same disk to qemu-img, named by absolute path.
    let text = std::fs::read_to_string(&xml).unwrap();
    // Sparse VMDKs are thin: the guest's discards reach the image.
    assert_eq!(text.matches("discard=\"unmap\"").count(), 2, "{text}");
    let out_dir = d.join("out").canonicalize().unwrap();
    for (i, src) in ["linux-web.vmdk", "linux-web-data.vmdk"].iter().enumerate() {
        let conv = out_dir.join(format!("linux-web-disk{i}.qcow2"));
        assert!(text.contains(&conv.display().to_string()), "{text}");
        tool_ok(&d, "qemu-img", &["compare", src, conv.to_str().unwrap()]);
        tool_ok(&d, "qemu-img", &["check", conv.to_str().unwrap()]);
    }
    assert_eq!(
        names_in(&d.join("out")),
        [
            "linux-web-disk0.qcow2",
            "linux-web-disk1.qcow2",
            "linux-web.xml"
        ]
    );
}

#[test]
fn windows_uefi_vm_to_libvirt_and_proxmox() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "winsrv");
    let out = to_libvirt(&d, "lv", "winsrv.vmx");
    assert!(out.contains("nvram-not-carried"), "{out}");
    assert!(out.contains("windows-virtio-drivers"), "{out}");
    assert!(out.contains("vtpm"), "{out}");
    let xml = d.join("lv/winsrv-2019.xml");
    validate_xml(&d, &xml);
    let text = std::fs::read_to_string(&xml).unwrap();
    for want in [
        "<clock offset=\"localtime\">",
        "<hyperv",
        "bus=\"sata\"",
        "type=\"e1000e\"",
        "name=\"secure-boot\"",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert_eq!(
        essentials(&inspect(&d, "lv/winsrv-2019.xml")),
        essentials(&inspect(&d, "winsrv.vmx"))
    );
    tool_ok(
        &d,
        "qemu-img",
        &["compare", "winsrv.vmdk", "lv/winsrv-2019-disk0.qcow2"],
    );

    // Proxmox: <vmid>.conf, a directory-storage layout, and an EFI disk
    // from OVMF's template.
    vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "proxmox",
            "--vmid",
            "120",
            "--storage",
            "local",
            "--out",
            "pve",
            "winsrv.vmx",
        ],
    );
    let conf = std::fs::read_to_string(d.join("pve/120.conf")).unwrap();
    assert!(conf.contains("local:120/vm-120-disk-0.qcow2"), "{conf}");
    assert!(conf.contains("bios: ovmf"), "{conf}");
    assert!(
        conf.contains("efidisk0: local:120/vm-120-disk-1.qcow2"),
        "{conf}"
    );
    assert!(!conf.lines().any(|l| l.starts_with("args:")), "{conf}");
    assert_eq!(
        names_in(&d.join("pve/images/120")),
        ["vm-120-disk-0.qcow2", "vm-120-disk-1.qcow2"]
    );
    tool_ok(
        &d,
        "qemu-img",
        &[
            "compare",
            "winsrv.vmdk",
            "pve/images/120/vm-120-disk-0.qcow2",
        ],
    );
    tool_ok(
        &d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
            "pve/images/120/vm-120-disk-1.qcow2",
        ],
    );
}

#[test]
fn esxi_datastore_paths_resolve_in_the_vms_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "esxi-db");
    vmshift_ok(&d, &["vm", "validate", "esxi-db.vmx"]);
    vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "qemu-args",
            "--disk-format",
            "raw",
            "--out",
            "q",
            "esxi-db.vmx",
        ],
    );
    tool_ok(
        &d,
        "qemu-img",
        &["compare", "esxi-db.vmdk", "q/esxi-db-disk0.raw"],
    );
    tool_ok(
        &d,
        "qemu-img",
        &["compare", "esxi-db_1.vmdk", "q/esxi-db-disk1.raw"],
    );
    let sh = std::fs::read_to_string(d.join("q/esxi-db.sh")).unwrap();
    assert!(
        sh.contains("mac=00:50:56:9a:10:20") && sh.contains("mac=00:50:56:00:aa:01"),
        "{sh}"
    );
    // A datastore path into another folder: the disk of that name beside
    // the descriptor is used, and the report says so (folders get
    // renamed when VMs are copied off a datastore).
    let text = std::fs::read_to_string(d.join("esxi-db.vmx")).unwrap();
    std::fs::write(
        d.join("other.vmx"),
        text.replace("[datastore1] esxi-db/", "[datastore2] elsewhere/"),
    )
    .unwrap();
    let out = vmshift(&d, &["vm", "validate", "other.vmx"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("disk-path-mapped") && stdout.contains("--datastore datastore2=DIR"),
        "{stdout}"
    );
    // Without a disk of that name anywhere, it is an error naming both ways
    // out.
    std::fs::write(
        d.join("gone.vmx"),
        text.replace(
            "[datastore1] esxi-db/esxi-db_1.vmdk",
            "[datastore2] elsewhere/gone.vmdk",
        ),
    )
    .unwrap();
    let out = vmshift(&d, &["vm", "validate", "gone.vmx"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("--disk-root DIR"), "{stdout}");
    let mapped = d.to_str().unwrap().to_string();
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    std::fs::copy(d.join("esxi-db_1.vmdk"), d.join("elsewhere/esxi-db_1.vmdk")).unwrap();
    std::fs::copy(
        d.join("esxi-db_1-flat.vmdk"),
        d.join("elsewhere/esxi-db_1-flat.vmdk"),
    )
    .unwrap();
    vmshift_ok(
        &d,
        &[
            "vm",
            "validate",
            "--datastore",
            &format!("datastore2={mapped}"),
            "other.vmx",
        ],
    );
}

#[test]
fn workstation_snapshot_delta_converts_its_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "ws-snap");
    let out = to_libvirt(&d, "o", "ws-snap.vmx");
    assert!(
        out.contains("snapshots-present") && out.contains("before upgrade"),
        "{out}"
    );
    tool_ok(
        &d,
        "qemu-img",
        &["compare", "ws-snap-000001.vmdk", "o/ws-snap-disk0.qcow2"],
    );
    validate_xml(&d, &d.join("o/ws-snap.xml"));
}

#[test]
fn descriptor_only_and_missing_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "linux-web");
    std::fs::remove_file(d.join("linux-web-data.vmdk")).unwrap();
    // Without the disk: an error, and no disk or descriptor written.
    let out = vmshift(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "libvirt",
            "--out",
            "o",
            "linux-web.vmx",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Checked before the first write: not even the disk that exists, nor
    // the output folder.
    assert!(!d.join("o").exists(), "{:?}", names_in(&d.join("o")));
    // --descriptor-only writes the descriptor alone, the disk reported.
    let out = vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "p",
            "linux-web.vmx",
        ],
    );
    assert!(out.contains("disk-missing"), "{out}");
    assert_eq!(names_in(&d.join("p")), ["linux-web.xml"]);
    validate_xml(&d, &d.join("p/linux-web.xml"));
}

#[test]
fn bad_vmx_input_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("big.vmx", vec![b'#'; 100 << 20], "not a VM descriptor"),
        (
            "utf8.vmx",
            b".encoding = \"UTF-8\"\ndisplayName = \"\xff\xfe\"\n".to_vec(),
            "line 2",
        ),
        (
            "dup.vmx",
            b"memsize = \"1\"\nMEMSIZE = \"2\"\n".to_vec(),
            "already set on line 1",
        ),
    ];
    for (name, bytes, words) in cases {
        std::fs::write(d.join(name), bytes).unwrap();
        let out = vmshift(d, &["vm", "convert", "--to", "libvirt", "--out", "o", name]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(words) && err.contains(name), "{name}: {err}");
    }
    // A disk path climbing out of the folder is refused, not read.
    std::fs::write(
        d.join("escape.vmx"),
        "displayName = \"e\"\nmemsize = \"64\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"../../etc/shadow\"\n",
    )
    .unwrap();
    let out = vmshift(
        d,
        &[
            "vm",
            "convert",
            "--to",
            "libvirt",
            "--out",
            "o",
            "escape.vmx",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("../../etc/shadow"), "{text}");
    let written = if d.join("o").exists() {
        names_in(&d.join("o"))
    } else {
        Vec::new()
    };
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn diff_shows_what_a_conversion_changed() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "linux-web");
    let same = vmshift(&d, &["vm", "diff", "linux-web.vmx", "linux-web.vmx"]);
    assert_eq!(same.status.code(), Some(0));
    vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "o",
            "linux-web.vmx",
        ],
    );
    let out = vmshift(&d, &["vm", "diff", "linux-web.vmx", "o/linux-web.xml"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("nics[0].model: \"e1000\" → \"virtio\""),
        "{text}"
    );
    assert!(!text.contains(".mac:"), "MACs are kept: {text}");
}

#[test]
fn proxmox_and_ovf_descriptors_convert_to_valid_libvirt_xml() {
    let dir = tempfile::tempdir().unwrap();
    for (folder, file) in [
        ("proxmox", "101.conf"),
        ("ovf", "linux.ovf"),
        ("libvirt", "web01.xml"),
    ] {
        let d = sample(dir.path(), folder);
        let v = inspect(&d, file);
        assert!(v["vm"]["memory-mib"].as_u64().unwrap() > 0, "{v}");
        // Their disks are not here: the descriptor alone, the disks reported.
        let out = vmshift_ok(
            &d,
            &[
                "vm",
                "convert",
                "--to",
                "libvirt",
                "--descriptor-only",
                "--out",
                "o",
                file,
            ],
        );
        assert!(out.contains("disk-"), "{out}");
        let xml = names_in(&d.join("o"));
        assert_eq!(xml.len(), 1, "{xml:?}");
        validate_xml(&d, &d.join("o").join(&xml[0]));
        // MACs survive the trip.
        let before = essentials(&v);
        let after = essentials(&inspect(&d, &format!("o/{}", xml[0])));
        assert_eq!(before["macs"], after["macs"]);
        assert_eq!(before["cpu"], after["cpu"]);
        assert_eq!(before["memory"], after["memory"]);
    }
}

/// Writes an OVA of linux.ovf, its disk (a streamOptimized VMDK of
/// `disk`) and NVRAM, and a manifest, via Python's tarfile; `tamper`
/// changes the .ovf after its sum is taken.
fn make_ova(dir: &Path, name: &str, member_name: &str, tamper: bool, disk: &Path) {
    let ovf = fixtures().join("ovf/linux.ovf");
    let script = format!(
        r#"
import hashlib, io, re, tarfile
ovf = open({ovf:?}, 'rb').read()
disk = open({disk:?}, 'rb').read()
nvram = b'\0' * 8192
ovf = re.sub(rb'(ovf:href="linux-disk1.vmdk" ovf:id="file1" ovf:size=")\d+', rb'\g<1>%d' % len(disk), ovf)
ovf = re.sub(rb'(ovf:href="linux-file1.nvram" ovf:id="file2" ovf:size=")\d+', rb'\g<1>%d' % len(nvram), ovf)
ovf = ovf.replace(b'ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30"', b'ovf:capacity="32" ovf:capacityAllocationUnits="byte * 2^20"')
members = [({member:?}, ovf), ('linux-disk1.vmdk', disk), ('linux-file1.nvram', nvram)]
mf = ''.join('SHA256(%s)= %s\n' % (n, hashlib.sha256(d).hexdigest()) for n, d in members)
if {tamper}:
    members[0] = (members[0][0], ovf.replace(b'2048', b'4096', 1))
with tarfile.open({name:?}, 'w', format=tarfile.USTAR_FORMAT) as t:
    for n, data in members + [('linux.mf', mf.encode())]:
        i = tarfile.TarInfo(n); i.size = len(data); t.addfile(i, io.BytesIO(data))
"#,
        ovf = ovf.to_str().unwrap(),
        disk = disk.to_str().unwrap(),
        member = member_name,
        name = name,
        tamper = if tamper { "True" } else { "False" },
    );
    tool_ok(dir, "python3", &["-c", &script]);
}

#[test]
fn ova_manifest_is_verified_and_its_disk_is_read_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixtures().join("linux-web/linux-web-data.vmdk");
    make_ova(d, "good.ova", "linux.ovf", false, &src);
    let v = inspect(d, "good.ova");
    assert_eq!(v["vm"]["memory-mib"], 2048);
    // The streamOptimized disk is converted straight out of the tar.
    to_libvirt(d, "o", "good.ova");
    let xml = names_in(&d.join("o"))
        .into_iter()
        .find(|n| n.ends_with(".xml"))
        .unwrap();
    validate_xml(d, &d.join("o").join(&xml));
    let qcow = names_in(&d.join("o"))
        .into_iter()
        .find(|n| n.ends_with(".qcow2"))
        .unwrap();
    tool_ok(
        d,
        "qemu-img",
        &["compare", src.to_str().unwrap(), &format!("o/{qcow}")],
    );

    make_ova(d, "bad.ova", "linux.ovf", true, &src);
    let out = vmshift(d, &["vm", "inspect", "bad.ova"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("linux.ovf") && err.contains("bad.ova"),
        "{err}"
    );
    make_ova(d, "evil.ova", "../linux.ovf", false, &src);
    let out = vmshift(
        d,
        &["vm", "convert", "--to", "libvirt", "--out", "e", "evil.ova"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(".."), "{err}");
    assert!(!d.join("e").exists() || names_in(&d.join("e")).is_empty());
}

#[test]
fn the_sample_ova_converts_with_its_disk_read_from_the_tar() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "ovf");
    let out = vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "proxmox",
            "--vmid",
            "130",
            "--storage",
            "local",
            "--out",
            "o",
            "linux.ova",
        ],
    );
    assert!(out.contains("wrote"), "{out}");
    // The disk inside is the linux-web data disk, packed by make-disks.sh.
    let src = fixtures().join("linux-web/linux-web-data.vmdk");
    tool_ok(
        &d,
        "qemu-img",
        &[
            "compare",
            src.to_str().unwrap(),
            "o/images/130/vm-130-disk-0.qcow2",
        ],
    );
    let conf = std::fs::read_to_string(d.join("o/130.conf")).unwrap();
    assert!(
        conf.contains("bios: ovmf") && conf.contains("efidisk0:"),
        "{conf}"
    );
}

#[test]
fn hostile_or_odd_descriptors_are_errors_or_findings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Entity expansion in libvirt XML: refused before anything is built.
    std::fs::write(
        d.join("bomb.xml"),
        "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;'>]><domain type='kvm'><name>&b;</name><memory>1</memory></domain>",
    )
    .unwrap();
    let out = vmshift(
        d,
        &["vm", "convert", "--to", "libvirt", "--out", "o", "bomb.xml"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("DOCTYPE") && err.contains("bomb.xml"), "{err}");
    assert!(!d.join("o").exists() || names_in(&d.join("o")).is_empty());
    // A Proxmox config with a section Proxmox does not write, and args:.
    std::fs::write(
        d.join("7.conf"),
        "name: t\nmemory: 512\nargs: -device foo\nscsi0: local:7/vm-7-disk-0.qcow2,size=1G\n\n[weird:section]\nfoo: bar\n",
    )
    .unwrap();
    let v = inspect(d, "7.conf");
    let codes: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"proxmox-args") && codes.contains(&"proxmox-unknown-section"),
        "{codes:?}"
    );
    vmshift_ok(
        d,
        &[
            "vm",
            "convert",
            "--to",
            "proxmox",
            "--vmid",
            "108",
            "--storage",
            "local",
            "--descriptor-only",
            "--out",
            "p",
            "7.conf",
        ],
    );
    let conf = std::fs::read_to_string(d.join("p/108.conf")).unwrap();
    assert!(!conf.contains("args"), "{conf}");
}

#[test]
fn errors_stop_a_conversion_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "linux-web");
    let vmx = std::fs::read_to_string(d.join("linux-web.vmx")).unwrap();
    // An encrypted VM: its disks cannot be read.
    std::fs::write(
        d.join("enc.vmx"),
        format!("{vmx}encryption.keySafe = \"vmware:key/list/(pair/(null/vmware...\"\n"),
    )
    .unwrap();
    let out = vmshift(
        &d,
        &["vm", "convert", "--to", "libvirt", "--out", "o", "enc.vmx"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("encrypted-vm"),
        "{out:?}"
    );
    assert!(!d.join("o").exists());
    // An existing output is refused up front, not after the disks.
    vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "p",
            "linux-web.vmx",
        ],
    );
    let out = vmshift(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "libvirt",
            "--out",
            "p",
            "linux-web.vmx",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(names_in(&d.join("p")), ["linux-web.xml"]);
}

#[test]
fn serial_logs_and_snapshot_lists_cannot_reach_host_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "ws-snap");
    let vmx = std::fs::read_to_string(d.join("ws-snap.vmx")).unwrap();
    // A serial log named like the converted disk gets a name of its own.
    std::fs::write(
        d.join("ws-snap.vmx"),
        format!("{vmx}serial0.present = \"TRUE\"\nserial0.fileType = \"file\"\nserial0.fileName = \"ws-snap-disk0.qcow2\"\nserial1.present = \"TRUE\"\nserial1.fileType = \"pipe\"\nserial1.fileName = \"/root/.bashrc\"\n"),
    )
    .unwrap();
    vmshift_ok(
        &d,
        &[
            "vm",
            "convert",
            "--to",
            "qemu-args",
            "--out",
            "q",
            "ws-snap.vmx",
        ],
    );
    let sh = std::fs::read_to_string(d.join("q/ws-snap.sh")).unwrap();
    assert!(
        sh.contains("ws-snap-serial0.log") && !sh.contains(".bashrc"),
        "{sh}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("q/ws-snap.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "the script is executable");
    // A .vmsd that is a symlink out of the folder is not read.
    std::fs::remove_file(d.join("ws-snap.vmsd")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", d.join("ws-snap.vmsd")).unwrap();
    let v = inspect(&d, "ws-snap.vmx");
    let text = v.to_string();
    assert!(
        text.contains("vmsd-unreadable") && !text.contains("root:x"),
        "{text}"
    );
}

#[test]
fn vm_validate_checks_libvirt_xml_against_the_installed_schema() {
    let dir = tempfile::tempdir().unwrap();
    let d = sample(dir.path(), "linux-web");
    to_libvirt(&d, "o", "linux-web.vmx");
    let out = vmshift_ok(
        &d,
        &["vm", "validate", "--libvirt-schema", "o/linux-web.xml"],
    );
    assert!(!out.contains("libvirt-schema"), "{out}");
    // A document the schema refuses (and xmllint with it).
    let text = std::fs::read_to_string(d.join("o/linux-web.xml")).unwrap();
    std::fs::write(
        d.join("bad.xml"),
        text.replace("<devices>", "<devices><bogus/>"),
    )
    .unwrap();
    assert!(!tool(&d, "virt-xml-validate", &["bad.xml", "domain"])
        .status
        .success());
    let out = vmshift(&d, &["vm", "validate", "--libvirt-schema", "bad.xml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[libvirt-schema] domain/devices"),
        "{out:?}"
    );
}
