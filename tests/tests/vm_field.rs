//! `.vmx` files as VMware writes them and VM folders as admins move them:
//! disks named by a path on another host, keys VMware leaves out, Proxmox
//! VM ids.

use std::path::Path;

use vmshift_tests::{tool_ok, vmshift};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn disk(d: &Path, name: &str) {
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            name,
            "8M",
        ],
    );
}

fn vmx(d: &Path, name: &str, body: &str) {
    std::fs::write(
        d.join(name),
        format!("config.version = \"8\"\nvirtualHW.version = \"19\"\nguestOS = \"windows2019srv-64\"\n{body}"),
    )
    .unwrap();
}

#[test]
fn a_windows_path_resolves_by_file_name_whatever_the_folder_is_called() {
    let dir = tempfile::tempdir().unwrap();
    // Copied off a Workstation host, and the folder renamed.
    let d = dir.path().join("winsrv-copy");
    std::fs::create_dir(&d).unwrap();
    disk(&d, "Windows Server.vmdk");
    vmx(
        &d,
        "Windows Server.vmx",
        "displayName = \"winsrv\"\nmemsize = \"4096\"\nnumvcpus = \"2\"\nsata0.present = \"TRUE\"\nsata0:0.present = \"TRUE\"\nsata0:0.fileName = \"C:\\\\Users\\\\ana\\\\Documents\\\\Virtual Machines\\\\winsrv\\\\Windows Server.vmdk\"\n",
    );
    let o = vmshift(
        &d,
        &[
            "vm",
            "convert",
            "Windows Server.vmx",
            "--to",
            "libvirt",
            "--out",
            "out",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("disk-path-mapped") && out.contains("Windows host"),
        "{out}"
    );
    tool_ok(
        &d,
        "qemu-img",
        &["compare", "Windows Server.vmdk", "out/winsrv-disk0.qcow2"],
    );
    // Nothing of that name here: the error says where to put it.
    std::fs::rename(d.join("Windows Server.vmdk"), dir.path().join("moved.vmdk")).unwrap();
    let o = vmshift(&d, &["vm", "validate", "Windows Server.vmx"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--disk-root DIR"), "{}", text(&o));
}

#[test]
fn a_foreign_path_is_found_in_a_disk_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("vm");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    disk(&store, "data.vmdk");
    disk(&d, "web.vmdk");
    vmx(
        &d,
        "web.vmx",
        "displayName = \"web\"\nmemsize = \"1024\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"/home/alice/vmware/web/web.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"D:\\\\disks\\\\data.vmdk\"\n",
    );
    let o = vmshift(&d, &["vm", "validate", "web.vmx"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = vmshift(
        &d,
        &[
            "vm",
            "validate",
            "--disk-root",
            store.to_str().unwrap(),
            "web.vmx",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/home/alice/vmware/web/web.vmdk"), "{out}");
    assert!(
        out.contains(&store.join("data.vmdk").display().to_string()),
        "{out}"
    );
}

#[test]
fn keys_vmware_leaves_out_take_vmwares_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    disk(d, "bare.vmdk");
    vmx(
        d,
        "bare.vmx",
        "scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsisas1068\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"bare.vmdk\"\n",
    );
    let o = vmshift(d, &["vm", "inspect", "--output", "json", "bare.vmx"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vm"]["name"], "bare");
    assert_eq!(v["vm"]["memory-mib"], 32);
    assert_eq!(v["vm"]["cpu"]["vcpus"], 1);
    let codes: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    for c in [
        "vmx-default-memsize",
        "vmx-default-numvcpus",
        "vmx-default-name",
    ] {
        assert!(codes.contains(&c), "{codes:?}");
    }
    assert!(
        !codes.contains(&"memory-zero") && !codes.contains(&"name-empty"),
        "{codes:?}"
    );
    // The conversion goes through, and says what 32 MiB means.
    let o = vmshift(
        d,
        &[
            "vm", "convert", "bare.vmx", "--to", "libvirt", "--out", "out",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("too little for any current OS"),
        "{}",
        text(&o)
    );
}

#[test]
fn proxmox_vm_ids_are_those_proxmox_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    disk(d, "w.vmdk");
    vmx(
        d,
        "w.vmx",
        "displayName = \"w\"\nmemsize = \"1024\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"w.vmdk\"\n",
    );
    for (id, ok) in [
        ("0", false),
        ("99", false),
        ("100", true),
        ("999999999", true),
        ("1000000000", false),
    ] {
        let o = vmshift(
            d,
            &[
                "vm",
                "convert",
                "w.vmx",
                "--to",
                "proxmox",
                "--vmid",
                id,
                "--storage",
                "local",
                "--descriptor-only",
                "--out",
                &format!("p{id}"),
            ],
        );
        if ok {
            assert!(o.status.success(), "{id}: {}", text(&o));
            assert!(d.join(format!("p{id}/{id}.conf")).exists());
        } else {
            assert_eq!(o.status.code(), Some(1), "{id}: {}", text(&o));
            assert!(text(&o).contains("100..=999999999"), "{}", text(&o));
        }
    }
}

/// A VM on an ESXi port group, Workstation's bridged and NAT modes and a
/// custom vmnet.
const FOUR_NICS: &str = "displayName = \"n\"\nmemsize = \"1024\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"n.vmdk\"\n\
ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"vmxnet3\"\nethernet0.networkName = \"VM Network\"\nethernet0.addressType = \"static\"\nethernet0.address = \"00:50:56:00:00:01\"\n\
ethernet1.present = \"TRUE\"\nethernet1.virtualDev = \"e1000\"\nethernet1.addressType = \"static\"\nethernet1.address = \"00:50:56:00:00:02\"\n\
ethernet2.present = \"TRUE\"\nethernet2.connectionType = \"nat\"\nethernet2.addressType = \"static\"\nethernet2.address = \"00:50:56:00:00:03\"\n\
ethernet3.present = \"TRUE\"\nethernet3.connectionType = \"custom\"\nethernet3.vnet = \"vmnet2\"\nethernet3.addressType = \"static\"\nethernet3.address = \"00:50:56:00:00:04\"\n";

fn four_nics(d: &Path) {
    disk(d, "n.vmdk");
    vmx(d, "n.vmx", FOUR_NICS);
}

fn convert(d: &Path, to: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "vm",
        "convert",
        "n.vmx",
        "--to",
        to,
        "--descriptor-only",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    vmshift(d, &args)
}

#[test]
fn networks_go_where_the_user_maps_them_in_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    four_nics(d);
    let maps = [
        "--network-map",
        "vm network=bridge:br0,tag=20",
        "--network-map",
        "vmnet2=network:isolated",
        "--bridge",
        "br1",
    ];

    // libvirt: valid against libvirt's schema; the VLAN on Open vSwitch.
    let o = convert(d, "libvirt", "lv", &maps);
    assert!(o.status.success(), "{}", text(&o));
    let report = text(&o);
    assert!(
        report.contains("nics[0].network: VM Network → bridge br0, VLAN 20"),
        "{report}"
    );
    assert!(
        report.contains("nics[1].network: bridged → bridge br1"),
        "{report}"
    );
    assert!(
        report.contains("nics[2].network: nat → network default"),
        "{report}"
    );
    assert!(
        report.contains("nics[3].network: vmnet2 → network isolated"),
        "{report}"
    );
    assert!(report.contains("libvirt-vlan"), "{report}");
    let xml = std::fs::read_to_string(d.join("lv/n.xml")).unwrap();
    let ifaces: Vec<&str> = xml
        .split("<interface")
        .skip(1)
        .map(|s| s.split("</interface>").next().unwrap())
        .collect();
    assert_eq!(ifaces.len(), 4, "{xml}");
    assert!(
        ifaces[0].contains("type='bridge'") || ifaces[0].contains("type=\"bridge\""),
        "{xml}"
    );
    assert!(
        ifaces[0].contains("br0") && ifaces[0].contains("openvswitch"),
        "{xml}"
    );
    assert!(
        ifaces[0].contains("<tag id=") && ifaces[0].contains("20"),
        "{xml}"
    );
    assert!(
        ifaces[1].contains("br1") && !ifaces[1].contains("<vlan"),
        "{xml}"
    );
    assert!(
        ifaces[2].contains("network=") && ifaces[2].contains("default"),
        "{xml}"
    );
    assert!(ifaces[3].contains("isolated"), "{xml}");
    tool_ok(d, "virt-xml-validate", &["lv/n.xml", "domain"]);

    // Proxmox: bridges with the VLAN tag; a libvirt network is refused
    // before anything is written.
    let proxmox = ["--vmid", "120", "--storage", "local"];
    let o = convert(d, "proxmox", "px", &[&proxmox[..], &maps[..]].concat());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("bridge:NAME"), "{}", text(&o));
    assert!(!d.join("px").exists());
    let o = convert(
        d,
        "proxmox",
        "px",
        &[
            &proxmox[..],
            &maps[..2],
            &["--network-map", "vmnet2=bridge:vmbr2"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let conf = std::fs::read_to_string(d.join("px/120.conf")).unwrap();
    let net = |k: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(net("net0").ends_with(",bridge=br0,tag=20"), "{conf}");
    assert!(
        net("net1").ends_with(",bridge=vmbr0"),
        "no --bridge: {conf}"
    );
    assert!(net("net2").ends_with(",bridge=vmbr0"), "{conf}");
    assert!(net("net3").ends_with(",bridge=vmbr2"), "{conf}");

    // The QEMU script says what the report says: bridges on bridges, the
    // rest user-mode NAT, and that it cannot tag.
    let o = convert(d, "qemu-args", "q", &maps);
    assert!(o.status.success(), "{}", text(&o));
    let report = text(&o);
    assert!(
        report.contains("qemu-vlan") && report.contains("qemu-user-network"),
        "{report}"
    );
    let sh = std::fs::read_to_string(d.join("q/n.sh")).unwrap();
    assert!(sh.contains("bridge,id=net0,br=br0"), "{sh}");
    assert!(sh.contains("bridge,id=net1,br=br1"), "{sh}");
    assert!(sh.contains("user,id=net2"), "{sh}");
    assert!(sh.contains("user,id=net3"), "{sh}");
}

#[test]
fn without_a_map_each_network_is_said_and_a_map_that_matches_nothing_warns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    four_nics(d);
    let o = convert(
        d,
        "libvirt",
        "lv",
        &["--network-map", "VM Netwrok=bridge:br0"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let report = text(&o);
    assert!(report.contains("network-map-unused"), "{report}");
    assert!(
        report.contains("VM Network, bridged, nat, vmnet2"),
        "{report}"
    );
    // The port group is kept by name, and the report says the host needs it.
    assert!(
        report.contains("network-kept") && report.contains("'VM Network'"),
        "{report}"
    );
    assert!(
        report.contains("nics[1].network: bridged → network default"),
        "{report}"
    );
    assert!(report.contains("--bridge NAME"), "{report}");
    tool_ok(d, "virt-xml-validate", &["lv/n.xml", "domain"]);
}

#[test]
fn bad_network_maps_are_refused_at_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    four_nics(d);
    for bad in [
        "VM Network",
        "=bridge:br0",
        "x=br0",
        "x=bridge:",
        "x=bridge:br0,tag=0",
        "x=bridge:br0,tag=4095",
        "x=bridge:a-name-longer-than-15",
        "x=network:",
    ] {
        let o = convert(d, "libvirt", "lv", &["--network-map", bad]);
        assert_eq!(o.status.code(), Some(1), "{bad}: {}", text(&o));
    }
    let o = convert(d, "libvirt", "lv", &["--bridge", "br0,tag=3"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = convert(d, "vmx", "v", &["--bridge", "br0"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!d.join("lv").exists() && !d.join("v").exists());
}

/// An ESXi VM with a physical-mode RDM: the `.vmx` names a descriptor
/// whose extent maps a LUN.
fn rdm_vm(d: &Path) {
    disk(d, "db.vmdk");
    std::fs::write(
        d.join("db_1-rdm.vmdk"),
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfsPassthroughRawDeviceMap\"\n\n# Extent description\nRW 20971520 VMFSRDM \"db_1-rdmp.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"19\"\n",
    )
    .unwrap();
    vmx(
        d,
        "db.vmx",
        "displayName = \"db\"\nmemsize = \"2048\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsisas1068\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"db.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"db_1-rdm.vmdk\"\nscsi0:2.present = \"TRUE\"\nscsi0:2.deviceType = \"scsi-passthru\"\nscsi0:2.fileName = \"/vmfs/devices/genscsi/naa.5000e11156304001\"\nsata0.present = \"TRUE\"\nsata0:0.present = \"TRUE\"\nsata0:0.deviceType = \"atapi-cdrom\"\nsata0:0.fileName = \"/vmfs/devices/cdrom/mpx.vmhba0:C0:T0:L0\"\n",
    );
}

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_raw_device_mapping_stops_the_conversion_until_the_user_chooses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rdm_vm(d);
    // Found and named, with the way forward; the passthrough SCSI device
    // and the host CD-ROM are said, not errors.
    let o = vmshift(d, &["vm", "validate", "db.vmx"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("raw-device-mapping") && t.contains("vmfsPassthroughRawDeviceMap"),
        "{t}"
    );
    assert!(
        t.contains("--skip-device scsi0:1") && t.contains("--map-device scsi0:1=/dev/"),
        "{t}"
    );
    assert!(
        t.contains("vmx-scsi-passthrough") && t.contains("vmx-cdrom-host-device"),
        "{t}"
    );
    let o = vmshift(
        d,
        &[
            "vm", "convert", "db.vmx", "--to", "libvirt", "--out", "refused",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!d.join("refused").exists());

    // Skipped: one disk copied, the report says which was left out.
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "db.vmx",
            "--to",
            "libvirt",
            "--out",
            "skip",
            "--skip-device",
            "scsi0:1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("device-skipped") && text(&o).contains("scsi0:1"),
        "{}",
        text(&o)
    );
    assert_eq!(files_in(&d.join("skip")), ["db-disk0.qcow2", "db.xml"]);
    let xml = std::fs::read_to_string(d.join("skip/db.xml")).unwrap();
    assert_eq!(
        xml.matches("device='disk'").count() + xml.matches("device=\"disk\"").count(),
        1,
        "{xml}"
    );
    tool_ok(d, "virt-xml-validate", &["skip/db.xml", "domain"]);

    // Mapped to the KVM host's device: written as a block disk, not copied.
    let lun = "/dev/disk/by-id/wwn-0x600508b1001c4d5e";
    let map = format!("scsi0:1={lun}");
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "db.vmx",
            "--to",
            "libvirt",
            "--out",
            "map",
            "--map-device",
            &map,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("device-mapped"), "{}", text(&o));
    assert_eq!(files_in(&d.join("map")), ["db-disk0.qcow2", "db.xml"]);
    let xml = std::fs::read_to_string(d.join("map/db.xml")).unwrap();
    assert!(
        xml.contains(&format!("dev='{lun}'")) || xml.contains(&format!("dev=\"{lun}\"")),
        "{xml}"
    );
    assert!(
        xml.contains("type='block'") || xml.contains("type=\"block\""),
        "{xml}"
    );
    tool_ok(d, "virt-xml-validate", &["map/db.xml", "domain"]);
    tool_ok(d, "qemu-img", &["compare", "db.vmdk", "map/db-disk0.qcow2"]);

    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "db.vmx",
            "--to",
            "proxmox",
            "--vmid",
            "130",
            "--storage",
            "local",
            "--out",
            "px",
            "--map-device",
            &map,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let conf = std::fs::read_to_string(d.join("px/130.conf")).unwrap();
    assert!(
        conf.lines()
            .any(|l| l.starts_with("sata") && l.ends_with(&format!(": {lun}"))),
        "{conf}"
    );
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "db.vmx",
            "--to",
            "qemu-args",
            "--descriptor-only",
            "--out",
            "q",
            "--map-device",
            &map,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let sh = std::fs::read_to_string(d.join("q/db.sh")).unwrap();
    assert!(sh.contains(&format!("file={lun},format=raw")), "{sh}");
    // vm validate agrees with the choice.
    let o = vmshift(d, &["vm", "validate", "db.vmx", "--map-device", &map]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn device_choices_that_name_nothing_or_contradict_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rdm_vm(d);
    let run = |extra: &[&str]| {
        let mut a = vec!["vm", "convert", "db.vmx", "--to", "libvirt", "--out", "o"];
        a.extend_from_slice(extra);
        vmshift(d, &a)
    };
    let o = run(&["--skip-device", "scsi0:7"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("scsi0:0, scsi0:1"), "{}", text(&o));
    let o = run(&[
        "--skip-device",
        "scsi0:1",
        "--map-device",
        "scsi0:1=/dev/sdb",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("named twice"), "{}", text(&o));
    let o = run(&["--map-device", "sata0:0=/dev/sr0"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("CD-ROM"), "{}", text(&o));
    for bad in [
        "scsi0:1=sdb",
        "scsi0:1=/dev/../etc/shadow",
        "scsi0=/dev/sdb",
    ] {
        let o = run(&["--map-device", bad]);
        assert_eq!(o.status.code(), Some(1), "{bad}: {}", text(&o));
    }
    assert!(!d.join("o").exists());
}

#[test]
fn vm_boot_skips_devices_of_a_vm_and_only_of_a_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rdm_vm(d);
    let o = vmshift(d, &["vm", "boot", "db.vmdk", "--skip-device", "scsi0:1"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("give its descriptor"), "{}", text(&o));
    let o = vmshift(d, &["vm", "boot", "db.vmx", "--skip-device", "scsi3:0"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("scsi3:0: the VM has no device there"),
        "{}",
        text(&o)
    );
}

/// Runs a QEMU script vmshift wrote with the real qemu-system-x86_64,
/// stopped before the guest runs (`-S`), under TCG (`-cpu max`): QEMU
/// accepts every option and device, or says which it refuses. (The
/// console goes to null: stdio carries QMP.)
fn qemu_accepts(d: &Path, script: &str) {
    use std::io::Write;
    let bin = d.join("qemu-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nfor a do\n  shift\n  case \"$a\" in\n    *accel=kvm*) a=$(printf '%s' \"$a\" | sed 's/accel=kvm/accel=tcg/') ;;\n    host) a=max ;;\n    host,*) a=\"max${a#host}\" ;;\n    mon:stdio) a=null ;;\n  esac\n  set -- \"$@\" \"$a\"\ndone\nexec /usr/bin/qemu-system-x86_64 \"$@\" -S -display none -qmp stdio\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = std::process::Command::new("sh")
        .arg(script)
        .current_dir(d)
        .env("PATH", path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "QEMU refused {script}: {}", text(&o));
}

/// A Windows VM that boots from an NVMe disk, as vSphere makes them.
fn nvme_vm(d: &Path, guest: &str) {
    disk(d, "w.vmdk");
    std::fs::write(
        d.join("w.vmx"),
        format!("config.version = \"8\"\nvirtualHW.version = \"19\"\nguestOS = \"{guest}\"\ndisplayName = \"w\"\nmemsize = \"2048\"\nnvme0.present = \"TRUE\"\nnvme0:0.present = \"TRUE\"\nnvme0:0.fileName = \"w.vmdk\"\n"),
    )
    .unwrap();
}

#[test]
fn an_nvme_boot_disk_stays_nvme_where_the_target_has_it_and_a_move_says_what_windows_needs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    nvme_vm(d, "windows2019srv-64");

    // The QEMU script keeps NVMe, which QEMU runs; nothing to warn of.
    let o = vmshift(
        d,
        &["vm", "convert", "w.vmx", "--to", "qemu-args", "--out", "q"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("windows-boot-controller"),
        "{}",
        text(&o)
    );
    let sh = std::fs::read_to_string(d.join("q/w.sh")).unwrap();
    assert!(
        sh.contains("nvme,serial=vmshift-nvme0-0,drive=drive0"),
        "{sh}"
    );
    qemu_accepts(d, "q/w.sh");

    // libvirt 9.0's schema has no emulated NVMe, Proxmox no NVMe drive:
    // SATA, and the report says what the guest needs first.
    for (to, extra) in [
        ("libvirt", &[][..]),
        ("proxmox", &["--vmid", "140", "--storage", "local"][..]),
    ] {
        let mut args = vec![
            "vm",
            "convert",
            "w.vmx",
            "--to",
            to,
            "--descriptor-only",
            "--out",
            to,
        ];
        args.extend_from_slice(extra);
        let o = vmshift(d, &args);
        assert!(o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("windows-boot-controller"), "{t}");
        assert!(
            t.contains("nvme0:0 (stornvme) to sata0:0 (storahci)"),
            "{t}"
        );
        assert!(
            t.contains("Services\\storahci /v Start /t REG_DWORD /d 0"),
            "{t}"
        );
        assert!(t.contains("INACCESSIBLE_BOOT_DEVICE"), "{t}");
    }
    tool_ok(d, "virt-xml-validate", &["libvirt/w.xml", "domain"]);

    // The user's --virtio first: virtio-scsi, which needs virtio-win.
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "w.vmx",
            "--to",
            "libvirt",
            "--virtio",
            "--descriptor-only",
            "--out",
            "v",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("(vioscsi)") && text(&o).contains("virtio-win"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_linux_nvme_disk_goes_to_virtio_unless_models_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    nvme_vm(d, "debian12-64");
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "w.vmx",
            "--to",
            "qemu-args",
            "--descriptor-only",
            "--out",
            "q",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let sh = std::fs::read_to_string(d.join("q/w.sh")).unwrap();
    assert!(
        sh.contains("scsi-hd,bus=scsi0.0") && !sh.contains("nvme,"),
        "{sh}"
    );
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "w.vmx",
            "--to",
            "qemu-args",
            "--keep-models",
            "--descriptor-only",
            "--out",
            "k",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let sh = std::fs::read_to_string(d.join("k/w.sh")).unwrap();
    assert!(sh.contains("nvme,serial="), "{sh}");
    assert!(!text(&o).contains("windows-boot-controller"));
}

#[test]
fn workstation_default_vmnets_and_map_keys_as_vmware_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    disk(d, "w.vmdk");
    vmx(
        d,
        "w.vmx",
        "displayName = \"w\"\nmemsize = \"1024\"\nsata0.present = \"TRUE\"\nsata0:0.present = \"TRUE\"\nsata0:0.fileName = \"w.vmdk\"\n\
ethernet0.present = \"TRUE\"\nethernet0.connectionType = \"custom\"\nethernet0.vnet = \"vmnet0\"\nethernet0.addressType = \"static\"\nethernet0.address = \"00:50:56:00:00:11\"\n\
ethernet1.present = \"TRUE\"\nethernet1.connectionType = \"custom\"\nethernet1.vnet = \"/dev/vmnet1\"\nethernet1.addressType = \"static\"\nethernet1.address = \"00:50:56:00:00:12\"\n\
ethernet2.present = \"TRUE\"\nethernet2.connectionType = \"custom\"\nethernet2.vnet = \"vmnet8\"\nethernet2.addressType = \"static\"\nethernet2.address = \"00:50:56:00:00:13\"\n",
    );
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "w.vmx",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "o",
            "--bridge",
            "br0",
            "--network-map",
            "vmnet1=network:isolated",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    // vmnet0 is Workstation's bridged network, vmnet1 its host-only one
    // (named /dev/vmnet1 on Linux hosts), vmnet8 its NAT.
    assert!(t.contains("nics[0].network: vmnet0 → bridge br0"), "{t}");
    assert!(
        t.contains("nics[1].network: /dev/vmnet1 → network isolated"),
        "{t}"
    );
    assert!(
        t.contains("nics[2].network: vmnet8 → network default"),
        "{t}"
    );
    assert!(!t.contains("network-map-unused"), "{t}");
    // The same network twice, or a tag on a libvirt network: refused.
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "w.vmx",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "x",
            "--network-map",
            "nat=bridge:br1",
            "--network-map",
            "NAT=bridge:br2",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("mapped twice"), "{}", text(&o));
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "w.vmx",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "x",
            "--network-map",
            "nat=network:x,tag=5",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!d.join("x").exists());
}

#[test]
fn kept_scsi_models_reach_the_qemu_script_and_windows_hears_what_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    disk(d, "w.vmdk");
    for (model, device, warned) in [
        ("lsisas1068", "mptsas1068", false),
        ("pvscsi", "pvscsi", false),
        ("lsilogic", "lsi53c895a", true),
    ] {
        vmx(
            d,
            "w.vmx",
            &format!("displayName = \"w\"\nmemsize = \"1024\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"{model}\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"w.vmdk\"\n"),
        );
        let out = format!("q-{model}");
        let o = vmshift(
            d,
            &[
                "vm",
                "convert",
                "w.vmx",
                "--to",
                "qemu-args",
                "--keep-models",
                "--out",
                &out,
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let sh = std::fs::read_to_string(d.join(format!("{out}/w.sh"))).unwrap();
        assert!(sh.contains(&format!("{device},id=scsi0")), "{sh}");
        assert!(
            sh.contains("hv_relaxed") && sh.contains("hv_time"),
            "Hyper-V enlightenments for Windows: {sh}"
        );
        assert_eq!(
            text(&o).contains("windows-boot-controller"),
            warned,
            "{model}: {}",
            text(&o)
        );
        assert!(text(&o).contains("--keep-models"), "{}", text(&o));
        qemu_accepts(d, &format!("{out}/w.sh"));
    }
}
