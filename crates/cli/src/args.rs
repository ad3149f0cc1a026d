//! Every flag of every subcommand, defined once for parsing, `--help` and
//! the man pages.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use vmshift_model::DiskFormat;

/// Move virtual machines from VMware to QEMU/KVM: inspect, convert, check
/// and compare disk images.
#[derive(Debug, Parser)]
#[command(name = "vmshift", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show an image's format, size, backing file, snapshots and format details.
    Info(InfoArgs),
    /// Create a new, empty image.
    Create(CreateArgs),
    /// Copy an image into another format, keeping it sparse.
    Convert(ConvertArgs),
    /// Compare the guest-visible content of two images.
    Compare(CompareArgs),
    /// Show where each guest range of an image is stored.
    Map(MapArgs),
    /// Check an image's metadata for leaks and corruption.
    Check(CheckArgs),
}

/// Output styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON with qemu-img's field names.
    Json,
}

/// A disk format on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
}

impl From<FormatArg> for DiskFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => DiskFormat::Raw,
            FormatArg::Qcow2 => DiskFormat::Qcow2,
            FormatArg::Vmdk => DiskFormat::Vmdk,
        }
    }
}

/// Which files an image may name (backing files, data files).
#[derive(Debug, Clone, Args)]
pub struct GateArgs {
    /// Follow backing and data file names that are absolute, climb with
    /// '..', or lead outside the image's folder. Only for images you trust.
    #[arg(long)]
    pub allow_backing_outside: bool,
    /// Also accept files an image names under DIR (repeatable).
    #[arg(long = "root", value_name = "DIR")]
    pub roots: Vec<PathBuf>,
}

/// `vmshift info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// Also show every image down the backing chain.
    #[arg(long)]
    pub backing_chain: bool,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The image.
    pub file: PathBuf,
}

/// `vmshift create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Format of the new image.
    #[arg(short = 'f', long = "format", value_enum, default_value = "raw")]
    pub format: FormatArg,
    /// Format options, comma separated. qcow2: cluster_size=64k,
    /// compat=0.10|1.1, refcount_bits=1..64, compression_type=zlib|zstd,
    /// lazy_refcounts=on, backing_file=NAME, backing_fmt=FMT,
    /// preallocation=off|metadata. vmdk:
    /// subformat=monolithicSparse|streamOptimized|monolithicFlat|
    /// twoGbMaxExtentSparse|twoGbMaxExtentFlat,
    /// adapter_type=ide|lsilogic|buslogic|legacyESX, hwversion=N,
    /// toolsversion=N.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Backing file (same as -o backing_file=NAME).
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format (same as -o backing_fmt=FMT).
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The image to create.
    pub file: PathBuf,
    /// Virtual size: bytes, or with a suffix k, M, G, T (1024-based).
    /// Defaults to the backing file's size.
    pub size: Option<String>,
}

/// `vmshift convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Target format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    pub output_format: FormatArg,
    /// Target format options (see `create`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Compress the target (qcow2; VMDK streamOptimized is always compressed).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Show progress even when stderr is not a terminal.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Bytes of zeros needed to leave a hole (multiple of 512; 0 writes
    /// everything, fully allocating the target).
    #[arg(short = 'S', value_name = "SIZE", default_value = "4k")]
    pub sparse_size: String,
    /// Write into the existing DST (a block device or a pre-created image)
    /// instead of creating it.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// With -n: the target already reads as zeros, so zeros are not written.
    #[arg(long, requires = "no_create")]
    pub target_is_zero: bool,
    /// Replace DST if it exists.
    #[arg(long, conflicts_with = "no_create")]
    pub force: bool,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The source image (opened read-only).
    pub source: PathBuf,
    /// The image to write.
    pub target: PathBuf,
}

/// `vmshift compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    pub format_a: Option<FormatArg>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_enum)]
    pub format_b: Option<FormatArg>,
    /// Show progress even when stderr is not a terminal.
    #[arg(short = 'p')]
    pub progress: bool,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The first image.
    pub a: PathBuf,
    /// The second image.
    pub b: PathBuf,
}

/// `vmshift map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The image.
    pub file: PathBuf,
}

/// `vmshift check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The image.
    pub file: PathBuf,
}

/// The clap command, for the man page generator.
pub fn command() -> clap::Command {
    Cli::command()
}
