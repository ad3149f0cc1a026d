//! Every flag of every subcommand, defined once for parsing, `--help` and
//! the man pages.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use vmshift_desc::mapping::NetTarget;
use vmshift_model::DiskFormat;

/// Move virtual machines from VMware to QEMU/KVM: inspect, convert, check
/// and compare disk images.
#[derive(Debug, Parser)]
#[command(name = "vmshift", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Do not confine the process (Landlock, seccomp, dropped
    /// capabilities) once the input is open; for debugging. no_new_privs
    /// is still set.
    #[arg(long, global = true)]
    pub no_sandbox: bool,
    /// Fail, instead of going on with seccomp alone, where the kernel has
    /// no Landlock to confine the files vmshift may open.
    #[arg(long, global = true)]
    pub require_landlock: bool,
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
    /// Show a disk image's partition table (MBR or GPT).
    Part(PartArgs),
    /// Grow or shrink an image in place (moving a GPT's backup to the new end).
    Resize(ResizeArgs),
    /// Read, check and convert whole VMs (.vmx, libvirt XML, Proxmox .conf, OVF/OVA).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Read what is inside a guest's disks, offline: its file systems and
    /// files (ext2/3/4 and FAT read; XFS, NTFS, btrfs, LVM, swap named).
    #[command(subcommand)]
    Guest(GuestCommand),
}

/// `vmshift guest …`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// What the guest is, read offline (like virt-inspector): Linux
    /// distribution and version, host name, architecture, package manager,
    /// mount points resolved from fstab, kernels, VMware Tools, and what
    /// will trip the migration.
    Inspect(GuestFsArgs),
    /// List the file systems on the disks: device, type, UUID, label, size
    /// (like virt-filesystems --long).
    Filesystems(GuestFsArgs),
    /// List a directory of the guest (like virt-ls).
    Ls(GuestLsArgs),
    /// Print a file of the guest (like virt-cat).
    Cat(GuestCatArgs),
}

/// The disks a guest command reads.
#[derive(Debug, Clone, Args)]
pub struct GuestSource {
    /// A disk image, or a VM descriptor (.vmx, .xml, .conf, .ovf, .ova)
    /// whose hard disks are read in order (/dev/sda, /dev/sdb, …).
    pub image: PathBuf,
    /// The image's format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Another disk of the same guest (/dev/sdb, /dev/sdc, … after IMAGE),
    /// like virt-ls's -a: a volume group may span several disks.
    #[arg(short = 'a', long = "add", value_name = "IMAGE")]
    pub add: Vec<PathBuf>,
    /// The descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from: Option<VmFormatArg>,
    #[command(flatten)]
    pub roots: DiskRootArgs,
    #[command(flatten)]
    pub gate: GateArgs,
}

/// `vmshift guest filesystems` and `guest inspect`.
#[derive(Debug, Args)]
pub struct GuestFsArgs {
    #[command(flatten)]
    pub source: GuestSource,
    /// More disks of the same guest, in order (as -a).
    #[arg(value_name = "IMAGE")]
    pub more: Vec<PathBuf>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// `vmshift guest ls`.
#[derive(Debug, Args)]
pub struct GuestLsArgs {
    #[command(flatten)]
    pub source: GuestSource,
    /// Long listing: mode, size, modification time, name (and a symlink's
    /// target).
    #[arg(short = 'l', long)]
    pub long: bool,
    /// The directory: a path in the guest's root file system, or one
    /// prefixed with a file system (`/dev/sda1:/EFI`).
    #[arg(default_value = "/")]
    pub path: String,
}

/// `vmshift guest cat`.
#[derive(Debug, Args)]
pub struct GuestCatArgs {
    #[command(flatten)]
    pub source: GuestSource,
    /// The file: a path in the guest's root file system, or one prefixed
    /// with a file system (`/dev/sda1:/EFI/BOOT/BOOTX64.EFI`).
    pub path: String,
}

/// How new space is provided when growing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum PreallocArg {
    /// Sparse.
    #[default]
    Off,
    /// Tables and clusters allocated, nothing written (qcow2).
    Metadata,
    /// Reserved with fallocate (raw, flat VMDK; qcow2 clusters allocated too).
    Falloc,
    /// Zeros written (raw, flat VMDK; qcow2 clusters allocated too).
    Full,
}

/// `vmshift resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Quiet: print nothing but errors (qemu-img's -q).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Allow the image to become smaller.
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink: cut even when data or a partition lies beyond the new
    /// end (a GPT cannot list a partition past the disk: shrink that one
    /// first, or keep the table as it is with --no-fix-gpt).
    #[arg(long, requires = "shrink")]
    pub force: bool,
    /// How new space is provided.
    #[arg(long, value_enum, default_value_t)]
    pub preallocation: PreallocArg,
    /// Move a GPT's backup header and entries to the new end and update the
    /// primary header (the default when a GPT is found).
    #[arg(long, overrides_with = "no_fix_gpt")]
    pub fix_gpt: bool,
    /// Leave a GPT's backup header where it is, as qemu-img resize does.
    #[arg(long, overrides_with = "fix_gpt")]
    pub no_fix_gpt: bool,
    /// Also extend partition N (the one that ends last) to the new end; the
    /// filesystem inside is grown from the guest.
    #[arg(long, value_name = "N")]
    pub grow_partition: Option<u32>,
    /// The image (changed in place).
    pub file: PathBuf,
    /// The new size (`20G`), or a change (`+10G`, `-1G`).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// `vmshift part`.
#[derive(Debug, Args)]
pub struct PartArgs {
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

/// `vmshift vm …`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Print a VM descriptor as vmshift's model, with its findings.
    Inspect(VmInspectArgs),
    /// Check a VM descriptor and the disks it names; exit 1 on errors, 2
    /// when the descriptor cannot be read.
    Validate(VmValidateArgs),
    /// Convert a whole VM: its descriptor and every disk.
    Convert(VmConvertArgs),
    /// Show what differs between two VM descriptors (through the model).
    Diff(VmDiffArgs),
    /// Boot a VM (or a bare disk) on KVM through vmshift's own disk
    /// drivers and say from its console whether it came up.
    Boot(VmBootArgs),
}

/// The engine `vm boot` runs the guest on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// vmshift's own launcher on /dev/kvm (virtio-blk and virtio-scsi disks).
    Kvm,
    /// QEMU (KVM where /dev/kvm boots stock kernels, software emulation
    /// otherwise), with the VM's own disk controllers; the disks are
    /// served to it from vmshift's drivers.
    Qemu,
}

/// `vm boot` output styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum BootOutput {
    /// A verdict line and, on failure, the likely fix and the console's end.
    #[default]
    Human,
    /// One JSON object.
    Json,
}

/// `vmshift vm boot`.
#[derive(Debug, Args)]
pub struct VmBootArgs {
    /// The descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from: Option<VmFormatArg>,
    /// Image format of a bare disk given instead of a descriptor (probed
    /// when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// The kernel to boot (bzImage or uncompressed ELF vmlinux) instead of
    /// the guest's own (the default entry of its grub.cfg or BootLoaderSpec
    /// entries, read from its disks).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The initramfs (with --kernel; default: none).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line instead of the guest's own (`console=ttyS0`
    /// is added when missing).
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Guest memory in MiB (default: the VM's own; 1024 for a bare disk).
    #[arg(long, value_name = "MiB")]
    pub memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Seconds to wait for a verdict.
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub timeout: u64,
    /// The console line (a regular expression) that means the guest is up
    /// (default: a login prompt, or systemd reaching the multi-user or
    /// graphical target).
    #[arg(long, value_name = "REGEX")]
    pub expect: Option<String>,
    /// Show the guest's console on the terminal as it boots.
    #[arg(long)]
    pub console: bool,
    /// Write the guest's console to FILE.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Guest writes kept in memory, over all the VM's disks (bytes, or
    /// with K, M, G); past it the guest's writes fail. The images are never written (with
    /// --engine qemu too: QEMU writes through vmshift).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub overlay_limit: String,
    /// Keep the guest's writes in an unlinked temporary file in DIR
    /// instead of memory (for large runs; still within --overlay-limit).
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// The engine. By default vmshift's launcher runs where /dev/kvm boots
    /// stock kernels and refuses a kvm_pvm host; `--engine kvm` runs it
    /// anyway.
    #[arg(long, value_enum)]
    pub engine: Option<EngineArg>,
    /// The QEMU system emulator for --engine qemu (implies it; default:
    /// qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: BootOutput,
    #[command(flatten)]
    pub roots: DiskRootArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub gate: GateArgs,
    /// Leave out the device at ADDR (scsi0:1, as vm inspect shows it): a
    /// raw device mapping, say, that the boot check cannot read.
    /// Repeatable.
    #[arg(long, value_name = "ADDR", value_parser = parse_device_address)]
    pub skip_device: Vec<String>,
    /// Boot the built-in probe guest instead of a kernel: it reads each
    /// disk (given as images, each on virtio-blk) through vmshift-kvm and
    /// vmshift's disk drivers and prints its partition table and first
    /// file system. A self-test that runs on any /dev/kvm, kvm_pvm too.
    #[arg(long, conflicts_with_all = ["kernel", "append", "expect", "from"])]
    pub probe: bool,
    /// A VM descriptor (.vmx, libvirt .xml, Proxmox .conf, .ovf, .ova) or a
    /// disk image; with --probe, one or more disk images.
    #[arg(required = true, value_name = "VM-OR-DISK")]
    pub vm: Vec<PathBuf>,
}

/// A descriptor format on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VmFormatArg {
    /// VMware .vmx.
    Vmx,
    /// libvirt domain XML.
    Libvirt,
    /// Proxmox VE qemu-server .conf.
    Proxmox,
    /// OVF descriptor.
    Ovf,
    /// OVA archive (OVF + disks in a tar).
    Ova,
}

/// What to do with a VMware VM that is not at rest.
#[derive(Debug, Clone, Copy, Args)]
pub struct StateArgs {
    /// Go on although the VMware VM is suspended (a .vmss or .vmem beside
    /// its .vmx, or checkpoint.vmState set): its disks lack what its
    /// memory holds. The report says so.
    #[arg(long)]
    pub allow_suspended: bool,
    /// Go on although VMware's lock folders (*.lck) are beside the .vmx or
    /// its disks (the VM is running, or a crash left them). The report says
    /// so.
    #[arg(long)]
    pub allow_locked: bool,
}

/// What to do with devices a conversion cannot copy (raw device
/// mappings, passthrough disks, host block devices).
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Leave out the device at ADDR (scsi0:1, sata0:2, ide1:0, as vm
    /// inspect shows them). Repeatable; the report says so.
    #[arg(long, value_name = "ADDR", value_parser = parse_device_address)]
    pub skip_device: Vec<String>,
    /// Give the new VM the host block device /dev/… in place of the disk
    /// at ADDR (an RDM's LUN, as the KVM host sees it); nothing is copied.
    /// Repeatable.
    #[arg(long, value_name = "ADDR=/dev/…", value_parser = parse_device_map)]
    pub map_device: Vec<(String, String)>,
}

impl DeviceArgs {
    /// The choices, for the pipeline.
    pub fn choices(&self) -> vmshift_vm::devices::DeviceChoices {
        vmshift_vm::devices::DeviceChoices {
            skip: self.skip_device.clone(),
            map: self.map_device.clone(),
        }
    }
}

fn parse_device_address(text: &str) -> Result<String, String> {
    vmshift_vm::devices::DeviceChoices::parse_address(text)
}

fn parse_device_map(text: &str) -> Result<(String, String), String> {
    vmshift_vm::devices::DeviceChoices::parse_map(text)
}

/// Where the disks a descriptor names may be found.
#[derive(Debug, Clone, Args)]
pub struct DiskRootArgs {
    /// Map a VMware datastore to a local folder: `[NAME] path` and
    /// `/vmfs/volumes/NAME/path` resolve under DIR (repeatable).
    #[arg(long = "datastore", value_name = "NAME=DIR")]
    pub datastores: Vec<String>,
    /// Map a Proxmox storage to a local folder: `NAME:volume` resolves
    /// under DIR (repeatable).
    #[arg(long = "storage-map", value_name = "NAME=DIR")]
    pub storages: Vec<String>,
    /// Also accept disks under DIR (repeatable); by default a disk must lie
    /// in the descriptor's own folder.
    #[arg(long = "disk-root", value_name = "DIR")]
    pub disk_roots: Vec<PathBuf>,
}

/// Model output styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ModelOutput {
    /// TOML.
    #[default]
    Toml,
    /// JSON.
    Json,
}

/// `vmshift vm inspect`.
#[derive(Debug, Args)]
pub struct VmInspectArgs {
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: ModelOutput,
    /// The descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from: Option<VmFormatArg>,
    /// Also read the guest inside the disks, offline (as `guest inspect`),
    /// and add what it will trip over on KVM to the findings.
    #[arg(long)]
    pub guest: bool,
    #[command(flatten)]
    pub roots: DiskRootArgs,
    /// Read the disks even if a running VM or another QEMU process holds
    /// their locks (qemu-img's -U).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// The descriptor (.vmx, .xml, .conf, .ovf, .ova).
    pub vm: PathBuf,
}

/// `vmshift vm validate`.
#[derive(Debug, Args)]
pub struct VmValidateArgs {
    /// libvirt XML: also check it against libvirt's RelaxNG schema, as
    /// installed on this machine (`--libvirt-schema=DIR`: the folder holding
    /// domain.rng; default /usr/share/libvirt/schemas).
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true, default_missing_value = "/usr/share/libvirt/schemas")]
    pub libvirt_schema: Option<PathBuf>,
    /// The descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from: Option<VmFormatArg>,
    #[command(flatten)]
    pub roots: DiskRootArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub devices: DeviceArgs,
    /// Read the disks even if a running VM or another QEMU process holds
    /// their locks (qemu-img's -U).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// The descriptor.
    pub vm: PathBuf,
}

/// What `vm convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VmTargetArg {
    /// A libvirt domain XML (`virsh define NAME.xml`).
    Libvirt,
    /// A Proxmox VE VM (`<vmid>.conf` and a directory-storage layout).
    Proxmox,
    /// A VMware .vmx.
    Vmx,
    /// A qemu-system-x86_64 command line, as a shell script.
    QemuArgs,
}

/// `vmshift vm convert`.
#[derive(Debug, Args)]
pub struct VmConvertArgs {
    /// The descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from: Option<VmFormatArg>,
    /// What to produce.
    #[arg(long, value_enum)]
    pub to: VmTargetArg,
    /// The folder to write into (created if missing); nothing is written
    /// outside it.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The disks' format (default: qcow2; vmdk for --to vmx).
    #[arg(long, value_enum)]
    pub disk_format: Option<FormatArg>,
    /// libvirt: the folder the disks will live in on the hypervisor (the
    /// XML names them there; default: their absolute path under --out).
    #[arg(long, value_name = "DIR")]
    pub target_dir: Option<PathBuf>,
    /// Keep controller and NIC models QEMU can emulate instead of virtio.
    #[arg(long)]
    pub keep_models: bool,
    /// Use virtio disks and NICs even for Windows guests (install the
    /// virtio drivers first).
    #[arg(long)]
    pub virtio: bool,
    /// Proxmox: the VM id (100 to 999999999, as Proxmox accepts).
    #[arg(long, requires = "storage", value_parser = clap::value_parser!(u32).range(100..=999_999_999))]
    pub vmid: Option<u32>,
    /// Proxmox: the directory storage the disks go to.
    #[arg(long, requires = "vmid")]
    pub storage: Option<String>,
    /// Where a source network goes: NAME is a port group, a libvirt
    /// network or bridge, or VMware's bridged, nat, hostonly or vmnetN;
    /// TARGET is network:NAME (libvirt), bridge:NAME or
    /// bridge:NAME,tag=VLAN. Repeatable.
    #[arg(long, value_name = "NAME=TARGET", value_parser = parse_network_map)]
    pub network_map: Vec<(String, NetTarget)>,
    /// The host bridge for every NIC that --network-map does not name and
    /// that is not on VMware NAT, host-only or a custom vmnet.
    #[arg(long, value_name = "BRIDGE", value_parser = parse_bridge)]
    pub bridge: Option<String>,
    /// Write only the descriptor (disk names as a full run would give
    /// them); copy no disk.
    #[arg(long)]
    pub descriptor_only: bool,
    /// Replace files that exist in --out.
    #[arg(long)]
    pub force: bool,
    /// Show progress even when stderr is not a terminal.
    #[arg(short = 'p')]
    pub progress: bool,
    #[command(flatten)]
    pub roots: DiskRootArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub devices: DeviceArgs,
    /// Read the disks even if a running VM or another QEMU process holds
    /// their locks (qemu-img's -U).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// The source VM's descriptor.
    pub vm: PathBuf,
}

/// `vmshift vm diff`.
#[derive(Debug, Args)]
pub struct VmDiffArgs {
    /// The first descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from_a: Option<VmFormatArg>,
    /// The second descriptor's format (by extension when omitted).
    #[arg(long, value_enum)]
    pub from_b: Option<VmFormatArg>,
    /// The first descriptor.
    pub a: PathBuf,
    /// The second descriptor.
    pub b: PathBuf,
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

/// A cache mode, as qemu-img names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// Page cache; flushed at the end.
    Writeback,
    /// Each write reaches the disk (for an output: flushed at the end).
    Writethrough,
    /// qemu-img: bypass the page cache. Source: refused (no O_DIRECT
    /// reads); output: written through the page cache, flushed at the end.
    None,
    /// qemu-img: bypass the page cache, each write synced. Source:
    /// refused; output: written through the page cache, flushed at the end.
    Directsync,
    /// Page cache, never flushed.
    Unsafe,
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
    /// Read the image even if a running VM or another QEMU process holds
    /// its lock (qemu-img's -U); what the VM writes meanwhile may be read
    /// half-written.
    #[arg(short = 'U', long)]
    pub force_share: bool,
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
    /// Quiet: print nothing but errors (qemu-img's -q).
    #[arg(short = 'q')]
    pub quiet: bool,
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
    /// Quiet: print nothing but errors (qemu-img's -q).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Source format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Target format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    pub output_format: FormatArg,
    /// Target format options (see `create`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Make the target (qcow2) an overlay of BACKING: only what the
    /// source's top image holds is written, and what the source reads from
    /// its own backing chain is left to read through BACKING (qemu-img's
    /// -B). Needs -F.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// The format of the -B backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT", value_enum)]
    pub backing_format: Option<FormatArg>,
    /// Copy with N parallel workers (qemu-img's coroutines), 1 to 16;
    /// default: the CPU count, at most 8.
    #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u8).range(1..=16))]
    pub workers: Option<u8>,
    /// Compress the target (qcow2; VMDK streamOptimized is always compressed).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Let workers write the target out of order, as they finish
    /// (qemu-img's -W); by default the target is written in guest order.
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Read what can be read: a sector that cannot be read (or whose
    /// allocation cannot be) is written as zeros, with a warning naming its
    /// offset (qemu-img's --salvage).
    #[arg(long)]
    pub salvage: bool,
    /// The target's cache mode, as qemu-img's -t: writeback, writethrough,
    /// none and directsync all end with the data flushed to disk before the
    /// output is put in place (vmshift writes through the page cache and
    /// starts writeback as it goes); unsafe skips that flush (faster; a
    /// host crash soon after may leave a damaged or empty output).
    /// qemu-img's own default for convert is unsafe; vmshift's is
    /// writeback.
    #[arg(
        short = 't',
        value_name = "CACHE",
        value_enum,
        default_value = "writeback"
    )]
    pub cache: CacheArg,
    /// The source's cache mode, as qemu-img's -T: writeback, writethrough
    /// and unsafe read through the page cache; none and directsync
    /// (O_DIRECT) are refused.
    #[arg(
        short = 'T',
        value_name = "SRC_CACHE",
        value_enum,
        default_value = "writeback"
    )]
    pub source_cache: CacheArg,
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
    /// Quiet: print nothing but errors (qemu-img's -q).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    pub format_a: Option<FormatArg>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_enum)]
    pub format_b: Option<FormatArg>,
    /// Strict: the sizes and the block status (allocation, zero, data,
    /// compression, host offset) must match too, as qemu-img's -s.
    #[arg(short = 's', long)]
    pub strict: bool,
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
    /// Map from this guest offset (bytes, or with K, M, G).
    #[arg(long, value_name = "OFFSET")]
    pub start_offset: Option<String>,
    /// Map at most this many bytes.
    #[arg(long, value_name = "LEN")]
    pub max_length: Option<String>,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The image.
    pub file: PathBuf,
}

/// `vmshift check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Quiet: print nothing but errors (qemu-img's -q).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// Repair in place (qcow2), as qemu-img's -r: `leaks` lowers refcounts
    /// that no metadata accounts for; `all` also raises refcounts that are
    /// too low, rebuilds the refcount structure where a used cluster has
    /// refcount 0, and sets OFLAG_COPIED right. Damage that needs L1/L2
    /// tables rewritten is refused before anything is written.
    #[arg(short = 'r', long = "repair", value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairArg>,
    #[command(flatten)]
    pub gate: GateArgs,
    /// The image.
    pub file: PathBuf,
}

/// What `check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and the corruptions vmshift can repair.
    All,
}

/// The clap command, for the man page generator.
pub fn command() -> clap::Command {
    Cli::command()
}

/// `--network-map NAME=TARGET`, split at the first `=` (port group names
/// may hold spaces, not `=`).
fn parse_network_map(text: &str) -> Result<(String, NetTarget), String> {
    let (name, target) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}': expected NAME=TARGET"))?;
    if name.trim().is_empty() {
        return Err(format!("'{text}': no network name before '='"));
    }
    Ok((name.to_string(), NetTarget::parse(target)?))
}

/// `--bridge NAME`: a Linux bridge name.
fn parse_bridge(text: &str) -> Result<String, String> {
    match NetTarget::parse(&format!("bridge:{text}"))? {
        NetTarget::Bridge { name, vlan: None } => Ok(name),
        _ => Err(format!("'{text}': a bridge name only (no ,tag=)")),
    }
}
