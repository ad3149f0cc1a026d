//! libvirt domain XML: read and write.
