use std::process::ExitCode;

use clap::Parser;
use vmshift::args::{Command, GuestCommand, VmCommand};
use vmshift::{cmd, Cli};

fn main() -> ExitCode {
    // Like other Unix tools, stop quietly when the reader of our output
    // goes away (`vmshift map … | head`) instead of failing a write.
    // SAFETY: signal() with SIG_DFL installs no handler of ours; called
    // once, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A command line that does not parse exits 1, as qemu-img's usage
    // errors do (clap's own 2 would read as "corruptions found" to a
    // script calling `check`); --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            });
        }
    };
    vmshift::sandbox::configure(vmshift::sandbox::Settings {
        off: cli.no_sandbox,
        require_landlock: cli.require_landlock,
    });
    let (result, error_code) = match &cli.command {
        Command::Info(a) => (cmd::info::run(a), 1),
        Command::Create(a) => (cmd::create::run(a), 1),
        Command::Convert(a) => (cmd::convert::run(a), 1),
        Command::Compare(a) => (cmd::compare::run(a), 2),
        Command::Map(a) => (cmd::map::run(a), 1),
        Command::Check(a) => (cmd::check::run(a), 1),
        Command::Part(a) => (cmd::part::run(a), 1),
        Command::Resize(a) => (cmd::resize::run(a), 1),
        Command::Vm(VmCommand::Inspect(a)) => (cmd::vm::inspect(a), 1),
        Command::Vm(VmCommand::Validate(a)) => (cmd::vm::validate(a), 2),
        Command::Vm(VmCommand::Convert(a)) => (cmd::vm::convert_vm(a), 1),
        Command::Vm(VmCommand::Diff(a)) => (cmd::vm::diff(a), 2),
        Command::Vm(VmCommand::Boot(a)) => (cmd::boot::run(a), cmd::boot::EXIT_ERROR),
        Command::Guest(GuestCommand::Filesystems(a)) => (cmd::guest::filesystems(a), 1),
        Command::Guest(GuestCommand::Inspect(a)) => (cmd::guest::inspect(a), 1),
        Command::Guest(GuestCommand::Ls(a)) => (cmd::guest::ls(a), 1),
        Command::Guest(GuestCommand::Cat(a)) => (cmd::guest::cat(a), 1),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            if vmshift::sandbox::refused(&e) {
                eprintln!(
                    "vmshift: {}: {}",
                    one_line(&e),
                    vmshift::sandbox::REFUSED_NOTE
                );
            } else {
                eprintln!("vmshift: {}", one_line(&e));
            }
            // Stopped by Ctrl-C (or SIGTERM): the shell's convention.
            if vmshift::signals::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                return ExitCode::from(130);
            }
            ExitCode::from(error_code)
        }
    }
}

/// An error and its causes in one line, each cause once: a message that
/// already quotes its cause does not repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in e.chain() {
        let t = c.to_string();
        if !out.iter().any(|o| o.contains(&t)) {
            out.push(t);
        }
    }
    out.join(": ")
}
