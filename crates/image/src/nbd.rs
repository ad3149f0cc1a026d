//! An NBD server for one disk, on a Unix socket.
//!
//! It lets another program (QEMU, `qemu-img`) read a disk exactly as
//! vmshift reads it — through vmshift's drivers and the gate that opened
//! the image — without that program opening the image's files (backing
//! files, VMDK extents) itself. The export is the guest-visible bytes
//! (format raw for the client). An image ([`NbdServer::start`]) is served
//! read-only: writes, trims and write-zeroes get `EPERM`. An [`NbdExport`]
//! that accepts writes (`vm boot`'s copy-on-write overlay) is served
//! writable; what it does with the writes is its own affair, and its errors
//! reach the client as `ENOSPC`, `EINVAL` or `EIO`.
//!
//! Protocol: the NBD "fixed newstyle" handshake (`NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_ABORT`; other options are
//! answered `NBD_REP_ERR_UNSUP`) and simple replies in transmission
//! (doc/proto.md of the NBD project).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::block::ImageReader;
use crate::error::{Error, Result};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;

/// Transmission flags: HAS_FLAGS | SEND_FLUSH, and READ_ONLY.
const FLAGS_WRITABLE: u16 = 1 | 4;
const FLAG_READ_ONLY: u16 = 2;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// What an NBD server serves: a disk's bytes, and possibly a place for
/// writes.
pub trait NbdExport: Send + Sync {
    /// The disk size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (the range is inside the disk).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// True when writes are accepted.
    fn writable(&self) -> bool {
        false
    }
    /// Writes `data` at `offset` (the range is inside the disk). An error
    /// of kind `StorageFull` reaches the client as `ENOSPC`,
    /// `InvalidInput` as `EINVAL`, anything else as `EIO`.
    fn write_at(&self, _data: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    /// Makes earlier writes durable.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An image is served read-only.
impl NbdExport for Arc<dyn ImageReader> {
    fn size(&self) -> u64 {
        ImageReader::size(&**self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        ImageReader::read_at(&**self, buf, offset).map_err(std::io::Error::other)
    }
}

/// The NBD error number for a failed export call.
fn errno(e: &std::io::Error) -> u32 {
    match e.kind() {
        std::io::ErrorKind::StorageFull => ENOSPC,
        std::io::ErrorKind::InvalidInput => EINVAL,
        std::io::ErrorKind::PermissionDenied => EPERM,
        _ => EIO,
    }
}

/// The longest option payload accepted (an export name and a few info
/// requests need far less).
const MAX_OPTION: u32 = 64 << 10;
/// The longest read or write payload (QEMU's own limit is 32 MiB).
const MAX_REQUEST: u32 = 32 << 20;

/// An NBD server running on a Unix socket until dropped.
#[derive(Debug)]
pub struct NbdServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// The listening socket, owned by the accept thread until it ends.
    listener_fd: std::os::fd::RawFd,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Serves `image`, read-only, on a new Unix socket at `socket` (which
    /// must not exist), to any number of clients one after another or at
    /// once.
    pub fn start(image: Arc<dyn ImageReader>, socket: &Path) -> Result<NbdServer> {
        Self::start_export(Arc::new(image), socket)
    }

    /// Serves `export` (writable when it says so) on a new Unix socket at
    /// `socket`, as [`NbdServer::start`] does.
    pub fn start_export(image: Arc<dyn NbdExport>, socket: &Path) -> Result<NbdServer> {
        Self::start_confined(image, socket, None)
    }

    /// Serves `export` as [`NbdServer::start_export`] does, its threads
    /// confined by `confine` (the caller's sandbox, called on the accept
    /// thread before it accepts anyone; the client threads it starts
    /// inherit it): the threads that read the clients' requests open,
    /// run and connect nothing.
    pub fn start_confined(
        image: Arc<dyn NbdExport>,
        socket: &Path,
        confine: Option<fn() -> std::result::Result<(), String>>,
    ) -> Result<NbdServer> {
        let listener = UnixListener::bind(socket)
            .map_err(|e| Error::io(socket, "creating the NBD socket", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let (confined_tx, confined_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("nbd".into())
            .spawn(move || {
                let sandbox = confine.map_or(Ok(()), |c| c());
                let refused = sandbox.is_err();
                let _ = confined_tx.send(sandbox);
                if refused {
                    return;
                }
                // One thread per client, at most NBD_CONNECTIONS at once:
                // a client past that is closed at once, so that clients
                // cannot make the server start threads without bound.
                let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if live.load(Ordering::SeqCst) >= vmshift_model::limits::NBD_CONNECTIONS {
                        drop(conn);
                        continue;
                    }
                    live.fetch_add(1, Ordering::SeqCst);
                    let image = image.clone();
                    let done = live.clone();
                    // A client that breaks the protocol only loses its own
                    // connection.
                    let spawned =
                        std::thread::Builder::new()
                            .name("nbd-client".into())
                            .spawn(move || {
                                let _ = serve(conn, &*image);
                                done.fetch_sub(1, Ordering::SeqCst);
                            });
                    if spawned.is_err() {
                        live.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })
            .map_err(|e| Error::io(socket, "starting the NBD server", e))?;
        let sandbox = confined_rx
            .recv()
            .unwrap_or_else(|_| Err("the server thread ended".into()));
        if let Err(e) = sandbox {
            let _ = thread.join();
            let _ = std::fs::remove_file(socket);
            return Err(Error::io(
                socket,
                "confining the NBD server",
                std::io::Error::other(e),
            ));
        }
        Ok(NbdServer {
            path: socket.to_path_buf(),
            stop,
            listener_fd,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag (even if the socket's
        // file has been removed, when connecting to it would not).
        // SAFETY: the fd is the listener's, which the accept thread owns
        // and closes only when its loop ends — after this wakes it, as
        // the thread is joined below; shutdown() does not close the fd.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_u16(s: &mut UnixStream) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut UnixStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut UnixStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn option_reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)
}

/// One client: handshake, then requests until it disconnects.
fn serve(mut s: UnixStream, image: &dyn NbdExport) -> std::io::Result<()> {
    let size = image.size();
    let flags = if image.writable() {
        FLAGS_WRITABLE
    } else {
        FLAGS_WRITABLE | FLAG_READ_ONLY
    };
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(&mut s)?;
    if client & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(protocol("unknown client flags"));
    }
    let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        if read_u64(&mut s)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let opt = read_u32(&mut s)?;
        let len = read_u32(&mut s)?;
        if len > MAX_OPTION {
            return Err(protocol("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut r = Vec::new();
                r.extend_from_slice(&size.to_be_bytes());
                r.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                break;
            }
            OPT_INFO | OPT_GO => {
                // name length, name, number of info requests, requests
                let name_len = data
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
                let well_formed = name_len.is_some_and(|n| {
                    n.checked_add(6).is_some_and(|need| data.len() >= need) && {
                        let k = u16::from_be_bytes([data[4 + n], data[5 + n]]) as usize;
                        data.len() == 6 + n + 2 * k
                    }
                });
                if !well_formed {
                    option_reply(&mut s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                let mut info = Vec::new();
                info.extend_from_slice(&0u16.to_be_bytes()); // NBD_INFO_EXPORT
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(&mut s, opt, REP_INFO, &info)?;
                option_reply(&mut s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            OPT_ABORT => {
                option_reply(&mut s, opt, REP_ACK, &[])?;
                return Ok(());
            }
            _ => option_reply(&mut s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    transmission(s, image)
}

fn simple_reply(s: &mut UnixStream, error: u32, cookie: u64, data: &[u8]) -> std::io::Result<()> {
    let mut r = Vec::with_capacity(16 + data.len());
    r.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)
}

fn transmission(mut s: UnixStream, image: &dyn NbdExport) -> std::io::Result<()> {
    let size = image.size();
    let mut buf = Vec::new();
    let in_range = |offset: u64, len: u32| {
        offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size)
    };
    loop {
        if read_u32(&mut s)? != REQUEST_MAGIC {
            return Err(protocol("bad request magic"));
        }
        let _flags = read_u16(&mut s)?;
        let kind = read_u16(&mut s)?;
        let cookie = read_u64(&mut s)?;
        let offset = read_u64(&mut s)?;
        let len = read_u32(&mut s)?;
        match kind {
            CMD_READ => {
                if len > MAX_REQUEST || !in_range(offset, len) {
                    simple_reply(&mut s, EINVAL, cookie, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match image.read_at(&mut buf, offset) {
                    Ok(()) => simple_reply(&mut s, 0, cookie, &buf)?,
                    Err(e) => simple_reply(&mut s, errno(&e), cookie, &[])?,
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Err(protocol("write payload too long"));
                }
                // The payload is read in any case: it is part of the stream.
                let error = if !image.writable() {
                    std::io::copy(&mut (&mut s).take(u64::from(len)), &mut std::io::sink())?;
                    EPERM
                } else {
                    buf.resize(len as usize, 0);
                    s.read_exact(&mut buf)?;
                    if !in_range(offset, len) {
                        // The protocol's answer to a write past the end.
                        ENOSPC
                    } else {
                        image.write_at(&buf, offset).err().map_or(0, |e| errno(&e))
                    }
                };
                simple_reply(&mut s, error, cookie, &[])?;
            }
            CMD_DISC => return Ok(()),
            CMD_FLUSH => {
                let error = image.flush().err().map_or(0, |e| errno(&e));
                simple_reply(&mut s, error, cookie, &[])?
            }
            // TRIM, WRITE_ZEROES: not advertised; on a read-only export
            // they would change it.
            4 | 6 if !image.writable() => simple_reply(&mut s, EPERM, cookie, &[])?,
            _ => simple_reply(&mut s, EINVAL, cookie, &[])?,
        }
    }
}
