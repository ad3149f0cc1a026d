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
            assert_eq!(o.status.code(), Some(2), "{id}: {}", text(&o));
            assert!(text(&o).contains("100..=999999999"), "{}", text(&o));
        }
    }
}
