//! OVF descriptors and OVA archives: read.
