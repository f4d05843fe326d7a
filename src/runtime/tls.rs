//! A TLS byte stream over any [`Socket`]: [`TlsSocket`] is itself a `Socket`,
//! so the connection code, sessions and router above it are the same for
//! plain and encrypted clients, on both backends.
//!
//! rustls does the protocol (no I/O of its own): ciphertext read from the
//! inner socket is fed to it, plaintext comes out of it into the caller's
//! buffer; plaintext written is encrypted into its queue and drained to the
//! socket. The reader and the writer of a connection run concurrently in one
//! task, and both may have TLS records to send (the reader: handshake
//! messages and alerts; the writer: application data, with which rustls
//! also sends its answer to a TLS 1.3 key update). One rule keeps the records whole and in order on the socket:
//! **only the holder of `write_lock` drains rustls' queue, and it holds the
//! lock until that write completed.** Every `RefCell` borrow of the
//! connection ends before an await.
//!
//! Memory before the handshake ends is bounded: at most
//! [`HANDSHAKE_BYTES_MAX`] bytes may arrive before it completes (a ClientHello
//! is ~0.5–2 KiB, a client certificate chain a few KiB), and rustls refuses
//! handshake messages above 64 KiB on its own. Timeouts are not here: the
//! shard's housekeeping shuts the socket down (see io/mod.rs for why reads are
//! never raced against timers), which ends the pending read.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::os::fd::RawFd;

use rustls::ServerConnection;

use super::io::Socket;

/// Ciphertext a client may send before its handshake completes.
pub(crate) const HANDSHAKE_BYTES_MAX: usize = 32 * 1024;
/// The ciphertext read buffer of an idle connection (an io_uring read owns it
/// while it waits, so every idle connection holds one).
const CIPHER_READ_BYTES_MIN: usize = 256;
/// A read that fills the buffer doubles it, up to this: one full TLS record
/// (16 KiB of plaintext) plus its header and tag, times four.
const CIPHER_READ_BYTES_MAX: usize = 4 * (16 * 1024 + 256);

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The client closed, or the socket was shut down (the handshake timeout).
    #[error("connection closed during the TLS handshake")]
    Closed,
    /// The socket failed.
    #[error("TLS handshake: {0}")]
    Io(#[from] io::Error),
    /// The client's bytes are not an acceptable TLS handshake (rustls' reason).
    #[error("TLS handshake error: {0}")]
    Peer(rustls::Error),
    /// The client sent more than [`HANDSHAKE_BYTES_MAX`] before finishing.
    #[error("TLS handshake larger than {HANDSHAKE_BYTES_MAX} bytes")]
    TooLarge,
}

pub(crate) struct TlsSocket<S: Socket> {
    inner: S,
    conn: RefCell<ServerConnection>,
    /// Held by whoever drains rustls' outgoing queue, until its write completed.
    write_lock: tokio::sync::Mutex<()>,
    /// Ciphertext read from the socket and not yet taken by rustls (it takes
    /// only what its buffers have room for), from `cipher_pos` on. Taken out
    /// while a read is in flight.
    cipher_in: Cell<Vec<u8>>,
    cipher_pos: Cell<usize>,
    /// The size of the next socket read.
    cipher_read_bytes: Cell<usize>,
}

impl<S: Socket> TlsSocket<S> {
    pub(crate) fn new(inner: S, conn: ServerConnection) -> TlsSocket<S> {
        TlsSocket {
            inner,
            conn: RefCell::new(conn),
            write_lock: tokio::sync::Mutex::new(()),
            cipher_in: Cell::new(Vec::new()),
            cipher_pos: Cell::new(0),
            cipher_read_bytes: Cell::new(CIPHER_READ_BYTES_MIN),
        }
    }

    /// The socket under the TLS layer, for the plain-text INFO that precedes
    /// the handshake (nothing may be written to it after the handshake began).
    pub(crate) fn inner(&self) -> &S {
        &self.inner
    }

    /// The client's certificate chain (leaf first), when it sent one.
    pub(crate) fn peer_certificate(&self) -> Option<Vec<u8>> {
        let conn = self.conn.borrow();
        let chain = conn.peer_certificates()?;
        chain.first().map(|c| c.as_ref().to_vec())
    }

    /// Runs the handshake to its end. On a peer's error rustls' alert is
    /// sent before returning.
    pub(crate) async fn handshake(&self) -> Result<(), HandshakeError> {
        let mut received = 0usize;
        // A client whose first byte is not a TLS handshake record (0x16) is
        // not speaking TLS at all (a plain NATS client's CONNECT): closed
        // without an alert, as nats-server's Go TLS does.
        let mut speaks_tls = true;
        loop {
            self.flush().await?;
            if !self.conn.borrow().is_handshaking() {
                return Ok(());
            }
            match self.feed_buffered() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // rustls' alert says why, as nats-server's Go TLS does.
                    if speaks_tls {
                        let _ = self.flush().await;
                    }
                    return Err(e);
                }
            }
            let read = self.read_socket().await?;
            if read == 0 {
                return Err(HandshakeError::Closed);
            }
            if received == 0 {
                let cipher = self.cipher_in.take();
                speaks_tls = cipher.get(self.cipher_pos.get()) == Some(&0x16);
                self.cipher_in.set(cipher);
            }
            received += read;
            if received > HANDSHAKE_BYTES_MAX {
                return Err(HandshakeError::TooLarge);
            }
        }
    }

    /// Gives rustls the buffered ciphertext it has room for and runs the
    /// protocol on it. Ok(true) when it took some. A protocol error queues an
    /// alert (sent here) and is returned.
    fn feed_buffered(&self) -> Result<bool, HandshakeError> {
        let cipher = self.cipher_in.take();
        let pos = self.cipher_pos.get();
        let result = self.feed(&cipher[pos..]);
        let taken = match result {
            Ok(taken) => taken,
            Err(e) => {
                self.cipher_in.set(cipher);
                return Err(e);
            }
        };
        let mut cipher = cipher;
        if pos + taken == cipher.len() {
            cipher.clear();
            self.cipher_pos.set(0);
        } else {
            self.cipher_pos.set(pos + taken);
        }
        self.cipher_in.set(cipher);
        Ok(taken > 0)
    }

    fn feed(&self, mut bytes: &[u8]) -> Result<usize, HandshakeError> {
        let before = bytes.len();
        let mut conn = self.conn.borrow_mut();
        while !bytes.is_empty() {
            match conn.read_tls(&mut bytes) {
                Ok(0) => break,
                Ok(_) => {}
                // Its plaintext buffer is full: the caller must read it first.
                Err(_) => break,
            }
            if let Err(e) = conn.process_new_packets() {
                return Err(HandshakeError::Peer(e));
            }
        }
        Ok(before - bytes.len())
    }

    /// One socket read into `cipher_in` (after what is still buffered).
    /// Returns the bytes read; 0 at end of stream.
    async fn read_socket(&self) -> io::Result<usize> {
        let mut cipher = self.cipher_in.take();
        let size = self.cipher_read_bytes.get();
        if cipher.is_empty() && cipher.capacity() > 2 * size {
            // The burst is over: back to a small buffer.
            cipher = Vec::with_capacity(size);
        }
        if cipher.capacity() - cipher.len() < size {
            cipher.reserve_exact(size);
        }
        let spare = cipher.capacity() - cipher.len();
        let (result, cipher) = self.inner.read(cipher).await;
        // Bursts double the next read; a read that did not fill the room and
        // left nothing unconsumed brings it back to the idle size.
        let read = *result.as_ref().unwrap_or(&0);
        let next = if read == spare {
            (size * 2).min(CIPHER_READ_BYTES_MAX)
        } else {
            CIPHER_READ_BYTES_MIN
        };
        self.cipher_read_bytes.set(next);
        self.cipher_in.set(cipher);
        result
    }

    /// Sends whatever rustls has queued (handshake messages, alerts). Waits
    /// for the writer's write in flight, if any, to complete first.
    async fn flush(&self) -> io::Result<()> {
        if !self.conn.borrow().wants_write() {
            return Ok(());
        }
        let _guard = self.write_lock.lock().await;
        self.drain_locked().await
    }

    /// Drains rustls' queue to the socket; the caller holds `write_lock`.
    async fn drain_locked(&self) -> io::Result<()> {
        loop {
            let mut out = Vec::new();
            {
                let mut conn = self.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                return Ok(());
            }
            let (result, _) = self.inner.write_all(out).await;
            result?;
        }
    }
}

impl<S: Socket> Socket for TlsSocket<S> {
    const MOVABLE: bool = false;
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        debug_assert!(buf.capacity() > buf.len(), "read needs spare capacity");
        loop {
            // Plaintext rustls already decrypted comes first.
            {
                let start = buf.len();
                buf.resize(buf.capacity(), 0);
                let result = self.conn.borrow_mut().reader().read(&mut buf[start..]);
                match result {
                    // Ok(0): the client sent close_notify.
                    Ok(n) => {
                        buf.truncate(start + n);
                        return (Ok(n), buf);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(start),
                    Err(e) => {
                        buf.truncate(start);
                        return (Err(e), buf);
                    }
                }
            }
            if let Err(e) = self.flush().await {
                return (Err(e), buf);
            }
            match self.feed_buffered() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // The alert rustls queued goes out before the close.
                    let _ = self.flush().await;
                    return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf);
                }
            }
            match self.read_socket().await {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let _guard = self.write_lock.lock().await;
        // With no buffer limit (see `accept`) rustls takes it all at once.
        let queued = self.conn.borrow_mut().writer().write_all(&buf);
        if let Err(e) = queued {
            return (Err(e), buf);
        }
        let result = self.drain_locked().await;
        (result, buf)
    }

    fn raw_fd(&self) -> RawFd {
        self.inner.raw_fd()
    }
}

/// A server connection for one client, from the settings in force now.
pub(crate) fn server_connection(
    config: &std::sync::Arc<rustls::ServerConfig>,
) -> Result<ServerConnection, rustls::Error> {
    let mut conn = ServerConnection::new(std::sync::Arc::clone(config))?;
    // The writer drains after every write, so nothing accumulates: a limit
    // would only split a write (and make `write_all` fail).
    conn.set_buffer_limit(None);
    Ok(conn)
}

#[cfg(test)]
mod tests {
    //! TlsSocket over an in-memory socket against rustls' client, quinn-style:
    //! the test moves the bytes, so the interleaving of the reader's and the
    //! writer's records is exercised deterministically.

    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::*;

    /// A self-signed test certificate for "localhost" (CA:FALSE), valid until
    /// 2126, and its key: a fixture, not a secret.
    const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkTCCATigAwIBAgIUC7EaKMnHR0VDKL3oB75T8KHm2scwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMzE4MjMwMVoYDzIxMjYxMTA5
MTgyMzAxWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASZveuzOujeko7JaTBqg6ae3anbRHAbzeVEbI8gTqkZQw1downiNXV9
06WTniSehmzLht5y1kKo7EB3Zajmht7Do2YwZDAdBgNVHQ4EFgQULN4+AxN2jRVG
fHpQbX4DIz9X5DQwHwYDVR0jBBgwFoAULN4+AxN2jRVGfHpQbX4DIz9X5DQwFAYD
VR0RBA0wC4IJbG9jYWxob3N0MAwGA1UdEwEB/wQCMAAwCgYIKoZIzj0EAwIDRwAw
RAIgJdEzlgDJ5wk0fizHF9eHbVMDiMWFKwDKLhjoqLWzEYQCIANE2TBJ/QhCogGy
p4WH95NNA1Pp/ey/5d3BNpmRLI03
-----END CERTIFICATE-----\n";
    const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQDVOQTpzJWlGf3k5
qTkiwrl59uM/xcRJESLKqfh4Zf2hRANCAASZveuzOujeko7JaTBqg6ae3anbRHAb
zeVEbI8gTqkZQw1downiNXV906WTniSehmzLht5y1kKo7EB3Zajmht7D
-----END PRIVATE KEY-----\n";

    /// One direction of an in-memory connection.
    #[derive(Default)]
    struct Pipe {
        bytes: RefCell<VecDeque<u8>>,
        closed: std::cell::Cell<bool>,
        arrived: tokio::sync::Notify,
    }

    /// The server's end: reads from `inbound`, writes to `outbound`. A write
    /// stays "in flight" for longer the larger it is (as on a real socket, two
    /// writes in flight at once could land out of order or interleaved).
    struct MemSocket {
        inbound: Rc<Pipe>,
        outbound: Rc<Pipe>,
    }

    impl Socket for MemSocket {
        async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            loop {
                {
                    let mut bytes = self.inbound.bytes.borrow_mut();
                    if !bytes.is_empty() {
                        let room = buf.capacity() - buf.len();
                        let n = room.min(bytes.len());
                        buf.extend(bytes.drain(..n));
                        return (Ok(n), buf);
                    }
                }
                if self.inbound.closed.get() {
                    return (Ok(0), buf);
                }
                self.inbound.arrived.notified().await;
            }
        }

        async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            for _ in 0..1 + buf.len() / 16 {
                tokio::task::yield_now().await;
            }
            self.outbound.bytes.borrow_mut().extend(buf.iter());
            (Ok(()), buf)
        }

        fn raw_fd(&self) -> RawFd {
            -1
        }
    }

    fn server_config() -> Arc<rustls::ServerConfig> {
        let certs = CertificateDer::pem_slice_iter(CERT_PEM.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_slice(KEY_PEM.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server config"),
        )
    }

    fn client() -> rustls::ClientConnection {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(CERT_PEM.as_bytes()) {
            roots.add(cert.expect("cert")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").expect("name");
        rustls::ClientConnection::new(Arc::new(config), name).expect("client")
    }

    /// Moves the client's records to the server and the server's to the
    /// client; returns the plaintext the client received.
    fn pump(client: &mut rustls::ClientConnection, to_server: &Pipe, to_client: &Pipe) -> Vec<u8> {
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).expect("client write_tls");
        }
        if !out.is_empty() {
            to_server.bytes.borrow_mut().extend(out);
            to_server.arrived.notify_one();
        }
        let incoming: Vec<u8> = to_client.bytes.borrow_mut().drain(..).collect();
        let mut slice = &incoming[..];
        let mut plain = Vec::new();
        while !slice.is_empty() {
            client.read_tls(&mut slice).expect("client read_tls");
            client
                .process_new_packets()
                .expect("the server's records are valid");
            let mut chunk = [0u8; 4096];
            while let Ok(n) = client.reader().read(&mut chunk) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&chunk[..n]);
            }
        }
        plain
    }

    /// Runs a test on a LocalSet, failing it after 10 s (a broken write
    /// order shows as a client that never gets its records, i.e. a hang).
    fn run_local<F: std::future::Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let bounded =
            async { tokio::time::timeout(std::time::Duration::from_secs(10), future).await };
        tokio::task::LocalSet::new()
            .block_on(&runtime, bounded)
            .expect("test timed out")
    }

    /// The writer's messages: large, so each of its writes is in flight far
    /// longer than the reader's small key-update answers.
    fn message(i: u32) -> Vec<u8> {
        format!("m{i:04} {}\n", "x".repeat(1000)).into_bytes()
    }

    /// The writer sends large writes while the reader takes the client's
    /// data and key updates: every record the client gets is valid and the
    /// plaintext arrives whole and in order, in both directions. (rustls
    /// answers a key update with the next application write, so the write
    /// lock is not what this exercises: that guards handshake bytes and
    /// alerts, which the writer never sends concurrently here.)
    #[test]
    fn concurrent_reads_writes_and_key_updates_keep_both_streams_whole() {
        run_local(async {
            let to_server = Rc::new(Pipe::default());
            let to_client = Rc::new(Pipe::default());
            let socket = Rc::new(TlsSocket::new(
                MemSocket {
                    inbound: Rc::clone(&to_server),
                    outbound: Rc::clone(&to_client),
                },
                server_connection(&server_config()).expect("server connection"),
            ));
            let mut client = client();
            let handshake = {
                let socket = Rc::clone(&socket);
                tokio::task::spawn_local(async move { socket.handshake().await })
            };
            let mut rounds = 0;
            while !handshake.is_finished() {
                pump(&mut client, &to_server, &to_client);
                tokio::task::yield_now().await;
                rounds += 1;
                assert!(rounds < 100_000, "the handshake does not progress");
            }
            handshake.await.expect("join").expect("handshake");
            assert!(!client.is_handshaking());

            let writer = {
                let socket = Rc::clone(&socket);
                tokio::task::spawn_local(async move {
                    for i in 0..200u32 {
                        let (result, _) = socket.write_all(message(i)).await;
                        result.expect("write");
                    }
                })
            };
            let reader = {
                let socket = Rc::clone(&socket);
                tokio::task::spawn_local(async move {
                    let mut got = Vec::new();
                    while got.len() < 60 {
                        let (result, buf) = socket.read(Vec::with_capacity(128)).await;
                        match result.expect("read") {
                            0 => break,
                            _ => got.extend_from_slice(&buf),
                        }
                    }
                    got
                })
            };
            let expected: Vec<u8> = (0..200u32).flat_map(message).collect();
            let mut plain = Vec::new();
            let mut hellos = 0;
            let mut rounds = 0u32;
            while plain.len() < expected.len() || hellos < 10 || !writer.is_finished() {
                if rounds.is_multiple_of(20) && hellos < 10 {
                    // A key update alone: the server's reader has no
                    // plaintext to return, so it sends the answer itself,
                    // while its writer is sending.
                    client.refresh_traffic_keys().expect("key update");
                } else if rounds % 20 == 10 && hellos < 10 {
                    use std::io::Write as _;
                    client.writer().write_all(b"hello\n").expect("client write");
                    hellos += 1;
                }
                plain.extend(pump(&mut client, &to_server, &to_client));
                tokio::task::yield_now().await;
                rounds += 1;
                assert!(
                    rounds < 1_000_000,
                    "got {} of {} bytes",
                    plain.len(),
                    expected.len()
                );
            }
            writer.await.expect("writer");
            plain.extend(pump(&mut client, &to_server, &to_client));
            assert_eq!(
                String::from_utf8_lossy(&plain),
                String::from_utf8_lossy(&expected)
            );
            to_server.closed.set(true);
            to_server.arrived.notify_one();
            let got = reader.await.expect("reader");
            assert_eq!(got, b"hello\n".repeat(10));
        });
    }

    /// Garbage instead of a ClientHello: an error, no panic.
    #[test]
    fn garbage_handshake_is_an_error() {
        run_local(async {
            for garbage in [
                &b"CONNECT {}\r\n"[..],
                &[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff],
                &[0x16; 64],
            ] {
                let to_server = Rc::new(Pipe::default());
                let to_client = Rc::new(Pipe::default());
                to_server.bytes.borrow_mut().extend(garbage.iter());
                to_server.closed.set(true);
                let socket = TlsSocket::new(
                    MemSocket {
                        inbound: to_server,
                        outbound: Rc::clone(&to_client),
                    },
                    server_connection(&server_config()).expect("server connection"),
                );
                assert!(socket.handshake().await.is_err(), "{garbage:?}");
                // Not TLS at all: closed without an alert (as Go's TLS does).
                if garbage[0] != 0x16 {
                    assert!(to_client.bytes.borrow().is_empty());
                }
            }
        });
    }
}
