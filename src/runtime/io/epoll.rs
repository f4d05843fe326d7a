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

// Readiness is awaited through `poll_read_ready`/`poll_write_ready`, not
// `readable()`/`writable()`: only the poll functions take a unit of tokio's
// cooperative budget. With `readable()` a reader whose client keeps the
// socket full never yielded, and nothing else on its shard ran (its other
// connections, timers and control loop) until the stream paused. With the
// budget the reader yields after 128 reads in a row; a pub-sub stream on
// epoll went 4.4 → 9.9 M msg/s with this and `mailbox::Returned` together.
impl Socket for tokio::net::TcpStream {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        debug_assert!(buf.capacity() > buf.len(), "read needs spare capacity");
        loop {
            if let Err(e) = std::future::poll_fn(|cx| self.poll_read_ready(cx)).await {
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
            if let Err(e) = std::future::poll_fn(|cx| self.poll_write_ready(cx)).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A socket that stays readable does not keep its reader's task running:
    /// the other tasks of the shard get their turn (here after 128 reads, the
    /// cooperative budget). With `readable()` the reader read all 1024 chunks
    /// before anything else ran.
    #[test]
    fn a_reader_whose_socket_stays_readable_lets_other_tasks_run() {
        const BYTES: usize = 64 * 1024;
        const READ: usize = 64;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut writer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        std::io::Write::write_all(&mut writer, &[b'x'; BYTES]).expect("write");
        // Everything written is waiting in the receive queue before reading starts.
        let mut peek = vec![0u8; BYTES];
        while accepted.peek(&mut peek).expect("peek") < BYTES {
            std::thread::yield_now();
        }
        let (read, other_ran) = run(async move {
            let socket = Epoll::adopt(accepted).expect("adopt");
            let other_ran = Rc::new(Cell::new(false));
            let reader = tokio::task::spawn_local({
                let other_ran = Rc::clone(&other_ran);
                async move {
                    let mut read = 0;
                    let mut buf = Vec::with_capacity(READ);
                    while read < BYTES && !other_ran.get() {
                        buf.clear();
                        let (result, back) = socket.read(buf).await;
                        buf = back;
                        read += result.expect("read");
                        if read == READ {
                            // The reactor has seen the socket readable (the
                            // first read waited for that); from here on every
                            // read finds bytes waiting.
                            tokio::task::spawn_local({
                                let other_ran = Rc::clone(&other_ran);
                                async move { other_ran.set(true) }
                            });
                        }
                    }
                    read
                }
            });
            let read = reader.await.expect("reader");
            (read, other_ran.get())
        })
        .expect("runtime");
        assert!(other_ran);
        assert!(
            read < BYTES,
            "the reader read all {read} bytes before the other task ran"
        );
        drop(writer);
    }
}
