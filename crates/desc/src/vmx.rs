//! VMware `.vmx`: read and write.
