//! The epoll backend: tokio's reactor on a current-thread runtime. Used where
//! io_uring is missing (containers with default seccomp, qemu-user, old kernels)
//! and selectable with `--io epoll`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::{Backend, Socket};

pub(crate) struct Epoll;

impl Backend for Epoll {
    type Socket = tokio::net::TcpStream;
    const SPIN_HELPS: bool = true;

    fn adopt(stream: std::net::TcpStream) -> io::Result<Self::Socket> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        tokio::net::TcpStream::from_std(stream)
    }
}

impl Socket for tokio::net::TcpStream {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        debug_assert!(buf.capacity() > buf.len(), "read needs spare capacity");
        loop {
            if let Err(e) = self.readable().await {
                return (Err(e), buf);
            }
            match self.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return (result, buf),
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut written = 0;
        while written < buf.len() {
            if let Err(e) = self.writable().await {
                return (Err(e), buf);
            }
            match self.try_write(&buf[written..]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// Runs `future` on a current-thread tokio runtime with the epoll reactor.
pub(crate) fn run<F: std::future::Future>(future: F) -> io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&runtime, future))
}
