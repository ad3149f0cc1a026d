//! The guest's boot entry read from disks built by the real tools:
//! `mke2fs -d` (no mount) into partitions made by `sfdisk`, wrapped as
//! qcow2 by `qemu-img`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vmshift_image::{open_image, ImageReader, OpenOptions};

fn run(dir: &Path, prog: &str, args: &[&str]) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e} (install it: it is the peer this test needs)"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A raw disk with one ext4 file system per (tree, MiB) given, each in an
/// MBR partition, the first at 1 MiB; returned as a qcow2 reader.
fn disk(dir: &Path, parts: &[(&Path, u64)]) -> Arc<dyn ImageReader> {
    let total: u64 = 1 + parts.iter().map(|p| p.1).sum::<u64>() + 1;
    let raw = dir.join("d.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(total << 20)
        .unwrap();
    let mut script = String::from("label: dos\n");
    for (_, mib) in parts {
        script.push_str(&format!("size={}MiB, type=83\n", mib));
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", raw.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk package)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut at = 1u64;
    for (i, (tree, mib)) in parts.iter().enumerate() {
        run(
            dir,
            "mke2fs",
            &[
                "-q",
                "-F",
                "-t",
                "ext4",
                "-U",
                &format!("00000000-0000-4000-8000-00000000000{}", i + 1),
                "-d",
                tree.to_str().unwrap(),
                "-E",
                &format!("offset={}", at << 20),
                "d.raw",
                &format!("{}k", mib << 10),
            ],
        );
        at += mib;
    }
    run(
        dir,
        "qemu-img",
        &["convert", "-O", "qcow2", "d.raw", "d.qcow2"],
    );
    Arc::from(open_image(&dir.join("d.qcow2"), None, &OpenOptions::default()).unwrap())
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[test]
fn debian_root_with_grub_cfg_in_boot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write(
        &root,
        "boot/grub/grub.cfg",
        b"set default=\"0\"\nmenuentry 'Debian GNU/Linux' --class debian {\n\tlinux\t/boot/vmlinuz-6.1 root=UUID=00000000-0000-4000-8000-000000000001 ro quiet\n\tinitrd\t/boot/initrd.img-6.1\n}\n",
    );
    write(&root, "boot/vmlinuz-6.1", &vec![0x4b; 300_000]);
    write(&root, "boot/initrd.img-6.1", &vec![0x49; 123_456]);
    let d = disk(dir.path(), &[(&root, 32)]);
    let e = vmshift_guest::find_boot_entry(&[d]).unwrap();
    assert_eq!(e.kernel_path, "/boot/vmlinuz-6.1");
    assert_eq!(e.kernel, vec![0x4b; 300_000]);
    assert_eq!(e.initrd.unwrap().1, vec![0x49; 123_456]);
    assert_eq!(
        e.cmdline,
        "root=UUID=00000000-0000-4000-8000-000000000001 ro quiet"
    );
    assert!(e.source == "/dev/sda1: /boot/grub/grub.cfg", "{}", e.source);
}

#[test]
fn separate_boot_partition_with_bls_entries() {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    let root = dir.path().join("root");
    write(
        &boot,
        "grub2/grub.cfg",
        b"set default=\"${saved_entry}\"\ninsmod blscfg\nblscfg\n",
    );
    write(
        &boot,
        "grub2/grubenv",
        b"# GRUB Environment Block\nkernelopts=root=/dev/mapper/rhel-root ro rd.lvm.lv=rhel/root\n",
    );
    write(
        &boot,
        "loader/entries/abc-4.18.0-425.el8.x86_64.conf",
        b"title old\nlinux /vmlinuz-4.18.0-425\ninitrd /initramfs-4.18.0-425.img\noptions $kernelopts\n",
    );
    write(
        &boot,
        "loader/entries/abc-4.18.0-477.el8.x86_64.conf",
        b"title RHEL 8.8\nlinux /vmlinuz-4.18.0-477\ninitrd /initramfs-4.18.0-477.img\noptions $kernelopts\n",
    );
    write(&boot, "vmlinuz-4.18.0-477", b"new kernel");
    write(&boot, "initramfs-4.18.0-477.img", b"new initramfs");
    write(&root, "etc/os-release", b"ID=rhel\n");
    let d = disk(dir.path(), &[(&boot, 16), (&root, 16)]);
    let e = vmshift_guest::find_boot_entry(&[d]).unwrap();
    assert_eq!(e.title, "RHEL 8.8");
    assert_eq!(e.kernel, b"new kernel");
    assert_eq!(
        e.cmdline,
        "root=/dev/mapper/rhel-root ro rd.lvm.lv=rhel/root"
    );
}

#[test]
fn a_disk_without_linux_says_what_it_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write(&root, "data.txt", b"nothing to boot");
    let d = disk(dir.path(), &[(&root, 16)]);
    let e = vmshift_guest::find_boot_entry(&[d])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no Linux boot configuration found"), "{e}");
    assert!(e.contains("--kernel"), "{e}");
}
