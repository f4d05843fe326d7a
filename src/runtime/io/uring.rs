//! The io_uring backend on tokio-uring. The ring is sized for thousands of
//! connections per shard (1024 SQ entries, 8192 CQ entries; the default 256 fill
//! up under ~1000 connections and force extra submits) and set up with
//! COOP_TASKRUN + SINGLE_ISSUER (one shard thread owns the ring). DEFER_TASKRUN is
//! never used: it hangs tokio-uring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tokio_uring::buf::BoundedBuf;

use super::{Backend, Socket};

// The kernel allocates and maps a ring whole at setup, so its size is resident
// memory from the first second: 64 B per SQ entry, 16 B per CQ entry. 4096/16384
// cost 532 KiB per shard, over half of an idle broker's RSS on a 2-core gateway.
// The SQ only holds what a shard queued since its last submit, and tokio-uring
// submits when it is full, so 1024 costs at most one extra submit per 1024 ops.
// The CQ must hold every completion that lands between two harvests: about two
// ops in flight per connection (a read and a write), so 8192 keeps ~4000
// connections per shard from overflowing (an overflow is not lost, the kernel
// queues it, but it is slow). Together: 196 KiB per shard.
const SUBMISSION_ENTRIES: u32 = 1024;
const COMPLETION_ENTRIES: u32 = 8192;

pub(crate) struct Uring;

impl Backend for Uring {
    type Socket = UringSocket;
    const SPIN_HELPS: bool = false;

    fn adopt(stream: std::net::TcpStream) -> io::Result<Self::Socket> {
        // io_uring arms its own poll for blocking sockets; a non-blocking socket
        // would make reads fail with EAGAIN instead of waiting.
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        let fd = stream.as_raw_fd();
        Ok(UringSocket {
            stream: tokio_uring::net::TcpStream::from_std(stream),
            fd,
        })
    }
}

pub(crate) struct UringSocket {
    stream: tokio_uring::net::TcpStream,
    fd: RawFd,
}

impl Socket for UringSocket {
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let filled = buf.len();
        debug_assert!(buf.capacity() > filled, "read needs spare capacity");
        let (result, slice) = self.stream.read(buf.slice(filled..)).await;
        (result, slice.into_inner())
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        self.stream.write_all(buf).await
    }

    fn raw_fd(&self) -> RawFd {
        self.fd
    }
}

fn uring_builder(with_flags: bool) -> io_uring::Builder {
    let mut builder = tokio_uring::uring_builder();
    builder.setup_cqsize(COMPLETION_ENTRIES);
    if with_flags {
        builder.setup_coop_taskrun().setup_single_issuer();
    }
    builder
}

/// Whether this kernel accepts our ring flags (older kernels reject them with EINVAL).
fn flags_supported() -> io::Result<bool> {
    match uring_builder(true).build(SUBMISSION_ENTRIES) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            uring_builder(false).build(SUBMISSION_ENTRIES)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Sets up (and drops) one ring the way the shards will, to learn whether io_uring
/// is usable here before any shard starts.
pub(crate) fn probe() -> io::Result<()> {
    flags_supported().map(|_| ())
}

/// Runs `future` on a tokio-uring runtime on the current thread.
pub(crate) fn run<F: std::future::Future>(future: F) -> io::Result<F::Output> {
    let with_flags = flags_supported()?;
    let runtime = tokio_uring::Runtime::new(
        tokio_uring::builder()
            .entries(SUBMISSION_ENTRIES)
            .uring_builder(&uring_builder(with_flags)),
    )?;
    Ok(runtime.block_on(future))
}
