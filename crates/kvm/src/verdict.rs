//! Reading the guest's console for the boot verdict.
//!
//! The [`Watcher`] is fed the bytes the guest writes to its serial port and
//! decides, as soon as the console says so, whether user space came up
//! ([`Verdict::Booted`]) or the boot failed ([`Verdict::Failed`], with the
//! class of the cause). It knows nothing of KVM, so it is tested on real
//! console logs.

use regex::Regex;
use serde::Serialize;

/// The longest console line the watcher keeps; longer lines are cut (the
/// patterns all fit well within it).
const MAX_LINE: usize = 4096;

/// Why a boot failed, as far as the console tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureCause {
    /// The initramfs never found the root device (a missing storage driver
    /// after a controller change is the usual reason).
    RootNotFound,
    /// The root device was found but could not be mounted.
    RootMountFailed,
    /// The kernel panicked.
    KernelPanic,
    /// systemd or dracut dropped to an emergency shell.
    EmergencyShell,
    /// The guest reset or triple-faulted before user space came up.
    Reset,
    /// The guest powered off before user space came up.
    PowerOff,
    /// The virtual machine itself stopped (a KVM error).
    VmError,
    /// The probe guest could not read a disk.
    ProbeError,
}

impl FailureCause {
    /// A short phrase for reports.
    pub fn describe(self) -> &'static str {
        match self {
            FailureCause::RootNotFound => "root device not found",
            FailureCause::RootMountFailed => "root file system could not be mounted",
            FailureCause::KernelPanic => "kernel panic",
            FailureCause::EmergencyShell => "dropped to an emergency shell",
            FailureCause::Reset => "the guest reset before user space came up",
            FailureCause::PowerOff => "the guest powered off before user space came up",
            FailureCause::VmError => "the virtual machine stopped with an error",
            FailureCause::ProbeError => "the probe guest could not read a disk",
        }
    }
}

/// What the console said about the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// User space is up.
    Booted {
        /// The console line that said so.
        line: String,
    },
    /// The boot failed.
    Failed {
        /// The class of the cause.
        cause: FailureCause,
        /// The console line that said so.
        line: String,
    },
    /// Neither within the time allowed.
    Timeout,
}

/// The longest unfinished line matched against the prompt pattern.
const MAX_PARTIAL: usize = 1024;

/// Decides the verdict from console output.
#[derive(Debug)]
pub struct Watcher {
    success: Vec<Regex>,
    /// Matched against the line still being written (a getty prompt has no
    /// newline after it).
    prompt: Option<Regex>,
    failures: Vec<(FailureCause, Regex)>,
    line: Vec<u8>,
    verdict: Option<Verdict>,
}

impl Watcher {
    /// A watcher with the default success patterns (a `login:` prompt, or
    /// systemd reaching the multi-user or graphical target) or, when
    /// `expect` is given, that pattern alone.
    pub fn new(expect: Option<&str>) -> Result<Self, regex::Error> {
        let (success, prompt) = match expect {
            Some(p) => (vec![Regex::new(p)?], Some(Regex::new(p)?)),
            None => (
                vec![Regex::new(
                    r"Reached target .*(Multi-User System|Graphical Interface)",
                )?],
                Some(Regex::new(r"^\S+ login: ?$")?),
            ),
        };
        let failures = [
            // initramfs-tools
            (
                FailureCause::RootNotFound,
                r"Gave up waiting for (root file system|root) device",
            ),
            (FailureCause::RootNotFound, r"ALERT!  .* does not exist"),
            // dracut
            (
                FailureCause::RootNotFound,
                r"Could not boot\.|/dev/root does not exist|Warning: .* does not exist",
            ),
            (
                FailureCause::RootMountFailed,
                r"VFS: Unable to mount root fs|Failed to mount /sysroot|Failed to mount .*[Rr]oot",
            ),
            (FailureCause::KernelPanic, r"Kernel panic - not syncing"),
            (
                FailureCause::EmergencyShell,
                r"Entering emergency mode|You are in emergency mode|Dropping to (a|debug) shell|dracut:/# ",
            ),
        ];
        let failures = failures
            .into_iter()
            .map(|(c, p)| Ok((c, Regex::new(p)?)))
            .collect::<Result<_, regex::Error>>()?;
        Ok(Watcher {
            success,
            prompt,
            failures,
            line: Vec::new(),
            verdict: None,
        })
    }

    /// A watcher for the probe guest: its `done` line, or its `failed`.
    pub fn probe() -> Self {
        Watcher {
            success: vec![Regex::new(r"^VMSHIFT-PROBE done$").expect("valid pattern")],
            prompt: None,
            failures: vec![(
                FailureCause::ProbeError,
                Regex::new(r"^VMSHIFT-PROBE (failed|error)").expect("valid pattern"),
            )],
            line: Vec::new(),
            verdict: None,
        }
    }

    /// Feeds console bytes; returns the verdict once it is known (and the
    /// same verdict on every later call).
    pub fn feed(&mut self, bytes: &[u8]) -> Option<&Verdict> {
        for &b in bytes {
            if self.verdict.is_some() {
                break;
            }
            match b {
                b'\n' => {
                    self.end_line();
                }
                b'\r' => {}
                _ => {
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                    }
                }
            }
        }
        // The line still being written is matched only while it is short:
        // a prompt is, and a guest that never ends its line must not cost
        // a rescan of kilobytes per byte (a longer line counts once it
        // ends).
        if self.verdict.is_none() && !self.line.is_empty() && self.line.len() <= MAX_PARTIAL {
            let text = clean(&self.line);
            if let Some(p) = &self.prompt {
                if p.is_match(&text) {
                    self.verdict = Some(Verdict::Booted { line: text });
                }
            }
        }
        self.verdict.as_ref()
    }

    fn end_line(&mut self) {
        let text = clean(&self.line);
        self.line.clear();
        if let Some((cause, _)) = self.failures.iter().find(|(_, r)| r.is_match(&text)) {
            // The first failure line is the cause; dracut prints its
            // emergency message after the root timeout, so the earlier,
            // more precise line wins.
            self.verdict = Some(Verdict::Failed {
                cause: *cause,
                line: text,
            });
        } else if self.success.iter().any(|r| r.is_match(&text))
            || self.prompt.as_ref().is_some_and(|p| p.is_match(&text))
        {
            // A prompt followed at once by other output (a kernel message,
            // or bytes that arrive in one read with it) still counts.
            self.verdict = Some(Verdict::Booted { line: text });
        }
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }
}

/// Console text without escape sequences (systemd colours its status
/// lines) and with invalid UTF-8 replaced.
fn clean(line: &[u8]) -> String {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] == 0x1b {
            // CSI: ESC [ params final-byte (0x40..=0x7e)
            i += 1;
            if line.get(i) == Some(&b'[') {
                i += 1;
                while i < line.len() && !(0x40..=0x7e).contains(&line[i]) {
                    i += 1;
                }
            }
            i += 1;
            continue;
        }
        out.push(line[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(log: &str, expect: Option<&str>) -> Option<Verdict> {
        let mut w = Watcher::new(expect).unwrap();
        w.feed(log.as_bytes()).cloned()
    }

    #[test]
    fn getty_prompt_without_newline_is_booted() {
        let log = "[  OK  ] Started serial-getty@ttyS0.service.\r\n\r\nDebian GNU/Linux 12 vmshift-debian ttyS0\r\n\r\nvmshift-debian login: ";
        assert_eq!(
            run(log, None),
            Some(Verdict::Booted {
                line: "vmshift-debian login: ".into()
            })
        );
    }

    #[test]
    fn a_prompt_followed_by_more_output_in_the_same_chunk_is_booted() {
        // QEMU's console arrives in pipe-sized reads, not byte by byte.
        let log = "Debian GNU/Linux 12 web ttyS0\r\n\r\nweb login: \r\n[   25.100000] random: crng init done\r\n";
        assert_eq!(
            run(log, None),
            Some(Verdict::Booted {
                line: "web login: ".into()
            })
        );
    }

    #[test]
    fn coloured_multi_user_target_is_booted() {
        let log = "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\n";
        assert!(matches!(run(log, None), Some(Verdict::Booted { .. })));
    }

    #[test]
    fn initrd_targets_are_not_booted() {
        let log = "[  OK  ] Reached target initrd-root-device.target - Initrd Root Device.\r\n[  OK  ] Reached target basic.target - Basic System.\r\n";
        assert_eq!(run(log, None), None);
    }

    #[test]
    fn initramfs_tools_gave_up_is_root_not_found() {
        let log = "Begin: Running /scripts/local-block ... done.\r\nGave up waiting for root file system device.  Common problems:\r\n - Boot args (cat /proc/cmdline)\r\nALERT!  UUID=1234 does not exist.  Dropping to a shell!\r\n";
        assert!(matches!(
            run(log, None),
            Some(Verdict::Failed {
                cause: FailureCause::RootNotFound,
                ..
            })
        ));
    }

    #[test]
    fn alert_with_two_spaces_is_root_not_found() {
        let log = "ALERT!  /dev/sda1 does not exist.  Dropping to a shell!\n";
        assert!(matches!(
            run(log, None),
            Some(Verdict::Failed {
                cause: FailureCause::RootNotFound,
                ..
            })
        ));
    }

    #[test]
    fn vfs_panic_is_root_mount_failed_not_panic() {
        let log = "[    1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n";
        assert!(matches!(
            run(log, None),
            Some(Verdict::Failed {
                cause: FailureCause::RootMountFailed,
                ..
            })
        ));
    }

    #[test]
    fn dracut_emergency_is_emergency_shell() {
        let log = "[  135.1] dracut-initqueue[300]: Warning: dracut-initqueue: timeout, still waiting for following initqueue hooks:\nEntering emergency mode. Exit the shell to continue.\n";
        assert!(matches!(
            run(log, None),
            Some(Verdict::Failed {
                cause: FailureCause::EmergencyShell,
                ..
            })
        ));
    }

    #[test]
    fn expect_pattern_replaces_the_defaults() {
        assert!(matches!(
            run("MARKER-UP\n", Some("MARKER-UP")),
            Some(Verdict::Booted { .. })
        ));
        assert_eq!(run("debian login: ", Some("MARKER-UP")), None);
    }

    #[test]
    fn byte_by_byte_feeding_gives_the_same_verdict() {
        let log = "x\r\nGave up waiting for root device\r\n";
        let mut w = Watcher::new(None).unwrap();
        let mut got = None;
        for b in log.bytes() {
            if let Some(v) = w.feed(&[b]) {
                got = Some(v.clone());
            }
        }
        assert!(matches!(
            got,
            Some(Verdict::Failed {
                cause: FailureCause::RootNotFound,
                ..
            })
        ));
    }

    #[test]
    fn probe_error_line_is_a_failure() {
        let mut w = Watcher::probe();
        let v = w.feed(b"VMSHIFT-PROBE start\nVMSHIFT-PROBE error reading the MBR status 1\n");
        assert!(matches!(
            v,
            Some(Verdict::Failed {
                cause: FailureCause::ProbeError,
                ..
            })
        ));
        let mut w = Watcher::probe();
        assert!(matches!(
            w.feed(b"VMSHIFT-PROBE done\n"),
            Some(Verdict::Booted { .. })
        ));
    }

    #[test]
    fn a_long_unfinished_line_is_matched_when_it_ends() {
        let mut w = Watcher::new(Some("MARK")).unwrap();
        let long = format!("{}MARK", "x".repeat(MAX_PARTIAL));
        // Fed byte by byte, as the UART does: no rescans past the bound.
        for b in long.bytes() {
            assert!(w.feed(&[b]).is_none());
        }
        assert!(matches!(w.feed(b"\n"), Some(Verdict::Booted { .. })));
        let mut short = Watcher::new(Some("MARK")).unwrap();
        assert!(matches!(
            short.feed(b"xxMARK"),
            Some(Verdict::Booted { .. })
        ));
    }

    #[test]
    fn login_inside_a_line_is_not_a_prompt() {
        assert_eq!(
            run(
                "[  OK  ] Started systemd-logind.service - User login: ",
                None
            ),
            None
        );
    }
}
