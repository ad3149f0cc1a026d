//! SIGINT/SIGTERM turn into a flag the copy engine polls, so an interrupted
//! convert stops between windows and removes its temp file instead of
//! leaving it behind.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when the user interrupts (Ctrl-C) or the process is asked to stop.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM. Only commands that poll
/// [`INTERRUPTED`] may install it.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `action` is fully initialised (zeroed, then the
        // handler and an empty mask set) before sigaction reads it.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}
