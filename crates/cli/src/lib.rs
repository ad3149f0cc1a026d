//! The `vmshift` command line: argument definitions (shared with the man
//! page generator) and the subcommands.

pub mod args;
pub mod cmd;
mod progress;
pub mod sandbox;
pub mod signals;

pub use args::{command, Cli};
