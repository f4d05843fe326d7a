//! The one seam between perch and the kernel's socket I/O: a small owned-buffer
//! trait with two implementations, io_uring (tokio-uring) and epoll (tokio).
//!
//! Everything above this module (connections, protocol, router) is written once
//! against [`Socket`] and [`Backend`]. Buffers are passed by value because io_uring
//! owns them while an operation is in flight; the epoll backend follows the same
//! shape so the calling code cannot tell the two apart.
//!
//! This module does not parse, route or time anything out. Reads are never raced
//! against timers here or above: an io_uring read that loses a `select!` is not
//! cancelled in the kernel and would swallow bytes. Connections are ended by
//! `shutdown(2)` on the descriptor instead, which completes the pending read.

pub(crate) mod epoll;
#[cfg(feature = "uring")]
pub(crate) mod uring;

use std::io;
use std::os::fd::RawFd;

/// Which backend runs, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring when the kernel offers it, epoll otherwise.
    Auto,
    /// io_uring or fail to start.
    Uring,
    /// epoll (tokio's reactor).
    Epoll,
}

/// The backend that was actually selected, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selected {
    Uring,
    Epoll,
}

/// A connected stream socket with owned-buffer I/O.
pub(crate) trait Socket: 'static {
    /// Whether a connection over it can move to another shard
    /// (`runtime/moves.rs`): not TLS, whose state stays with its shard.
    const MOVABLE: bool = true;
    /// Reads into the spare capacity of `buf` (after its current length). Returns the
    /// number of bytes read, 0 at end of stream, and the buffer with its length grown.
    /// The caller guarantees spare capacity is non-zero.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`, handing it back for reuse.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// The descriptor, for `shutdown(2)` from timers and the router.
    fn raw_fd(&self) -> RawFd;
}

/// A way of running a shard and adopting accepted sockets into it.
pub(crate) trait Backend: 'static {
    type Socket: Socket;
    /// Whether busy-polling after activity (`spin_us`) helps. Not on io_uring:
    /// tokio-uring submits queued operations only when the thread parks, so a
    /// spinning shard would hold back its own reads and writes.
    const SPIN_HELPS: bool;
    /// Adopts a socket accepted (possibly on another shard) into this shard's backend.
    fn adopt(stream: std::net::TcpStream) -> io::Result<Self::Socket>;
}

/// A second descriptor for a socket (close-on-exec), as a std stream: how a
/// connection leaves its shard's backend, which closes the original when it
/// drops its socket. The duplicate shares the open file description, so the
/// connection and its socket options are untouched.
pub(crate) fn duplicate(fd: RawFd) -> io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new one
    // (or -1), which the TcpStream then owns alone.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { std::net::TcpStream::from_raw_fd(dup) })
}

/// Ends both directions of a socket so that pending reads and writes on it complete.
/// Errors (already shut down, peer gone) are of no interest to the caller.
pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor we own; it does not close or reuse it.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Decides which backend runs for `mode`, probing the kernel for io_uring. Returns
/// the choice and a sentence for the log saying why.
pub fn select(mode: IoMode) -> Result<(Selected, String), String> {
    match mode {
        IoMode::Epoll => Ok((Selected::Epoll, "epoll requested".into())),
        IoMode::Uring => match probe_uring() {
            Ok(()) => Ok((Selected::Uring, "io_uring requested and available".into())),
            Err(e) => Err(format!("io_uring requested but unavailable: {e}")),
        },
        IoMode::Auto => match probe_uring() {
            Ok(()) => Ok((Selected::Uring, "io_uring available".into())),
            Err(e) if uring_missing(&e) => Ok((
                Selected::Epoll,
                format!("io_uring unavailable: {e}; falling back to epoll"),
            )),
            Err(e) => Err(format!("io_uring probe failed unexpectedly: {e}")),
        },
    }
}

/// Sets up (and drops) a ring as the shards would: Ok when io_uring works here
/// (`perch doctor` explains the error otherwise). ENOSYS in a build without
/// the io_uring backend.
pub fn probe_io_uring() -> io::Result<()> {
    probe_uring()
}

/// ENOSYS (old kernel, qemu-user), EPERM (seccomp, io_uring_disabled) and EINVAL
/// (flags unknown to the kernel) mean "not here"; anything else is a real failure.
fn uring_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EINVAL) | Some(libc::EACCES)
    )
}

#[cfg(feature = "uring")]
fn probe_uring() -> io::Result<()> {
    uring::probe()
}

#[cfg(not(feature = "uring"))]
fn probe_uring() -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}
