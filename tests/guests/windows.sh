#!/usr/bin/env bash
# Builds a Windows-style guest disk as a VMware VM leaves it, with Linux's
# own mkfs.fat and ntfs-3g (libguestfs's appliance: no root, mount or loop
# device here) and registry hives written by hivexsh: there is no Windows
# image to use. windows.raw (GPT):
#   1: EFI system partition (FAT32) with \EFI\Microsoft\Boot\bootmgfw.efi
#   2: Microsoft reserved partition
#   3: C: (NTFS): \Windows\System32\config\{SOFTWARE,SYSTEM}, cmd.exe (a
#      PE32+ x86-64 header), the driver store, VMware Tools, and an active
#      hiberfil.sys (Fast Startup).
# SYSTEM starts LSI_SAS and pvscsi at boot, storahci on demand, and has no
# VirtIO driver: moved to another controller it cannot find its disk.
# Usage: windows.sh DIR   (writes DIR/windows.raw and DIR/src/)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
d=$1
mkdir -p "$d/src"
cd "$d/src"
python3 "$here/mkhive.py" SOFTWARE
python3 "$here/mkhive.py" SYSTEM
hivexsh -w SOFTWARE <<'EOF'
add Microsoft
cd Microsoft
add Windows NT
cd Windows NT
add CurrentVersion
cd CurrentVersion
setval 10
ProductName
string:Windows Server 2022 Standard
EditionID
string:ServerStandard
InstallationType
string:Server
CurrentVersion
string:6.3
CurrentMajorVersionNumber
dword:10
CurrentMinorVersionNumber
dword:0
CurrentBuildNumber
string:20348
CurrentBuild
string:20348
SystemRoot
string:C:\Windows
PathName
string:C:\Windows
cd \
add VMware, Inc.
cd VMware, Inc.
add VMware Tools
cd VMware Tools
setval 1
InstallPath
string:C:\Program Files\VMware\VMware Tools\
commit
EOF
# Services: name, Start (0 boot, 1 system, 2 automatic, 3 on demand,
# 4 disabled), driver file.
services="LSI_SAS:0:lsi_sas.sys pvscsi:0:pvscsi.sys storahci:3:storahci.sys stornvme:3:stornvme.sys vmxnet3ndis6:3:vmxnet3.sys atapi:3:atapi.sys"
{
    echo "add Select"; echo "cd Select"; echo "setval 3"
    echo "Current"; echo "dword:1"; echo "Default"; echo "dword:1"; echo "LastKnownGood"; echo "dword:1"
    echo "cd \\"; echo "add ControlSet001"; echo "cd ControlSet001"; echo "add Control"; echo "add Services"
    echo "cd Control"; echo "add ComputerName"; echo "cd ComputerName"; echo "add ComputerName"; echo "cd ComputerName"
    echo "setval 1"; echo "ComputerName"; echo "string:WIN-MIGRATE01"
    echo "cd \\ControlSet001\\Services"
    for s in $services; do
        IFS=: read -r name start file <<< "$s"
        echo "add $name"; echo "cd $name"; echo "setval 4"
        echo "Start"; echo "dword:$start"
        echo "Type"; echo "dword:1"
        echo "ImagePath"; echo "expandstring:System32\\drivers\\$file"
        echo "Group"; echo "string:SCSI miniport"
        echo "cd .."
    done
    echo "add Tcpip"; echo "cd Tcpip"; echo "add Parameters"; echo "cd Parameters"
    echo "setval 1"; echo "Hostname"; echo "string:WIN-MIGRATE01"
    echo "commit"
} | hivexsh -w SYSTEM
# cmd.exe: a PE32+ x86-64 console header (what file(1) and libguestfs
# read an architecture from).
python3 - <<'EOF'
import struct
b = bytearray(1024)
b[0:2] = b"MZ"
struct.pack_into("<I", b, 0x3C, 0x80)
b[0x80:0x84] = b"PE\0\0"
struct.pack_into("<HHIIIHH", b, 0x84, 0x8664, 0, 0, 0, 0, 0xF0, 0x22)
struct.pack_into("<H", b, 0x98, 0x20B)
struct.pack_into("<H", b, 0x98 + 68, 3)
open("cmd.exe", "wb").write(b)
EOF
# An active hibernation file: "HIBR" (Windows 8 and later, hibernation
# and Fast Startup).
{ printf 'HIBR'; head -c 65532 /dev/zero; } > hiberfil.sys
echo "EFI application" > bootmgfw.efi
cd ..
truncate -s 1G windows.raw
guestfish --rw -a windows.raw <<'EOF'
run
part-init /dev/sda gpt
part-add /dev/sda p 2048 206847
part-add /dev/sda p 206848 239615
part-add /dev/sda p 239616 -34
part-set-gpt-type /dev/sda 1 C12A7328-F81F-11D2-BA4B-00A0C93EC93B
part-set-gpt-type /dev/sda 2 E3C9E316-0B5C-4DB8-817D-F92DF00215AE
part-set-gpt-type /dev/sda 3 EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
mkfs vfat /dev/sda1
mkfs ntfs /dev/sda3
set-label /dev/sda3 Windows
mount /dev/sda3 /
mkdir-p /Windows/System32/config
mkdir-p /Windows/System32/drivers
mkdir-p "/Windows/System32/DriverStore/FileRepository/pvscsi.inf_amd64_3a3f1e3ec6b7a2f5"
mkdir-p "/Windows/System32/DriverStore/FileRepository/vmxnet3.inf_amd64_0a9b7f3e2b1c4d5e"
mkdir-p "/Windows/System32/DriverStore/FileRepository/stornvme.inf_amd64_e1a0c0a4e5c7b8d9"
mkdir-p "/Program Files/VMware/VMware Tools"
upload src/SOFTWARE /Windows/System32/config/SOFTWARE
upload src/SYSTEM /Windows/System32/config/SYSTEM
upload src/cmd.exe /Windows/System32/cmd.exe
upload src/cmd.exe /Windows/System32/ntoskrnl.exe
upload src/cmd.exe "/Program Files/VMware/VMware Tools/vmtoolsd.exe"
upload src/hiberfil.sys /hiberfil.sys
umount-all
mount /dev/sda1 /
mkdir-p /EFI/Microsoft/Boot
mkdir-p /EFI/Boot
upload src/bootmgfw.efi /EFI/Microsoft/Boot/bootmgfw.efi
upload src/bootmgfw.efi /EFI/Boot/bootx64.efi
umount-all
EOF
