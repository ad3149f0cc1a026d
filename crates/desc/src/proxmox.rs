//! Proxmox VE `qemu-server` `.conf`: read and write.
