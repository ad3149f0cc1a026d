//! Confinement while vmshift reads untrusted input.
//!
//! A command opens every file it needs first, through the image gate (the
//! image, its backing files, extents and data files; the output's
//! temporary file comes later, in the output's folder). Then it calls
//! [`confine`], and from there a parser bug in vmshift — a damaged qcow2,
//! a hostile guest file system — cannot reach the rest of the host:
//!
//! - `no_new_privs`, always;
//! - Landlock: no file may be opened except in the output's folders (and
//!   the files a command rewrites in place); no TCP bind or connect. Where
//!   the running kernel has no Landlock, the command says so once and goes
//!   on (`--require-landlock` makes that an error);
//! - seccomp (a deny list per profile): no `execve`, no sockets, no
//!   ptrace, mounts, namespaces, modules, BPF or keyrings; for a command
//!   that only reads ([`Profile::Read`]) also no `open` at all and no
//!   write-side calls (writes only to standard output and error).
//!
//! `--no-sandbox` turns Landlock and seccomp off (for debugging; the
//! command says so), `no_new_privs` stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// What a confined command may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// It reads the files it opened and writes to standard output and
    /// error: `info`, `map`, `check`, `compare`, `part`, `guest …`.
    Read,
    /// It opens and reads only the files its policy names, and writes
    /// nothing but standard output and error: the thread that reads a VM's
    /// descriptor (and the files beside it, a `.vmsd`) into the model.
    Load,
    /// It also writes: its output's folder (`convert`), or the files it
    /// rewrites in place (`resize`, `check -r`).
    Write,
    /// vm boot's VMM once the VM is built (kernel loaded, disks and
    /// console log open, KVM set up): its vCPU and device threads open no
    /// file, and of the ioctls only make those they use (`KVM_RUN`,
    /// `KVM_SIGNAL_MSI`, `KVM_GET_REGS`, and the terminal's).
    Vmm,
    /// vm boot's NBD server threads (the QEMU engine): they accept QEMU's
    /// connections on their socket, bound already, and read and write the
    /// open disks and overlay; they open no file and make no other socket.
    Serve,
}

/// A command's confinement.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The profile.
    pub profile: Profile,
    /// Folders whose regular files may be opened, written, created and
    /// removed (nothing else: no devices, sockets, links, folders or
    /// programs).
    pub write_dirs: Vec<PathBuf>,
    /// Folders where an output already open is put in place: regular files
    /// linked, renamed and removed, the folder itself opened to sync it.
    pub commit_dirs: Vec<PathBuf>,
    /// Files that may be opened again for reading and writing.
    pub write_files: Vec<PathBuf>,
    /// Files that may be opened again for reading.
    pub read_files: Vec<PathBuf>,
    /// Folders whose files may be opened again for reading.
    pub read_dirs: Vec<PathBuf>,
    /// Folders in which folders may be made (and, empty, removed).
    pub make_dirs: Vec<PathBuf>,
    /// Folders in which empty folders may be removed (those a failed run
    /// made).
    pub remove_dirs: Vec<PathBuf>,
}

impl Policy {
    /// `profile`, with no file or folder given back.
    fn nothing(profile: Profile) -> Self {
        Policy {
            profile,
            write_dirs: Vec::new(),
            commit_dirs: Vec::new(),
            write_files: Vec::new(),
            read_files: Vec::new(),
            read_dirs: Vec::new(),
            make_dirs: Vec::new(),
            remove_dirs: Vec::new(),
        }
    }

    /// A command that only reads.
    pub fn read() -> Self {
        Policy::nothing(Profile::Read)
    }

    /// vm boot's VMM.
    pub fn vmm() -> Self {
        Policy::nothing(Profile::Vmm)
    }

    /// vm boot's NBD server threads.
    pub fn serve() -> Self {
        Policy::nothing(Profile::Serve)
    }

    /// A thread that opens and reads `files`, nothing else.
    pub fn load(files: Vec<PathBuf>) -> Self {
        Policy {
            read_files: files,
            ..Policy::nothing(Profile::Load)
        }
    }

    /// A command whose outputs are open already and are put in place in
    /// `dirs` (`convert`).
    pub fn commit(dirs: Vec<PathBuf>) -> Self {
        Policy {
            commit_dirs: dirs,
            ..Policy::write(Vec::new(), Vec::new())
        }
    }

    /// A command that writes files in `dirs` and rewrites `files`.
    pub fn write(dirs: Vec<PathBuf>, files: Vec<PathBuf>) -> Self {
        Policy {
            write_dirs: dirs,
            write_files: files,
            ..Policy::nothing(Profile::Write)
        }
    }
}

/// The command line's say.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// `--no-sandbox`.
    pub off: bool,
    /// `--require-landlock`.
    pub require_landlock: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static ACTIVE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread alone is confined ([`confined`]).
    static THREAD_CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Records the command line's settings (once, before the command runs).
pub fn configure(s: Settings) {
    let _ = SETTINGS.set(s);
}

/// True once [`confine`] has confined the process (or, on a thread
/// [`confined`] runs, that thread).
pub fn active() -> bool {
    ACTIVE.load(Ordering::SeqCst) || THREAD_CONFINED.with(|c| c.get())
}

/// The folder a new output file is created in.
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Confines the process by `policy`: the seccomp filters on every thread
/// (TSYNC), Landlock on the calling thread and every thread it starts
/// from here on (callers confine before they start any). Called once every
/// file the command reads is open.
pub fn confine(policy: &Policy) -> Result<()> {
    confine_in(policy, true)
}

/// Confines the calling thread only (Landlock, seccomp, capabilities), for
/// a thread that reads untrusted input while the rest of the process goes
/// on unconfined; see [`confined`].
pub fn confine_thread(policy: &Policy) -> Result<()> {
    confine_in(policy, false)
}

/// Runs `work` on a thread of its own, confined by `policy` (Landlock,
/// seccomp and capabilities on that thread only), and returns what it
/// returned: for reading untrusted input while the rest of the process
/// still has work to do unconfined (the descriptor read before its disks
/// are opened, the guest's boot files read before the VM is built). The
/// thread shares the process's memory: this keeps a parser that is misled
/// from opening, writing or running anything, as the whole-process
/// sandbox does, not a memory-corruption exploit from the other threads
/// (safe Rust is what stands against that).
pub fn confined<T: Send, E: Into<anyhow::Error>>(
    policy: &Policy,
    work: impl FnOnce() -> std::result::Result<T, E> + Send,
) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<T> {
                confine_thread(policy)?;
                work().map_err(|e| {
                    let e: anyhow::Error = e.into();
                    // Said here, where the thread is known to be confined.
                    if refused(&e) {
                        e.context(RefusedOnThread)
                    } else {
                        e
                    }
                })
            })
            .join()
            .map_err(|_| anyhow!("the confined reader thread panicked"))?
    })
}

/// Marks an error a confined thread's sandbox may have caused.
#[derive(Debug)]
struct RefusedOnThread;

impl std::fmt::Display for RefusedOnThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("on a thread confined to reading its input")
    }
}

fn confine_in(policy: &Policy, all_threads: bool) -> Result<()> {
    let settings = SETTINGS.get().copied().unwrap_or_default();
    // What the copy engine reads of the cgroup (its CPU quota), while it
    // still may.
    vmshift_image::engine::default_threads();
    no_new_privs()?;
    if settings.off {
        say_once(
            &SAID_OFF,
            "vmshift: --no-sandbox: Landlock and seccomp are off; only no_new_privs is set",
        );
        return Ok(());
    }
    let landlock_status = landlock(policy)?;
    drop_capabilities(policy.profile)?;
    match landlock_status {
        RulesetStatus::NotEnforced if settings.require_landlock => {
            bail!("--require-landlock: this kernel has no Landlock (Linux 5.13 or later, with landlock in its lsm= list), so the files vmshift may open cannot be confined")
        }
        RulesetStatus::NotEnforced => say_once(
            &SAID_NO_LANDLOCK,
            "vmshift: note: this kernel has no Landlock: the files vmshift may open are not confined (seccomp still is; --require-landlock makes this an error)",
        ),
        _ => {}
    }
    for program in seccomp_programs(policy.profile)? {
        if all_threads {
            seccompiler::apply_filter_all_threads(&program)
        } else {
            seccompiler::apply_filter(&program)
        }
        .map_err(|e| anyhow!("installing the seccomp filter: {e}"))?;
    }
    if all_threads {
        ACTIVE.store(true, Ordering::SeqCst);
    } else {
        THREAD_CONFINED.with(|c| c.set(true));
    }
    Ok(())
}

/// Capabilities a profile keeps (when it runs with them at all, as root):
/// a command that writes keeps `CAP_DAC_OVERRIDE` and `CAP_FOWNER`, so
/// that root still writes its output into a folder it does not own (and
/// replaces a file there, sticky `/tmp` included); the descriptor reader
/// keeps `CAP_DAC_READ_SEARCH`, so that root still reads a descriptor in
/// another user's home (and only reads: Landlock and the open filter keep
/// it to the descriptor's files, and `open_by_handle_at` is refused);
/// nothing else keeps any. `--no-sandbox` keeps them all.
fn kept_capabilities(profile: Profile) -> u64 {
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_DAC_READ_SEARCH: u32 = 2;
    const CAP_FOWNER: u32 = 3;
    match profile {
        Profile::Write => 1 << CAP_DAC_OVERRIDE | 1 << CAP_FOWNER,
        Profile::Load => 1 << CAP_DAC_READ_SEARCH,
        Profile::Read | Profile::Vmm | Profile::Serve => 0,
    }
}

/// `capget`/`capset`'s header (`struct __user_cap_header_struct`).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// One half of `capget`/`capset`'s data (`struct __user_cap_data_struct`).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability but the profile's from the calling thread (the
/// effective, permitted, inheritable, ambient and bounding sets; a
/// command confines itself before it starts threads). Without
/// `CAP_SETPCAP` (not root) the bounding set stays, and no_new_privs and
/// the refused `execve` keep anything from being gained through it.
fn drop_capabilities(profile: Profile) -> Result<()> {
    let keep = kept_capabilities(profile);
    for cap in 0..64u64 {
        // SAFETY: prctl with PR_CAPBSET_READ/DROP takes integer arguments
        // only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            break; // past the kernel's last capability
        }
        if present == 1 && keep & (1 << cap) == 0 {
            // SAFETY: as above.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            let err = std::io::Error::last_os_error();
            if rc != 0 && err.raw_os_error() != Some(libc::EPERM) {
                bail!("dropping capability {cap} from the bounding set: {err}");
            }
        }
    }
    // SAFETY: integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        bail!(
            "clearing the ambient capabilities: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `header` and `data` are the kernel's v3 layout (a header and
    // two data structs), live and writable for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        bail!(
            "reading the capabilities: {}",
            std::io::Error::last_os_error()
        );
    }
    for (half, d) in data.iter_mut().enumerate() {
        let keep = (keep >> (32 * half)) as u32;
        d.permitted &= keep;
        d.effective &= d.permitted;
        d.inheritable = 0;
    }
    // SAFETY: as for capget; the kernel only reads `data` here.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        bail!("dropping capabilities: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

static SAID_OFF: AtomicBool = AtomicBool::new(false);
static SAID_NO_LANDLOCK: AtomicBool = AtomicBool::new(false);

/// Says `what` on standard error, the first time only.
fn say_once(said: &AtomicBool, what: &str) {
    if !said.swap(true, Ordering::SeqCst) {
        eprintln!("{what}");
    }
}

fn no_new_privs() -> Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only
    // and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        bail!("setting no_new_privs: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The Landlock ruleset: every file-system right and TCP bind/connect
/// handled; rights given back only for the output's folders and the files
/// rewritten in place. Best effort: an older kernel enforces what it
/// knows.
fn landlock(policy: &Policy) -> Result<RulesetStatus> {
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| anyhow!("setting up Landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    let files = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let rules: [(&Vec<PathBuf>, BitFlags<AccessFs>); 7] = [
        (
            &policy.write_dirs,
            files | AccessFs::ReadDir | AccessFs::MakeReg | AccessFs::RemoveFile,
        ),
        (
            &policy.commit_dirs,
            AccessFs::ReadDir | AccessFs::MakeReg | AccessFs::RemoveFile,
        ),
        (&policy.write_files, files),
        (&policy.read_files, AccessFs::ReadFile.into()),
        (&policy.read_dirs, AccessFs::ReadFile | AccessFs::ReadDir),
        (&policy.make_dirs, AccessFs::MakeDir | AccessFs::RemoveDir),
        (&policy.remove_dirs, AccessFs::RemoveDir.into()),
    ];
    for (paths, access) in rules {
        // A path that does not exist gets no rule: opening or creating it
        // fails as it would anyway (ENOENT, said by the command). Nor does
        // what is not a file or folder (a descriptor read from a pipe:
        // Landlock does not confine pipes).
        let ruled = |p: &&PathBuf| std::fs::metadata(p).is_ok_and(|m| m.is_file() || m.is_dir());
        for path in paths.iter().filter(ruled) {
            let fd = PathFd::new(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(err)?;
        }
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(status.ruleset)
}

/// Calls no confined vmshift command makes.
const NEVER: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_io_uring_setup,
    // Metadata Landlock does not cover: modes, owners, times, attributes.
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    SYS_FCHMODAT2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_futimesat,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    SYS_SETXATTRAT,
    SYS_REMOVEXATTRAT,
    libc::SYS_truncate,
    libc::SYS_name_to_handle_at,
    // Other processes.
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_process_madvise,
];

/// Newer calls the libc crate may not name yet (x86-64 numbers).
const SYS_FCHMODAT2: i64 = 452;
const SYS_SETXATTRAT: i64 = 463;
const SYS_REMOVEXATTRAT: i64 = 466;

/// The namespace flags of clone(2): a confined command makes no namespace.
const CLONE_NEW: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// Opening a file: a command that only reads has opened all it reads.
const OPENS: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_open_by_handle_at,
];

/// Calls that change the file system's names (and an open file's mode):
/// only a command that writes makes them.
const PATH_CHANGES: &[i64] = &[
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_fchmod,
];

/// Calls that change files: a command that only reads does not make them.
const READ_ONLY_NEVER: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_truncate,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_lchown,
    libc::SYS_utimensat,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_vmsplice,
    libc::SYS_tee,
    // A writable descriptor moved onto standard output or error (and
    // `dup`, which takes the lowest free number: after a close, 1).
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
];

/// The seccomp filters of a profile: the calls above fail with `EPERM`,
/// and (for [`Profile::Read`]) opening a file with `EACCES`, as a path
/// Landlock refuses does; everything else is allowed.
pub fn seccomp_programs(profile: Profile) -> Result<Vec<BpfProgram>> {
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        NEVER.iter().map(|n| (*n, Vec::new())).collect();
    let arg = |index: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, len, op, value).map_err(seccomp_err)
    };
    let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(seccomp_err);
    // A thread, never a namespace.
    let mut clone = Vec::new();
    for flag in CLONE_NEW {
        clone.push(rule(vec![arg(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])?);
    }
    denied.insert(libc::SYS_clone, clone);
    // No keystrokes pushed into the terminal the command runs on (its
    // input, open before the sandbox).
    denied.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![arg(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::TIOCSTI,
            )?])?,
            rule(vec![arg(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::TIOCLINUX,
            )?])?,
        ],
    );
    // x32 calls (the x86-64 arch with bit 30 of the number set) would
    // match none of the numbers below: they kill the process. clone3
    // (whose flags are behind a pointer) answers ENOSYS, and the C library
    // starts threads with clone, whose flags the filter sees.
    let mut out = vec![
        no_x32(),
        program(
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            libc::ENOSYS,
        )?,
    ];
    if profile == Profile::Vmm {
        // Any ioctl but these fails.
        let mut others = Vec::new();
        for cmd in vmm_ioctls() {
            others.push(
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, cmd)
                    .map_err(seccomp_err)?,
            );
        }
        denied.insert(
            libc::SYS_ioctl,
            vec![SeccompRule::new(others).map_err(seccomp_err)?],
        );
    }
    if profile != Profile::Write {
        denied.extend(PATH_CHANGES.iter().map(|n| (*n, Vec::new())));
    }
    if matches!(profile, Profile::Read | Profile::Load) {
        denied.extend(READ_ONLY_NEVER.iter().map(|n| (*n, Vec::new())));
        // Writes only to standard output and error.
        for call in [libc::SYS_write, libc::SYS_writev] {
            let past_stderr =
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Gt, 2)
                    .map_err(seccomp_err)?;
            denied.insert(
                call,
                vec![SeccompRule::new(vec![past_stderr]).map_err(seccomp_err)?],
            );
        }
        // A descriptor copied only above standard error (`try_clone`).
        let mut dups = Vec::new();
        for cmd in [libc::F_DUPFD, libc::F_DUPFD_CLOEXEC] {
            dups.push(rule(vec![
                arg(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd as u64)?,
                arg(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Lt, 3)?,
            ])?);
        }
        denied.insert(libc::SYS_fcntl, dups);
    }
    if profile == Profile::Serve {
        // Connections on the socket bound before.
        denied.remove(&libc::SYS_accept);
        denied.remove(&libc::SYS_accept4);
    }
    if matches!(profile, Profile::Read | Profile::Serve | Profile::Vmm) {
        let opens = OPENS.iter().map(|n| (*n, Vec::new())).collect();
        out.push(program(opens, libc::EACCES)?);
    }
    if profile == Profile::Load {
        // Opens for reading only (Landlock says which files; without
        // Landlock, at least nothing is made, truncated or written).
        let write_flags = [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_CREAT,
            libc::O_TRUNC,
            libc::O_APPEND,
            libc::O_TMPFILE & !libc::O_DIRECTORY,
        ];
        let mut opens: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (call, flags_arg) in [(libc::SYS_open, 1), (libc::SYS_openat, 2)] {
            let mut rules = Vec::new();
            for flag in write_flags {
                let flag = flag as u64;
                rules.push(rule(vec![arg(
                    flags_arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?])?);
            }
            opens.insert(call, rules);
        }
        opens.insert(libc::SYS_creat, Vec::new());
        opens.insert(libc::SYS_open_by_handle_at, Vec::new());
        out.push(program(opens, libc::EACCES)?);
        // openat2's flags are behind a pointer: the C library falls back
        // to openat.
        out.push(program(
            [(libc::SYS_openat2, Vec::new())].into_iter().collect(),
            libc::ENOSYS,
        )?);
    }
    out.push(program(denied, libc::EPERM)?);
    Ok(out)
}

/// A filter that kills the process on any x32 call (the x86-64 arch with
/// `__X32_SYSCALL_BIT` in the number): seccompiler's filters compare whole
/// numbers, which an x32 call would pass.
fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const X32_BIT: u32 = 0x4000_0000;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    vec![
        // The syscall number (seccomp_data.nr, offset 0).
        sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: JGE_K,
            jt: 0,
            jf: 1,
            k: X32_BIT,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_KILL_PROCESS,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ]
}

/// The ioctls vm boot's VMM makes once it runs: `KVM_RUN`,
/// `KVM_SIGNAL_MSI`, `KVM_GET_REGS` (a triple fault's report), and the
/// terminal's `TCGETS`/`TIOCGWINSZ` (the console on a terminal).
fn vmm_ioctls() -> Vec<u64> {
    let mut v = vmshift_kvm::RUNTIME_IOCTLS.to_vec();
    v.extend([libc::TCGETS, libc::TIOCGWINSZ]);
    v
}

fn seccomp_err(e: seccompiler::BackendError) -> anyhow::Error {
    anyhow!("building the seccomp filter: {e}")
}

/// A filter that fails the calls in `rules` with `errno`.
fn program(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(seccomp_err)?;
    filter.try_into().map_err(seccomp_err)
}

/// True when `e` may be the sandbox's refusal: an `EACCES`, `EPERM` or
/// `EXDEV` from the system in a confined process.
pub fn refused(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<RefusedOnThread>().is_some() {
        return true;
    }
    active()
        && e.chain().any(|c| {
            let io = c
                .downcast_ref::<std::io::Error>()
                .or_else(|| c.source().and_then(|s| s.downcast_ref::<std::io::Error>()));
            io.and_then(|io| io.raw_os_error())
                .is_some_and(|n| n == libc::EACCES || n == libc::EPERM || n == libc::EXDEV)
        })
}

/// What the error line adds when the sandbox may have refused something.
pub const REFUSED_NOTE: &str = "vmshift's sandbox may have refused it: once the input is open, a command opens no other file outside its output's folder and runs no program (--no-sandbox turns the sandbox off, to tell)";

#[cfg(test)]
mod tests {
    //! Each test confines its own thread (Landlock and seccomp act on the
    //! calling thread and the threads it starts), so the rest of the test
    //! process is untouched: this is the test-only way in, never shipped.
    use super::*;
    use std::io::{Read, Write};

    /// A pipe: (read end, write end).
    fn pipe() -> (i32, i32) {
        let mut fds = [0; 2];
        // SAFETY: pipe() fills the two-element array it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    }

    /// A temporary folder holding one file `f` of `bytes`, and its path.
    fn file_holding(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("the confined thread")
    }

    fn landlock_here() -> bool {
        // SAFETY: landlock_create_ruleset with a NULL attribute, size 0 and
        // the VERSION flag only returns the ABI version.
        unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1u32) > 0 }
    }

    #[test]
    fn a_read_command_reads_what_it_opened_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let opened = dir.path().join("opened");
        let other = dir.path().join("other");
        std::fs::write(&opened, b"input").unwrap();
        std::fs::write(&other, b"secret").unwrap();
        let (o, d) = (opened.clone(), dir.path().to_path_buf());
        let r = in_thread(move || {
            let mut f = std::fs::File::open(&o).unwrap();
            confine_in(&Policy::read(), false).unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            let again = std::fs::File::open(&o)
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let other = std::fs::File::open(d.join("other"))
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let create = std::fs::File::create(d.join("new"))
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let exec = std::process::Command::new("/bin/true")
                .status()
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let net = std::net::TcpListener::bind("127.0.0.1:0")
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let status = std::fs::read_to_string("/proc/thread-self/status");
            (
                s,
                again,
                other,
                create,
                exec,
                net,
                status.map_err(|e| e.raw_os_error()),
            )
        });
        let (s, again, other, create, exec, net, status) = r;
        assert_eq!(s, "input");
        assert_eq!(again, Err(Some(libc::EACCES)), "reopening by path");
        assert_eq!(other, Err(Some(libc::EACCES)));
        assert_eq!(create, Err(Some(libc::EACCES)));
        assert_eq!(exec, Err(Some(libc::EPERM)), "execve");
        assert_eq!(net, Err(Some(libc::EPERM)), "socket");
        // /proc is a file too: the thread cannot even read its own status.
        assert_eq!(status, Err(Some(libc::EACCES)));
        assert!(!dir.path().join("new").exists());
    }

    #[test]
    fn a_read_command_writes_only_to_stdout_and_stderr() {
        let (_dir, path) = file_holding(b"x");
        let p = path.clone();
        let (write, pwrite, truncate, rename) = in_thread(move || {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            confine_in(&Policy::read(), false).unwrap();
            let write = f.write(b"changed").map_err(|e| e.raw_os_error());
            let pwrite =
                std::os::unix::fs::FileExt::write_at(&f, b"y", 0).map_err(|e| e.raw_os_error());
            let truncate = f.set_len(0).map_err(|e| e.raw_os_error());
            let rename =
                std::fs::rename(&p, p.with_extension("moved")).map_err(|e| e.raw_os_error());
            (write, pwrite, truncate, rename)
        });
        assert_eq!(write, Err(Some(libc::EPERM)));
        assert_eq!(pwrite, Err(Some(libc::EPERM)));
        assert_eq!(truncate, Err(Some(libc::EPERM)));
        assert!(rename.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_write_command_writes_in_its_output_folder_only() {
        if !landlock_here() {
            panic!("this kernel has no Landlock: the write profile's folder rules cannot be tested (CI kernels have it)");
        }
        let out = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("keep"), b"k").unwrap();
        let (o, e) = (out.path().to_path_buf(), elsewhere.path().to_path_buf());
        let (inside, rename, outside, read_outside, exec) = in_thread(move || {
            confine_in(&Policy::write(vec![o.clone()], Vec::new()), false).unwrap();
            let inside = std::fs::write(o.join(".t.tmp"), b"data").map_err(|e| e.raw_os_error());
            let rename =
                std::fs::rename(o.join(".t.tmp"), o.join("t")).map_err(|e| e.raw_os_error());
            let outside = std::fs::write(e.join("x"), b"data").map_err(|e| e.raw_os_error());
            let read_outside = std::fs::read(e.join("keep"))
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let exec = std::process::Command::new("/bin/true")
                .status()
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            (inside, rename, outside, read_outside, exec)
        });
        assert_eq!(inside, Ok(()));
        assert_eq!(rename, Ok(()));
        assert_eq!(std::fs::read(out.path().join("t")).unwrap(), b"data");
        assert_eq!(outside, Err(Some(libc::EACCES)));
        assert_eq!(read_outside, Err(Some(libc::EACCES)));
        assert_eq!(exec, Err(Some(libc::EPERM)));
        assert!(!elsewhere.path().join("x").exists());
    }

    #[test]
    fn a_confined_reader_thread_opens_only_its_files_and_the_process_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let vmx = dir.path().join("vm.vmx");
        let beside = dir.path().join("vm.nvram");
        std::fs::write(&vmx, b"displayName = \"x\"").unwrap();
        std::fs::write(&beside, b"secret").unwrap();
        let r = confined(&Policy::load(vec![vmx.clone()]), || {
            let read = std::fs::read_to_string(&vmx).map_err(|e| e.raw_os_error());
            let other = std::fs::read(&beside).map_err(|e| e.raw_os_error());
            let create = std::fs::File::create(dir.path().join("new"))
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let exec = std::process::Command::new("/bin/true")
                .status()
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            Ok::<_, std::io::Error>((read, other.map(|_| ()), create, exec, active()))
        })
        .unwrap();
        let (read, other, create, exec, confined_here) = r;
        assert_eq!(read.as_deref(), Ok("displayName = \"x\""));
        if landlock_here() {
            assert_eq!(other, Err(Some(libc::EACCES)), "a file it was not given");
            assert_eq!(create, Err(Some(libc::EACCES)));
        } else {
            // seccomp alone: no open that makes a file.
            assert_eq!(create, Err(Some(libc::EACCES)));
        }
        assert_eq!(exec, Err(Some(libc::EPERM)), "execve");
        assert!(confined_here);
        // This thread is not confined: it opens and makes files.
        assert!(!THREAD_CONFINED.with(|c| c.get()));
        std::fs::read(&beside).unwrap();
        std::fs::write(dir.path().join("made"), b"x").unwrap();
    }

    #[test]
    fn an_nbd_server_thread_accepts_on_its_socket_and_does_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"x").unwrap();
        let s2 = sock.clone();
        let server = std::thread::spawn(move || {
            confine_thread(&Policy::serve()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut b = [0u8; 5];
            conn.read_exact(&mut b).unwrap();
            conn.write_all(b"pong!").unwrap();
            let open = std::fs::File::open(&other)
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let socket = std::os::unix::net::UnixStream::connect(&s2)
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let exec = std::process::Command::new("/bin/true")
                .status()
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let rename = std::fs::rename(&other, other.with_extension("moved"))
                .map_err(|e| e.raw_os_error());
            (b, open, socket, exec, rename)
        });
        let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        client.write_all(b"ping!").unwrap();
        let mut b = [0u8; 5];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pong!");
        let (got, open, socket, exec, rename) = server.join().unwrap();
        assert_eq!(rename, Err(Some(libc::EPERM)), "rename");
        assert_eq!(&got, b"ping!");
        assert_eq!(open, Err(Some(libc::EACCES)));
        assert_eq!(socket, Err(Some(libc::EPERM)), "a new socket");
        assert_eq!(exec, Err(Some(libc::EPERM)));
    }

    #[test]
    fn a_reading_thread_copies_descriptors_only_above_standard_error() {
        let (_dir, p) = file_holding(b"x");
        let r = in_thread(move || {
            let f = std::fs::File::open(&p).unwrap();
            confine_in(&Policy::read(), false).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // The errno of a refused copy; a copy made is closed at once.
            let copy = |rc: i32| {
                if rc < 0 {
                    return Some(std::io::Error::last_os_error().raw_os_error());
                }
                // SAFETY: `rc` is the copy just made, owned here, closed once.
                unsafe { libc::close(rc) };
                None
            };
            // SAFETY: dup of `fd`, which `f` keeps open; no memory is touched.
            let dup = copy(unsafe { libc::dup(fd) });
            // SAFETY: fcntl(F_DUPFD) of `fd`, as above.
            let low = copy(unsafe { libc::fcntl(fd, libc::F_DUPFD, 1) });
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) of `fd`, as above.
            let low_cloexec = copy(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) });
            let clone = f.try_clone().map(|_| ()).map_err(|e| e.raw_os_error());
            (dup, low, low_cloexec, clone)
        });
        assert_eq!(r.0, Some(Some(libc::EPERM)), "dup");
        assert_eq!(r.1, Some(Some(libc::EPERM)), "F_DUPFD to 1");
        assert_eq!(r.2, Some(Some(libc::EPERM)), "F_DUPFD_CLOEXEC to 0");
        assert_eq!(r.3, Ok(()), "try_clone (F_DUPFD_CLOEXEC from 3)");
    }

    #[test]
    fn a_descriptor_reader_opens_for_reading_only_even_without_landlock() {
        // The seccomp side alone (as on a kernel without Landlock): any
        // open that would write, make or truncate is refused.
        let (dir, p) = file_holding(b"data");
        let r = in_thread(move || {
            for program in seccomp_programs(Profile::Load).unwrap() {
                seccompiler::apply_filter(&program).unwrap();
            }
            let read = std::fs::read(&p).map_err(|e| e.raw_os_error());
            let err =
                |o: std::io::Result<std::fs::File>| o.map(|_| ()).map_err(|e| e.raw_os_error());
            let write = err(std::fs::OpenOptions::new().write(true).open(&p));
            let append = err(std::fs::OpenOptions::new().append(true).open(&p));
            let truncate = err(std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&p));
            let create = err(std::fs::File::create(p.with_extension("new")));
            (read, write, append, truncate, create)
        });
        assert_eq!(r.0, Ok(b"data".to_vec()));
        for (what, got) in [
            ("write", r.1),
            ("append", r.2),
            ("truncate", r.3),
            ("create", r.4),
        ] {
            assert_eq!(got, Err(Some(libc::EACCES)), "{what}");
        }
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"data");
        assert!(!dir.path().join("f.new").exists());
    }

    #[test]
    fn a_refused_open_is_said_to_be_the_sandbox() {
        let (_dir, p) = file_holding(b"x");
        let msg = in_thread(move || {
            confine_in(&Policy::read(), false).unwrap();
            let e = std::fs::File::open(&p)
                .map_err(anyhow::Error::from)
                .map(|_| ())
                .unwrap_err();
            refused(&e)
        });
        assert!(msg);
    }

    #[test]
    fn the_vmm_makes_only_its_ioctls_and_opens_nothing() {
        let (fionread, tcgets, open, exec) = in_thread(|| {
            let (r, _w) = pipe();
            confine_in(&Policy::vmm(), false).unwrap();
            let errno = || std::io::Error::last_os_error().raw_os_error();
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int to `n`.
            let fionread = unsafe { libc::ioctl(r, libc::FIONREAD, &mut n) };
            let fionread = (fionread, errno());
            // SAFETY: termios is plain data; all zeros is a valid value.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: TCGETS writes one termios to `t`.
            let tcgets = unsafe { libc::ioctl(r, libc::TCGETS, &mut t) };
            let tcgets = (tcgets, errno());
            let open = std::fs::File::open("/etc/hostname")
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let exec = std::process::Command::new("/bin/true")
                .status()
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            (fionread, tcgets, open, exec)
        });
        // Another ioctl: refused by the filter.
        assert_eq!(fionread, (-1, Some(libc::EPERM)));
        // The terminal's: allowed (a pipe is no terminal: ENOTTY).
        assert_eq!(tcgets, (-1, Some(libc::ENOTTY)));
        assert_eq!(open, Err(Some(libc::EACCES)));
        assert_eq!(exec, Err(Some(libc::EPERM)));
    }

    #[test]
    fn threads_still_start_but_namespaces_terminal_keystrokes_and_dup2_do_not() {
        let (thread, clone3, newuser, tiocsti, dup2) = in_thread(|| {
            let (rd, wr) = pipe();
            confine_in(&Policy::read(), false).unwrap();
            let errno = || std::io::Error::last_os_error().raw_os_error();
            // glibc answers clone3's ENOSYS with clone, without namespaces.
            let thread = std::thread::spawn(|| 7).join().ok();
            // SAFETY: clone3 with a null argument only returns an error.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            let clone3 = (r, errno());
            // SAFETY: a fork-like clone; should it succeed, the child
            // leaves at once.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if r == 0 {
                // SAFETY: the child ends without running anything else.
                unsafe { libc::_exit(0) };
            }
            let newuser = (r, errno());
            let c = b'x';
            // SAFETY: TIOCSTI reads one byte from the pointer given.
            let rc = unsafe { libc::ioctl(rd, libc::TIOCSTI, &c) };
            let tiocsti = (rc, errno());
            // SAFETY: dup2 takes two descriptor numbers.
            let rc = unsafe { libc::dup2(wr, 1) };
            let dup2 = (rc, errno());
            (thread, clone3, newuser, tiocsti, dup2)
        });
        assert_eq!(thread, Some(7));
        assert_eq!(clone3, (-1, Some(libc::ENOSYS)));
        assert_eq!(newuser, (-1, Some(libc::EPERM)));
        assert_eq!(tiocsti, (-1, Some(libc::EPERM)));
        assert_eq!(dup2, (-1, Some(libc::EPERM)));
    }

    #[test]
    fn an_x32_call_kills_the_process() {
        if std::env::var_os("VMSHIFT_SANDBOX_X32_CHILD").is_some() {
            confine_in(&Policy::read(), false).unwrap();
            // getpid through the x32 ABI: a number no deny rule names.
            // SAFETY: getpid takes no arguments; the filter stops it first.
            unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox::tests::an_x32_call_kills_the_process",
                "--nocapture",
            ])
            .env("VMSHIFT_SANDBOX_X32_CHILD", "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    }
}
