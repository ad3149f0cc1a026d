//! The verdict on real console logs (see tests/consoles/README.md), fed
//! in the small pieces a serial port delivers.

use vmshift_kvm::{FailureCause, Verdict, Watcher};

fn verdict(log: &[u8]) -> Option<Verdict> {
    let mut w = Watcher::new(None).unwrap();
    for chunk in log.chunks(7) {
        if let Some(v) = w.feed(chunk) {
            return Some(v.clone());
        }
    }
    None
}

#[test]
fn debian_systemd_boot_is_booted_at_the_multi_user_target() {
    let log = include_bytes!("consoles/debian12-systemd-multi-user.log");
    match verdict(log) {
        Some(Verdict::Booted { line }) => {
            assert!(
                line.contains("Reached target multi-user.target - Multi-User System"),
                "{line}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn initramfs_without_virtio_is_root_not_found_at_gave_up() {
    let log = include_bytes!("consoles/debian12-initramfs-tools-no-virtio.log");
    match verdict(log) {
        Some(Verdict::Failed { cause, line }) => {
            assert_eq!(cause, FailureCause::RootNotFound);
            assert!(
                line.starts_with("Gave up waiting for root file system device"),
                "{line}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_boot_cut_before_user_space_has_no_verdict() {
    let log = include_bytes!("consoles/debian12-systemd-multi-user.log");
    let text = String::from_utf8_lossy(log);
    let cut = text.find("Reached target").unwrap();
    assert_eq!(verdict(text[..cut].as_bytes()), None);
}
