#!/usr/bin/env bash
# Builds a RHEL-style guest on two disks, with Linux's own XFS and LVM
# (libguestfs's appliance, under TCG: no root, mount or loop device here):
#   disk 1 (rhel1.raw): MBR, sda1 /boot (XFS), sda2 an LVM PV;
#   disk 2 (rhel2.raw): a whole-disk LVM PV;
# and what Linux's own tools read there, for the tests to compare with:
# src/xfs_db.txt (xfs_db ls and the B+tree file's inode), src/lvs.txt
# (lvs), src/blkid.txt (blkid of the volumes), src/frag (the file's
# bytes).
#   VG "rhel": data (striped over both PVs, ext4), root (linear, spanning
#   both PVs, XFS), swap, and mirror (raid1, which vmshift names unread).
# The root holds RHEL's release files, an fstab naming /dev/mapper paths,
# BootLoaderSpec entries, a dracut-style initramfs without virtio, and XFS
# structures mkfs's proto files cannot make: a node-form directory, a file
# whose extent map is a B+tree, and a remote symlink, all written by Linux.
# Usage: rhel-lvm.sh DIR   (writes DIR/rhel1.raw, DIR/rhel2.raw, DIR/src/)
set -euo pipefail
d=$1
mkdir -p "$d/src/initrd/usr/lib/modules/5.14.0-362.el9.x86_64/kernel/drivers/scsi" "$d/src/initrd/usr/lib/dracut"
cd "$d"
kver=5.14.0-362.el9.x86_64
cat > src/os-release <<'EOF'
NAME="Red Hat Enterprise Linux"
VERSION="9.3 (Plow)"
ID="rhel"
ID_LIKE="fedora"
VERSION_ID="9.3"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Red Hat Enterprise Linux 9.3 (Plow)"
EOF
echo "Red Hat Enterprise Linux release 9.3 (Plow)" > src/redhat-release
echo "rhel9.example.com" > src/hostname
cat > src/fstab <<'EOF'
/dev/mapper/rhel-root   /       xfs     defaults        0 0
UUID=3f0c2a55-7e0b-4f51-9e3c-2d1f6c1b9a01 /boot xfs defaults 0 0
/dev/mapper/rhel-data   /data   ext4    defaults        0 0
/dev/mapper/rhel-swap   none    swap    defaults        0 0
EOF
cat > src/entry.conf <<EOF
title Red Hat Enterprise Linux ($kver) 9.3 (Plow)
version $kver
linux /vmlinuz-$kver
initrd /initramfs-$kver.img \$tuned_initrd
options root=/dev/mapper/rhel-root ro resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap
grub_users \$grub_users
grub_arg --unrestricted
grub_class rhel
EOF
printf 'VMware pvscsi only\n' > "src/initrd/usr/lib/modules/$kver/kernel/drivers/scsi/vmw_pvscsi.ko.xz"
: > src/initrd/usr/lib/dracut/hostonly-files
(cd src/initrd && find . | cpio -o -H newc --quiet | gzip -9) > src/initramfs.img
head -c 4096 /dev/zero > src/vmlinuz
cp /bin/ls src/ls
truncate -s 1200M rhel1.raw
truncate -s 300M rhel2.raw
# Run inside the appliance, where the root is mounted at /sysroot: a
# node-form directory, and a file of 200 separate 4 KiB pieces (more
# extents than an inode holds: a B+tree).
cat > src/inside.sh <<'EOF'
set -e
mkdir /sysroot/many
for i in $(seq 1 3000); do : > /sysroot/many/file-$i; done
for i in $(seq 0 199); do
    dd if=/dev/urandom of=/sysroot/frag bs=4096 count=1 seek=$((i * 2)) conv=notrunc status=none
done
sync
EOF
printf '# GRUB Environment Block\nkernelopts=root=/dev/mapper/rhel-root ro\n' > src/grubenv
printf 'on a striped volume\n' > src/hello
printf 'set default="${saved_entry}"\ninsmod blscfg\nblscfg\n' > src/grub.cfg
# What Linux's tools read, run in the appliance with the XFS root not
# mounted (the script itself sits on the ext4 volume).
cat > src/peers.sh <<'EOF'
case $1 in
xfs) xfs_db -r -c 'ls /many' -c 'ls /' -c 'path /frag' -c 'print core.format core.size' /dev/rhel/root ;;
lvs) lvm lvs --noheadings --units b --nosuffix -o lv_name,lv_size,segtype rhel ;;
blkid) blkid -o export /dev/sda1 /dev/rhel/root /dev/rhel/data /dev/rhel/swap ;;
esac
EOF
long=$(printf '../.%.0s/' $(seq 1 150))
guestfish --rw -a rhel1.raw -a rhel2.raw <<EOF
run
part-init /dev/sda mbr
part-add /dev/sda p 2048 657407
part-add /dev/sda p 657408 -1
part-set-mbr-id /dev/sda 2 0x8e
pvcreate /dev/sda2
pvcreate /dev/sdb
vgcreate rhel "/dev/sda2 /dev/sdb"
debug sh "lvm lvcreate -y --type striped -i 2 -I 64k -L 64M -n data rhel"
lvcreate swap rhel 32
debug sh "lvm lvcreate -y --type raid1 -m 1 -L 8M -n mirror rhel"
lvcreate-free root rhel 100
mkfs xfs /dev/sda1
set-uuid /dev/sda1 3f0c2a55-7e0b-4f51-9e3c-2d1f6c1b9a01
mkfs xfs /dev/rhel/root
mkfs ext4 /dev/rhel/data
set-label /dev/rhel/data data
mkswap /dev/rhel/swap
mount /dev/rhel/root /
mkdir-p /boot
mount /dev/sda1 /boot
mkdir-p /etc
mkdir-p /usr/bin
mkdir-p /var/lib/rpm
mkdir-p /usr/lib/modules/$kver
mkdir-p /boot/loader/entries
mkdir-p /boot/grub2
mkdir-p /data
upload src/os-release /etc/os-release
upload src/redhat-release /etc/redhat-release
upload src/hostname /etc/hostname
upload src/fstab /etc/fstab
upload src/ls /usr/bin/ls
ln-s usr/bin /bin
upload src/entry.conf /boot/loader/entries/0123456789abcdef-$kver.conf
upload src/initramfs.img /boot/initramfs-$kver.img
upload src/vmlinuz /boot/vmlinuz-$kver
upload src/grubenv /boot/grub2/grubenv
upload src/grub.cfg /boot/grub2/grub.cfg
upload src/inside.sh /inside.sh
debug sh "sh /sysroot/inside.sh"
rm /inside.sh
ln-s /$long/etc/hostname /longlink
mount /dev/rhel/data /data
upload src/hello /data/hello
download /frag src/frag
umount-all
mount /dev/rhel/data /
upload src/peers.sh /peers.sh
debug sh "sh /sysroot/peers.sh xfs" | cat > src/xfs_db.txt
debug sh "sh /sysroot/peers.sh lvs" | cat > src/lvs.txt
debug sh "sh /sysroot/peers.sh blkid" | cat > src/blkid.txt
rm /peers.sh
umount-all
EOF
