//! `vmshift guest`: file systems and files read offline from a guest's
//! disks, compared with what the peers read from the same bytes — blkid
//! for types, UUIDs and labels, debugfs for ext4 listings, mtools for FAT.

use std::path::Path;

use vmshift_tests::{finding_codes, json, tool_ok, virt_inspector_agrees, vmshift, vmshift_ok};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sh(d: &Path, script: &str) {
    tool_ok(d, "sh", &["-c", script]);
}

/// A GPT disk: an ESP (FAT32, long names) and an ext4 root made from a
/// folder (`mke2fs -d`), with symlinks absolute and relative.
fn guest_disk(d: &Path) {
    sh(
        d,
        "set -e
        mkdir -p root/etc root/usr/bin root/boot
        echo 'PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"' > root/etc/os-release
        echo myhost > root/etc/hostname
        ln -s ../usr/bin root/bin
        ln -s /etc/hostname root/hn
        seq 1 100000 > root/usr/bin/big
        printf 'x' > root/usr/bin/one
        mke2fs -q -t ext4 -L rootfs -d root root.img 32M
        truncate -s 34M esp.img
        mkfs.fat -F 32 -n ESP esp.img >/dev/null
        mmd -i esp.img ::/EFI ::/EFI/BOOT ::/EFI/debian
        echo bootx64 > bx
        mcopy -i esp.img bx ::/EFI/BOOT/BOOTX64.EFI
        seq 1 50000 > long.txt
        mcopy -i esp.img long.txt ::/EFI/debian/grub-config-with-a-long-name.cfg
        truncate -s 80M disk.raw
        printf 'label: gpt\\nstart=2048, size=69632, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\nstart=71680, size=65536, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\\n' | sfdisk -q disk.raw
        dd if=esp.img of=disk.raw bs=512 seek=2048 conv=notrunc status=none
        dd if=root.img of=disk.raw bs=512 seek=71680 conv=notrunc status=none
        qemu-img convert -O qcow2 disk.raw disk.qcow2",
    );
}

/// `blkid -o export` of a file, as KEY=VALUE pairs.
fn blkid(d: &Path, file: &str) -> std::collections::HashMap<String, String> {
    let out = tool_ok(d, "blkid", &["-o", "export", file]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn file_systems_are_found_and_named_as_blkid_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    guest_disk(d);
    let v = json(
        vmshift_ok(
            d,
            &["guest", "filesystems", "--output", "json", "disk.qcow2"],
        )
        .as_bytes(),
    );
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    for (entry, (dev, file)) in list
        .iter()
        .zip([("/dev/sda1", "esp.img"), ("/dev/sda2", "root.img")])
    {
        let b = blkid(d, file);
        assert_eq!(entry["name"], dev);
        assert_eq!(entry["type"], b["TYPE"].as_str(), "{entry}");
        assert_eq!(entry["uuid"], b["UUID"].as_str(), "{entry}");
        assert_eq!(entry["label"], b["LABEL"].as_str(), "{entry}");
        assert_eq!(entry["readable"], true);
    }
    assert_eq!(list[1]["size"], 32 << 20);
}

/// (mode, size, name) of every entry `debugfs -R 'ls -p DIR'` lists.
fn debugfs_ls(d: &Path, dir: &str) -> Vec<(u32, u64, String)> {
    let out = tool_ok(d, "debugfs", &["-R", &format!("ls -p {dir}"), "root.img"]);
    let mut v: Vec<(u32, u64, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('/').collect();
            (f.len() >= 7).then(|| {
                (
                    u32::from_str_radix(f[2], 8).unwrap(),
                    f[6].parse().unwrap_or(0),
                    f[5].to_string(),
                )
            })
        })
        .filter(|(_, _, n)| n != "." && n != "..")
        .collect();
    v.sort_by(|a, b| a.2.cmp(&b.2));
    v
}

/// (mode, size, name) from `vmshift guest ls -l`.
fn our_ls(d: &Path, image: &str, dir: &str) -> Vec<(u32, u64, String)> {
    let out = vmshift_ok(d, &["guest", "ls", "-l", image, dir]);
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let m = f[0];
            let kind = match m.as_bytes()[0] {
                b'd' => 0o040000,
                b'l' => 0o120000,
                _ => 0o100000,
            };
            let perm = m[1..].chars().enumerate().fold(0u32, |acc, (i, c)| {
                if c != '-' {
                    acc | (0o400 >> i)
                } else {
                    acc
                }
            });
            // A directory's size is its blocks; debugfs prints none.
            let size = if kind == 0o040000 {
                0
            } else {
                f[1].parse().unwrap()
            };
            (kind | perm, size, f[4].to_string())
        })
        .collect()
}

#[test]
fn ext4_listings_and_files_match_debugfs_and_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    guest_disk(d);
    for path in ["/", "/etc", "/usr/bin"] {
        let mut theirs = debugfs_ls(d, path);
        for t in &mut theirs {
            if t.0 & 0o170000 == 0o040000 {
                t.1 = 0;
            }
        }
        assert_eq!(our_ls(d, "disk.qcow2", path), theirs, "{path}");
        // The same through the file system's own name.
        assert_eq!(
            our_ls(d, "disk.qcow2", &format!("/dev/sda2:{path}")),
            theirs,
            "{path}"
        );
    }
    let cat = |p: &str| {
        let o = vmshift(d, &["guest", "cat", "disk.qcow2", p]);
        assert!(o.status.success(), "{p}: {}", text(&o));
        o.stdout
    };
    assert_eq!(
        cat("/usr/bin/big"),
        std::fs::read(d.join("root/usr/bin/big")).unwrap()
    );
    assert_eq!(
        cat("/etc/os-release"),
        std::fs::read(d.join("root/etc/os-release")).unwrap()
    );
    // Symlinks resolve inside the guest: an absolute one at the guest's
    // root, a relative one to its directory.
    assert_eq!(cat("/hn"), b"myhost\n");
    assert_eq!(cat("/bin/one"), b"x");
    let long = vmshift_ok(d, &["guest", "ls", "-l", "disk.qcow2", "/"]);
    assert!(
        long.contains("hn -> /etc/hostname") && long.contains("bin -> ../usr/bin"),
        "{long}"
    );
    // What is not there is said, with its path.
    let o = vmshift(d, &["guest", "cat", "disk.qcow2", "/etc/nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("/etc/nope"), "{}", text(&o));
    let o = vmshift(d, &["guest", "ls", "disk.qcow2", "etc"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("absolute"), "{}", text(&o));
}

#[test]
fn fat_listings_and_files_match_mtools_and_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    guest_disk(d);
    for path in ["/EFI", "/EFI/debian", "/EFI/BOOT"] {
        let out = tool_ok(d, "mdir", &["-b", "-i", "esp.img", &format!("::{path}")]);
        let mut theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                l.trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        theirs.sort();
        let ours: Vec<String> = vmshift_ok(
            d,
            &["guest", "ls", "disk.qcow2", &format!("/dev/sda1:{path}")],
        )
        .lines()
        .map(str::to_string)
        .collect();
        assert_eq!(ours, theirs, "{path}");
    }
    let o = vmshift(
        d,
        &[
            "guest",
            "cat",
            "disk.qcow2",
            "/dev/sda1:/EFI/debian/grub-config-with-a-long-name.cfg",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(o.stdout, std::fs::read(d.join("long.txt")).unwrap());
    // FAT compares names without regard to case, and knows short names.
    let o = vmshift(
        d,
        &[
            "guest",
            "cat",
            "disk.qcow2",
            "/dev/sda1:/efi/boot/bootx64.efi",
        ],
    );
    assert_eq!(o.stdout, b"bootx64\n", "{}", text(&o));
    let o = vmshift(
        d,
        &[
            "guest",
            "cat",
            "disk.qcow2",
            "/dev/sda1:/EFI/debian/GRUB-C~1.CFG",
        ],
    );
    assert_eq!(
        o.stdout.len(),
        std::fs::metadata(d.join("long.txt")).unwrap().len() as usize
    );
}

#[test]
fn a_vm_descriptor_names_the_disks_and_damage_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    guest_disk(d);
    std::fs::write(
        d.join("g.vmx"),
        "config.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"g\"\nmemsize = \"1024\"\nguestOS = \"debian12-64\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"disk.qcow2\"\n",
    )
    .unwrap();
    assert_eq!(
        vmshift_ok(d, &["guest", "cat", "g.vmx", "/etc/hostname"]),
        "myhost\n"
    );
    // A FAT whose file's cluster chain loops back on itself.
    sh(d, "cp esp.img loop.img");
    let mut img = std::fs::read(d.join("loop.img")).unwrap();
    let bps = u16::from_le_bytes([img[11], img[12]]) as usize;
    let reserved = u16::from_le_bytes([img[14], img[15]]) as usize;
    let fat = reserved * bps;
    // The long file is the largest chain: find a cluster whose entry
    // points to the next one, and point it at itself.
    let entries: Vec<u32> = img[fat..fat + 4 * 4096]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) & 0x0fff_ffff)
        .collect();
    let (n, _) = entries
        .iter()
        .enumerate()
        .skip(3)
        .find(|(i, &v)| v == *i as u32 + 1)
        .expect("a chained cluster");
    img[fat + n * 4..fat + n * 4 + 4].copy_from_slice(&(n as u32).to_le_bytes());
    std::fs::write(d.join("loop.img"), &img).unwrap();
    let o = vmshift(
        d,
        &[
            "guest",
            "cat",
            "-f",
            "raw",
            "loop.img",
            "/EFI/debian/grub-config-with-a-long-name.cfg",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cluster chain"), "{}", text(&o));
}

/// A Debian-style guest: ESP and ext4 root, an fstab by UUID with a
/// mount on a disk that is not there, a kernel and initramfs, VMware
/// Tools, a netplan file naming ens192, a real x86-64 binary.
fn debian_guest(d: &Path) {
    sh(
        d,
        "set -e
        mkdir -p root/etc/netplan root/bin root/boot/efi root/var/lib/dpkg root/usr/bin
        printf 'PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\\nNAME=\"Debian GNU/Linux\"\\nVERSION_ID=\"12\"\\nID=debian\\n' > root/etc/os-release
        echo 12.5 > root/etc/debian_version
        echo web01 > root/etc/hostname
        : > root/var/lib/dpkg/status
        cp /bin/ls root/bin/ls
        echo k > root/boot/vmlinuz-6.1.0-18-amd64
        # The initramfs as Debian packs it: an uncompressed early-microcode
        # archive, then the main one (here zstd), with no virtio driver.
        mkdir -p early/kernel/x86/microcode main/usr/lib/modules/6.1.0-18-amd64/kernel/drivers/scsi main/usr/bin
        echo ucode > early/kernel/x86/microcode/GenuineIntel.bin
        echo m > main/usr/lib/modules/6.1.0-18-amd64/kernel/drivers/scsi/vmw_pvscsi.ko
        cp /bin/ls main/usr/bin/ls
        (cd early && find . | cpio -o -H newc --quiet) > root/boot/initrd.img-6.1.0-18-amd64
        (cd main && find . | cpio -o -H newc --quiet) | zstd -q -19 >> root/boot/initrd.img-6.1.0-18-amd64
        echo t > root/usr/bin/vmtoolsd
        printf 'network:\\n  ethernets:\\n    ens192:\\n      dhcp4: true\\n' > root/etc/netplan/01-netcfg.yaml
        truncate -s 34M esp.img
        mkfs.fat -F 32 -n ESP esp.img >/dev/null
        esp=$(blkid -o value -s UUID esp.img)
        printf 'UUID=0f3c3b1e-1d2a-4c5b-9e8f-0a1b2c3d4e5f / ext4 defaults 0 1\\nUUID=%s /boot/efi vfat umask=0077 0 1\\n/dev/sdb1 /srv ext4 defaults 0 2\\n' $esp > root/etc/fstab
        mke2fs -q -t ext4 -L root -U 0f3c3b1e-1d2a-4c5b-9e8f-0a1b2c3d4e5f -d root root.img 32M
        truncate -s 80M disk.raw
        printf 'label: gpt\\nstart=2048, size=69632, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\nstart=71680, size=65536, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\\n' | sfdisk -q disk.raw
        dd if=esp.img of=disk.raw bs=512 seek=2048 conv=notrunc status=none
        dd if=root.img of=disk.raw bs=512 seek=71680 conv=notrunc status=none
        qemu-img convert -O qcow2 disk.raw disk.qcow2",
    );
}

#[test]
fn inspection_agrees_with_virt_inspector() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    debian_guest(d);
    let v = json(vmshift_ok(d, &["guest", "inspect", "--output", "json", "disk.qcow2"]).as_bytes());
    let os = &v["operatingsystems"][0];
    virt_inspector_agrees(d, &["disk.qcow2"], os);
    // And what will trip the migration.
    let codes = finding_codes(os);
    assert_eq!(
        codes,
        [
            "guest-fstab-device-name",
            "guest-initramfs-no-virtio",
            "guest-vmware-tools",
            "guest-net-config-names-nic"
        ]
    );
    assert_eq!(
        os["kernels"][0]["initramfs_archives"],
        serde_json::json!(["none", "zstd"])
    );
    assert!(os["findings"][1]["message"]
        .as_str()
        .unwrap()
        .contains("update-initramfs -u"));
    assert!(os["findings"][3]["message"]
        .as_str()
        .unwrap()
        .contains("ens192"));
    assert_eq!(
        os["kernels"][0]["initramfs"],
        "/boot/initrd.img-6.1.0-18-amd64"
    );
}

#[test]
fn an_initramfs_with_virtio_drivers_is_seen_to_have_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    debian_guest(d);
    // The same guest with a gzip initramfs that carries virtio (as
    // modules; virtio_pci built into the kernel, as modules.builtin says).
    sh(
        d,
        "set -e
        rm -rf main2 && mkdir -p main2/usr/lib/modules/6.1.0-18-amd64/kernel/drivers/block main2/usr/lib/modules/6.1.0-18-amd64/kernel/drivers/scsi
        echo m > main2/usr/lib/modules/6.1.0-18-amd64/kernel/drivers/block/virtio_blk.ko.xz
        echo m > main2/usr/lib/modules/6.1.0-18-amd64/kernel/drivers/scsi/virtio_scsi.ko.xz
        (cd main2 && find . | cpio -o -H newc --quiet) | gzip > root/boot/initrd.img-6.1.0-18-amd64
        mkdir -p root/lib/modules/6.1.0-18-amd64
        echo kernel/drivers/virtio/virtio_pci.ko > root/lib/modules/6.1.0-18-amd64/modules.builtin
        rm -f root.img
        mke2fs -q -t ext4 -L root -U 0f3c3b1e-1d2a-4c5b-9e8f-0a1b2c3d4e5f -d root root.img 32M
        dd if=root.img of=disk.raw bs=512 seek=71680 conv=notrunc status=none
        rm -f disk.qcow2 && qemu-img convert -O qcow2 disk.raw disk.qcow2",
    );
    let v = json(vmshift_ok(d, &["guest", "inspect", "--output", "json", "disk.qcow2"]).as_bytes());
    let os = &v["operatingsystems"][0];
    assert_eq!(
        os["kernels"][0]["virtio_drivers"],
        serde_json::json!(["virtio_blk", "virtio_pci", "virtio_scsi"])
    );
    assert_eq!(
        os["kernels"][0]["initramfs_archives"],
        serde_json::json!(["gzip"])
    );
    let codes = finding_codes(os);
    assert!(
        !codes.iter().any(|c| c == "guest-initramfs-no-virtio"),
        "{codes:?}"
    );
}

#[test]
fn vm_validate_and_convert_say_what_the_guest_will_trip_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    debian_guest(d);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "vmdk", "disk.raw", "web.vmdk"],
    );
    std::fs::write(
        d.join("web.vmx"),
        "config.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"web\"\nmemsize = \"1024\"\nguestOS = \"debian12-64\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"web.vmdk\"\n",
    )
    .unwrap();
    let o = vmshift(d, &["vm", "validate", "web.vmx"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    for code in [
        "guest-initramfs-no-virtio",
        "guest-vmware-tools",
        "guest-fstab-device-name",
        "guest-net-config-names-nic",
    ] {
        assert!(t.contains(code), "{code}: {t}");
    }
    assert!(t.contains("guest:/dev/sda2"), "{t}");
    let o = vmshift(
        d,
        &[
            "vm",
            "convert",
            "web.vmx",
            "--to",
            "libvirt",
            "--descriptor-only",
            "--out",
            "o",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("guest-initramfs-no-virtio"),
        "{}",
        text(&o)
    );
}

#[test]
fn an_encrypted_volume_is_named_and_crypttab_mounts_resolve_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "set -e
        truncate -s 20M luks.img
        printf pw | cryptsetup luksFormat -q --type luks2 --label secret --pbkdf pbkdf2 --pbkdf-force-iterations 1000 luks.img -
        uuid=$(blkid -s UUID -o value luks.img)
        mkdir -p root/etc root/data
        echo 'ID=debian' > root/etc/os-release
        printf 'data UUID=%s none luks\\n' \"$uuid\" > root/etc/crypttab
        printf 'LABEL=root / ext4 defaults 0 1\\n/dev/mapper/data /data ext4 defaults 0 2\\n' > root/etc/fstab
        mke2fs -q -t ext4 -L root -d root root.img 16M
        truncate -s 40M disk.raw
        printf 'label: gpt\\nstart=2048, size=32768\\nstart=34816, size=40960\\n' | sfdisk -q disk.raw
        dd if=root.img of=disk.raw bs=512 seek=2048 conv=notrunc status=none
        dd if=luks.img of=disk.raw bs=512 seek=34816 conv=notrunc status=none",
    );
    let peer = blkid(d, "luks.img");
    let fs =
        json(vmshift_ok(d, &["guest", "filesystems", "--output", "json", "disk.raw"]).as_bytes());
    let luks = fs
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "/dev/sda2")
        .unwrap()
        .clone();
    assert_eq!(luks["type"], peer["TYPE"].as_str());
    assert_eq!(luks["uuid"], peer["UUID"].as_str());
    assert_eq!(luks["label"], peer["LABEL"].as_str());
    assert_eq!(luks["readable"], false);
    let v = json(vmshift_ok(d, &["guest", "inspect", "--output", "json", "disk.raw"]).as_bytes());
    let os = &v["operatingsystems"][0];
    let data = os["mountpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"] == "/data")
        .unwrap();
    assert_eq!(data["device"], "/dev/sda2");
    assert!(os["unknown"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u.as_str().unwrap().contains("encrypted (LUKS)")));
}
