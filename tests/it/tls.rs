//! TLS on the NATS listener, against real TLS clients (rustls' own client
//! for byte-level checks, async-nats) and compared with Debian's nats-server
//! where the bytes are comparable (INFO fields, error texts, closes).
//!
//! Certificates are made per test run with the `openssl` command (tests/run.sh
//! installs it): the same files serve perch and nats-server, and no key
//! material is checked in.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::support::{Raw, Server, TempDir};

/// A throwaway PKI: two CAs, a server certificate from each, and client
/// certificates for the `map` tests.
struct Pki {
    dir: TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is not installed: run `bash tests/run.sh`, which installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: TempDir::new("pki"),
        };
        pki.ca("ca1", "/CN=perch test CA 1");
        pki.ca("ca2", "/CN=perch test CA 2");
        let server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
        pki.leaf("server1", "ca1", "/CN=localhost", server_ext);
        pki.leaf("server2", "ca2", "/CN=localhost", server_ext);
        let client = "extendedKeyUsage=clientAuth\n";
        pki.leaf(
            "alice",
            "ca1",
            "/O=Acme/CN=alice",
            &format!("subjectAltName=email:alice@example.com\n{client}"),
        );
        pki.leaf("bob", "ca1", "/C=US/O=Acme/CN=bob", client);
        pki.leaf("mallory", "ca1", "/CN=mallory", client);
        // Claims alice's identity, from a CA perch does not trust for clients.
        pki.leaf(
            "stranger",
            "ca2",
            "/O=Acme/CN=alice",
            &format!("subjectAltName=email:alice@example.com\n{client}"),
        );
        pki
    }

    fn ca(&self, name: &str, subject: &str) {
        openssl(
            &self.dir.path,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                subject,
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    fn leaf(&self, name: &str, ca: &str, subject: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(self.dir.path.join(&ext), extensions).expect("write ext");
        openssl(
            &self.dir.path,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir.path,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-set_serial",
                &format!("{}", rand_serial()),
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path.join(file)
    }

    fn p(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

fn rand_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    u64::from(std::process::id()) * 1000 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A rustls client config trusting `ca`, presenting `identity` (cert, key) if given.
fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read ca") {
        roots.add(cert.expect("ca pem")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .expect("read cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(key).expect("key pem");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    })
}

/// A NATS connection over rustls' client, for byte-level checks.
struct TlsClient {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    /// The reference's order: reads the plain-text INFO, then upgrades.
    /// Returns the INFO line and the client once its handshake completed.
    fn connect(
        server: &Server,
        config: &Arc<rustls::ClientConfig>,
    ) -> (String, std::io::Result<TlsClient>) {
        let raw = Raw::connect_keeping_info(server);
        let info = raw.1;
        let sock = raw.0.stream;
        (info, TlsClient::handshake(sock, config))
    }

    /// `handshake_first`: TLS at once, INFO comes encrypted.
    fn connect_first(
        server: &Server,
        config: &Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TlsClient> {
        let sock = TcpStream::connect(server.addr())?;
        TlsClient::handshake(sock, config)
    }

    fn handshake(
        mut sock: TcpStream,
        config: &Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TlsClient> {
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        sock.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("server name");
        let mut conn = rustls::ClientConnection::new(Arc::clone(config), name)
            .map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(TlsClient {
            stream: rustls::StreamOwned::new(conn, sock),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// One CRLF line (without it); Err on close, timeout or a TLS alert.
    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            match self.stream.read(&mut byte)? {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("closed after {:?}", String::from_utf8_lossy(&line)),
                    ))
                }
                _ => line.push(byte[0]),
            }
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Everything up to the close (or `timeout`); true when it was closed.
    fn read_until_closed(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        self.stream
            .sock
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return (all, true),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return (all, false)
                }
                Err(_) => return (all, true),
            }
        }
    }

    /// CONNECT + PING; Ok(the first line back).
    fn hello(&mut self) -> std::io::Result<String> {
        self.send(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")?;
        self.read_line()
    }
}

impl Raw {
    /// Connects and returns the raw connection with its INFO line.
    fn connect_keeping_info(server: &Server) -> (Raw, String) {
        let stream = TcpStream::connect(server.addr()).expect("connect");
        stream.set_nodelay(true).ok();
        let mut raw = Raw { stream };
        let info = raw.read_line_exact();
        assert!(info.starts_with("INFO {"), "expected INFO, got {info:?}");
        (raw, info)
    }
}

/// INFO's fields minus those that name the server, the port or the client.
fn info_fields(line: &str) -> serde_json::Value {
    let json = line
        .strip_prefix("INFO ")
        .unwrap_or_else(|| panic!("not INFO: {line:?}"));
    let mut value: serde_json::Value = serde_json::from_str(json.trim()).expect("INFO json");
    let map = value.as_object_mut().expect("INFO object");
    for key in [
        "server_id",
        "server_name",
        "version",
        "go",
        "host",
        "port",
        "client_id",
        "client_ip",
        "git_commit",
    ] {
        map.remove(key);
    }
    value
}

fn perch_tls(pki: &Pki, extra: &str) -> Server {
    Server::perch_with_config(
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n{extra}",
            pki.p("server1.pem"),
            pki.p("server1.key")
        ),
        &[],
    )
}

fn reference_tls(pki: &Pki, extra: &str) -> Server {
    Server::nats_server(&format!(
        "tls {{\n cert_file: {:?}\n key_file: {:?}\n {extra}\n}}\n",
        pki.p("server1.pem"),
        pki.p("server1.key")
    ))
}

#[test]
fn info_in_plain_text_then_the_handshake_like_nats_server() {
    let pki = Pki::new();
    let config = client_config(&pki.path("ca1.pem"), None);
    let perch = perch_tls(&pki, "");
    let reference = reference_tls(&pki, "");
    let mut seen = Vec::new();
    for server in [&perch, &reference] {
        let (info, client) = TlsClient::connect(server, &config);
        let fields = info_fields(&info);
        assert_eq!(fields["tls_required"], true, "{}: {info}", server.name);
        assert!(
            fields.get("tls_verify").is_none(),
            "{}: {info}",
            server.name
        );
        assert!(
            fields.get("tls_available").is_none(),
            "{}: {info}",
            server.name
        );
        let mut client = client.unwrap_or_else(|e| panic!("{}: handshake: {e}", server.name));
        assert_eq!(client.hello().expect("PONG"), "PONG", "{}", server.name);
        // TLS 1.2 or newer only (rustls offers 1.2 and 1.3; 1.3 is chosen).
        assert_eq!(
            client.stream.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        seen.push(fields);
    }
    assert_eq!(seen[0], seen[1], "INFO differs from nats-server's");
}

#[test]
fn tls_1_2_client_is_served() {
    let pki = Pki::new();
    let server = perch_tls(&pki, "");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca1.pem")).expect("ca") {
        roots.add(cert.expect("pem")).expect("add");
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("tls12")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let (_, client) = TlsClient::connect(&server, &config);
    let mut client = client.expect("TLS 1.2 handshake");
    assert_eq!(client.hello().expect("PONG"), "PONG");
    assert_eq!(
        client.stream.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[test]
fn plain_client_on_a_tls_server_is_closed_like_nats_server() {
    let pki = Pki::new();
    let perch = perch_tls(&pki, "");
    let reference = reference_tls(&pki, "");
    let mut seen = Vec::new();
    for server in [&perch, &reference] {
        let mut raw = Raw::connect(server);
        raw.send(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
        let started = Instant::now();
        let (bytes, closed) = raw.read_until_closed(Duration::from_secs(3));
        assert!(closed, "{}: not closed", server.name);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{}: closed only at the timeout",
            server.name
        );
        seen.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    assert_eq!(seen[0], seen[1], "perch vs nats-server");
    assert_eq!(seen[0], "", "nothing is sent, not even an alert");
}

#[test]
fn garbage_client_hellos_close_the_connection_and_nothing_else() {
    let pki = Pki::new();
    let server = perch_tls(&pki, "");
    let mut noise = Vec::new();
    let mut x: u32 = 0x1234_5678;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    let mut huge_record = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    huge_record.extend_from_slice(&noise);
    let mut huge_message = vec![0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0xff, 0xff, 0xff];
    huge_message.extend_from_slice(&[0; 4]);
    let mut tls_noise = vec![0x16, 0x03, 0x03, 0x01, 0x00];
    tls_noise.extend_from_slice(&noise[..256]);
    let cases: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x00\x05hello".to_vec(),
        vec![0x16, 0x03, 0x01, 0x00, 0x00],
        huge_record,
        huge_message,
        tls_noise,
        noise.clone(),
        vec![0x80, 0x2e, 0x01, 0x03, 0x01], // an SSLv2-style hello
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut raw = Raw::connect(&server);
        // The peer may close while we still write: that is fine.
        let _ = raw.stream.write_all(case);
        let (_, closed) = raw.read_until_closed(Duration::from_secs(4));
        assert!(closed, "case {i}: connection not closed");
    }
    // Still serving.
    let config = client_config(&pki.path("ca1.pem"), None);
    let (_, client) = TlsClient::connect(&server, &config);
    assert_eq!(client.expect("handshake").hello().expect("PONG"), "PONG");
}

#[test]
fn handshake_first_sends_info_encrypted() {
    let pki = Pki::new();
    let server = Server::perch_with_config_silent(
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nhandshake_first = true\ntimeout_ms = 500\n",
            pki.p("server1.pem"),
            pki.p("server1.key")
        ),
        &[],
    );
    let config = client_config(&pki.path("ca1.pem"), None);
    let mut client = TlsClient::connect_first(&server, &config).expect("handshake first");
    let info = client.read_line().expect("INFO");
    assert_eq!(info_fields(&info)["tls_required"], true, "{info}");
    assert_eq!(client.hello().expect("PONG"), "PONG");
    // A client waiting for a plain INFO gets nothing, then the timeout's close.
    let mut stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let n = stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "sent {:?}", &buf[..n]);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_millis(2500),
        "closed after {waited:?}, timeout_ms = 500"
    );
}

#[test]
fn handshake_timeout_closes_like_nats_server() {
    let pki = Pki::new();
    let perch = perch_tls(&pki, "timeout_ms = 1000\n");
    let reference = reference_tls(&pki, "timeout: 1");
    for server in [&perch, &reference] {
        let mut raw = Raw::connect(server);
        // Half a ClientHello record, then silence.
        raw.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]);
        let started = Instant::now();
        let (bytes, closed) = raw.read_until_closed(Duration::from_secs(4));
        let waited = started.elapsed();
        assert!(closed, "{}: not closed", server.name);
        assert_eq!(bytes, b"", "{}: sent something", server.name);
        assert!(
            waited >= Duration::from_millis(800) && waited < Duration::from_millis(1800),
            "{}: closed after {waited:?}",
            server.name
        );
    }
}

/// Slowloris: hundreds of handshakes that stall do not delay an established
/// client, cost little memory each, and are all closed at the timeout.
#[test]
fn stalled_handshakes_do_not_delay_established_clients() {
    const STALLED: usize = 300;
    let pki = Pki::new();
    let server = perch_tls(&pki, "timeout_ms = 1500\n");
    let config = client_config(&pki.path("ca1.pem"), None);
    let (_, client) = TlsClient::connect(&server, &config);
    let mut client = client.expect("handshake");
    assert_eq!(client.hello().expect("PONG"), "PONG");
    client.send(b"SUB echo 1\r\nPING\r\n").expect("sub");
    assert_eq!(client.read_line().expect("PONG"), "PONG");
    let before_kib = server.rss_kib();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let (mut raw, _) = Raw::connect_keeping_info(&server);
        raw.send(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ]);
        stalled.push(raw);
    }
    std::thread::sleep(Duration::from_millis(200));
    let during_kib = server.rss_kib();
    let mut worst = Duration::ZERO;
    for i in 0..50 {
        let started = Instant::now();
        client
            .send(format!("PUB echo 2\r\nm{}\r\n", i % 10).as_bytes())
            .expect("pub");
        let line = client.read_line().expect("MSG");
        assert!(line.starts_with("MSG echo 1 2"), "{line}");
        client.read_line().expect("payload");
        worst = worst.max(started.elapsed());
    }
    assert!(
        worst < Duration::from_millis(250),
        "a message took {worst:?}"
    );
    let per_connection_kib = during_kib.saturating_sub(before_kib) as f64 / STALLED as f64;
    eprintln!("stalled handshakes: {per_connection_kib:.1} KiB RSS each, worst message {worst:?}");
    assert!(
        per_connection_kib < 24.0,
        "{per_connection_kib:.1} KiB per stalled handshake"
    );
    // All closed by the timeout, with nothing sent.
    std::thread::sleep(Duration::from_millis(1500));
    for (i, raw) in stalled.iter_mut().enumerate() {
        let (bytes, closed) = raw.read_until_closed(Duration::from_secs(2));
        assert!(
            closed && bytes.is_empty(),
            "stalled {i}: {closed} {bytes:?}"
        );
    }
    // The established client is untouched.
    client.send(b"PING\r\n").expect("ping");
    assert_eq!(client.read_line().expect("PONG"), "PONG");
}

#[test]
fn verify_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let extra = format!("ca = {:?}\nverify = true\n", pki.p("ca1.pem"));
    let perch = perch_tls(&pki, &extra);
    let reference = reference_tls(
        &pki,
        &format!("ca_file: {:?}\n verify: true", pki.p("ca1.pem")),
    );
    let anonymous = client_config(&pki.path("ca1.pem"), None);
    let alice = client_config(
        &pki.path("ca1.pem"),
        Some((&pki.path("alice.pem"), &pki.path("alice.key"))),
    );
    let stranger = client_config(
        &pki.path("ca1.pem"),
        Some((&pki.path("stranger.pem"), &pki.path("stranger.key"))),
    );
    let mut infos = Vec::new();
    for server in [&perch, &reference] {
        let (info, client) = TlsClient::connect(server, &alice);
        assert_eq!(
            client.expect("alice's handshake").hello().expect("PONG"),
            "PONG",
            "{}",
            server.name
        );
        let fields = info_fields(&info);
        assert_eq!(fields["tls_verify"], true, "{}: {info}", server.name);
        infos.push(fields);
        for (who, config) in [("no certificate", &anonymous), ("untrusted CA", &stranger)] {
            let (_, client) = TlsClient::connect(server, config);
            // TLS 1.3: the client's handshake may end before the server
            // judged its certificate; the refusal then comes as an alert.
            let refused = client.and_then(|mut c| c.hello()).is_err();
            assert!(refused, "{}: {who} was let in", server.name);
        }
    }
    assert_eq!(infos[0], infos[1], "INFO differs from nats-server's");
}

/// `map` (nats-server's verify_and_map): the email SAN selects alice and her
/// permissions, bob is found by his subject DN as Go writes it, a certificate
/// naming no user is refused. The same transcripts as nats-server's.
#[test]
fn verify_and_map_selects_the_user_and_permissions_like_nats_server() {
    let pki = Pki::new();
    let perch = perch_tls(
        &pki,
        &format!(
            "ca = {:?}\nverify = true\nmap = true\n\
             [[authorization.users]]\nuser = \"alice@example.com\"\n\
             permissions = {{ publish = [\"alice.>\"] }}\n\
             [[authorization.users]]\nuser = \"CN=bob,O=Acme,C=US\"\n",
            pki.p("ca1.pem")
        ),
    );
    let reference = Server::nats_server(&format!(
        "tls {{\n cert_file: {:?}\n key_file: {:?}\n ca_file: {:?}\n verify_and_map: true\n}}\n\
         authorization {{\n users = [\n  {{user: \"alice@example.com\", permissions: {{publish: [\"alice.>\"]}}}}\n  \
         {{user: \"CN=bob,O=Acme,C=US\"}}\n ]\n}}\n",
        pki.p("server1.pem"),
        pki.p("server1.key"),
        pki.p("ca1.pem")
    ));
    let client = |name: &str| {
        client_config(
            &pki.path("ca1.pem"),
            Some((
                &pki.path(&format!("{name}.pem")),
                &pki.path(&format!("{name}.key")),
            )),
        )
    };
    let mut transcripts = Vec::new();
    for server in [&perch, &reference] {
        let mut transcript = String::new();
        let (info, alice) = TlsClient::connect(server, &client("alice"));
        assert_eq!(info_fields(&info)["auth_required"], true, "{info}");
        let mut alice = alice.expect("alice's handshake");
        // CONNECT's user is not what counts (nats-server only warns of it).
        alice
            .send(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"user\":\"x\"}\r\nPUB bob.x 0\r\n\r\nPUB alice.x 0\r\n\r\nPING\r\n")
            .expect("send");
        for _ in 0..2 {
            transcript += &alice.read_line().expect("alice reply");
            transcript += "\n";
        }
        let (_, bob) = TlsClient::connect(server, &client("bob"));
        transcript += &bob.expect("bob's handshake").hello().expect("bob");
        transcript += "\n";
        let (_, mallory) = TlsClient::connect(server, &client("mallory"));
        let mut mallory = mallory.expect("mallory's handshake");
        mallory
            .send(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
            .expect("send");
        let (bytes, closed) = mallory.read_until_closed(Duration::from_secs(3));
        transcript += &String::from_utf8_lossy(&bytes);
        transcript += if closed { "<closed>" } else { "<open>" };
        transcripts.push(transcript);
    }
    assert_eq!(
        transcripts[0],
        "-ERR 'Permissions Violation for Publish to \"bob.x\"'\nPONG\nPONG\n\
         -ERR 'Authorization Violation'\r\n<closed>"
    );
    assert_eq!(transcripts[0], transcripts[1], "perch vs nats-server");
}

fn sighup(server: &Server) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
}

/// Rotation without a restart: new handshakes use the new files after
/// SIGHUP, connections already open keep working, and a bad file refuses
/// the reload whole.
#[test]
fn certificates_rotate_on_sighup() {
    let pki = Pki::new();
    let live = TempDir::new("tls-live");
    let cert = live.path.join("server.pem");
    let key = live.path.join("server.key");
    std::fs::copy(pki.path("server1.pem"), &cert).expect("copy");
    std::fs::copy(pki.path("server1.key"), &key).expect("copy");
    let server = Server::perch_with_config(
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        &[],
    );
    let old_ca = client_config(&pki.path("ca1.pem"), None);
    let new_ca = client_config(&pki.path("ca2.pem"), None);
    let (_, existing) = TlsClient::connect(&server, &old_ca);
    let mut existing = existing.expect("handshake before rotation");
    assert_eq!(existing.hello().expect("PONG"), "PONG");
    existing.send(b"SUB rotated 1\r\nPING\r\n").expect("sub");
    assert_eq!(existing.read_line().expect("PONG"), "PONG");
    assert!(
        TlsClient::connect(&server, &new_ca).1.is_err(),
        "new CA before rotation"
    );

    std::fs::copy(pki.path("server2.pem"), &cert).expect("rotate");
    std::fs::copy(pki.path("server2.key"), &key).expect("rotate");
    sighup(&server);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fresh = loop {
        if let (_, Ok(mut client)) = TlsClient::connect(&server, &new_ca) {
            if client.hello().is_ok_and(|l| l == "PONG") {
                break client;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        TlsClient::connect(&server, &old_ca).1.is_err(),
        "old certificate still served"
    );
    fresh.send(b"PUB rotated 2\r\nhi\r\n").expect("pub");
    assert_eq!(existing.read_line().expect("MSG"), "MSG rotated 1 2");
    assert_eq!(existing.read_line().expect("payload"), "hi");

    // A key that does not match the certificate: the reload is refused.
    std::fs::copy(pki.path("server1.key"), &key).expect("bad key");
    sighup(&server);
    std::thread::sleep(Duration::from_millis(500));
    let (_, client) = TlsClient::connect(&server, &new_ca);
    assert_eq!(
        client
            .expect("still the rotated certificate")
            .hello()
            .expect("PONG"),
        "PONG"
    );
    std::fs::write(&cert, "not a certificate").expect("garbage");
    sighup(&server);
    std::thread::sleep(Duration::from_millis(500));
    let (_, client) = TlsClient::connect(&server, &new_ca);
    assert_eq!(
        client
            .expect("still the rotated certificate")
            .hello()
            .expect("PONG"),
        "PONG"
    );
}

#[test]
fn bad_tls_config_is_refused_at_start_with_a_clear_error() {
    let pki = Pki::new();
    let dir = TempDir::new("tls-bad");
    let cases = [
        (
            format!("[tls]\ncert = {:?}\n", pki.p("server1.pem")),
            "key is required",
        ),
        (
            format!(
                "[tls]\ncert = \"/nonexistent/server.pem\"\nkey = {:?}\n",
                pki.p("server1.key")
            ),
            "/nonexistent/server.pem",
        ),
        (
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\n",
                pki.p("server1.pem"),
                pki.p("server2.key")
            ),
            "server1.pem with",
        ),
        (
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nmap = true\n",
                pki.p("server1.pem"),
                pki.p("server1.key"),
                pki.p("ca1.pem")
            ),
            "map needs verify",
        ),
        (
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\nverify = true\n",
                pki.p("server1.pem"),
                pki.p("server1.key")
            ),
            "verify needs ca",
        ),
    ];
    for (i, (toml, expected)) in cases.iter().enumerate() {
        let path = dir.path.join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).expect("write");
        let out = crate::support::perch_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .output()
            .expect("run perch");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(stderr.contains(expected), "case {i}: {stderr}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The official Rust client: TLS with a client certificate (verify on), and
/// its tls_first option against handshake_first.
#[test]
fn async_nats_over_tls_mtls_and_handshake_first() {
    use futures::StreamExt;
    let pki = Pki::new();
    let verify = perch_tls(
        &pki,
        &format!("ca = {:?}\nverify = true\n", pki.p("ca1.pem")),
    );
    let first = Server::perch_with_config_silent(
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nhandshake_first = true\n",
            pki.p("server1.pem"),
            pki.p("server1.key")
        ),
        &[],
    );
    runtime().block_on(async {
        let wait = Duration::from_secs(10);
        let options = || {
            async_nats::ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(pki.path("ca1.pem"))
                .add_client_certificate(pki.path("alice.pem"), pki.path("alice.key"))
        };
        let url = format!("tls://127.0.0.1:{}", verify.port);
        let subscriber = tokio::time::timeout(wait, options().connect(&url))
            .await
            .expect("connect timed out")
            .expect("connect");
        let publisher = tokio::time::timeout(wait, options().connect(&url))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut sub = subscriber.subscribe("tls.>").await.expect("sub");
        subscriber.flush().await.expect("flush");
        // A round trip on the subscriber's connection: its SUB is in force.
        let probe = subscriber.new_inbox();
        let mut probe_sub = subscriber.subscribe(probe.clone()).await.expect("sub");
        subscriber.publish(probe, "".into()).await.expect("pub");
        tokio::time::timeout(wait, probe_sub.next())
            .await
            .expect("probe");
        let payload = vec![7u8; 100_000];
        for _ in 0..20 {
            publisher
                .publish("tls.big", payload.clone().into())
                .await
                .expect("pub");
        }
        publisher.flush().await.expect("flush");
        for _ in 0..20 {
            let msg = tokio::time::timeout(wait, sub.next())
                .await
                .expect("message timed out")
                .expect("sub ended");
            assert_eq!(msg.payload.len(), 100_000);
            assert!(msg.payload.iter().all(|&b| b == 7));
        }
        // Without a certificate: refused.
        let anonymous = async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(pki.path("ca1.pem"))
            .connect(&url);
        let refused = tokio::time::timeout(Duration::from_secs(5), anonymous).await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "a client without a certificate got in"
        );

        let first_url = format!("tls://127.0.0.1:{}", first.port);
        let client = tokio::time::timeout(
            wait,
            async_nats::ConnectOptions::new()
                .tls_first()
                .add_root_certificates(pki.path("ca1.pem"))
                .connect(&first_url),
        )
        .await
        .expect("tls_first connect timed out")
        .expect("tls_first connect");
        let reply = client.new_inbox();
        let mut sub = client.subscribe(reply.clone()).await.expect("sub");
        client.publish(reply, "x".into()).await.expect("pub");
        let msg = tokio::time::timeout(wait, sub.next())
            .await
            .expect("timed out")
            .expect("ended");
        assert_eq!(&msg.payload[..], b"x");
    });
}

/// Runs a client program; Ok(stdout) if it exited 0.
fn run_client(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e} (tests/run.sh installs it)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Servers for the real-client tests: TLS only, and mTLS (verify).
fn tls_and_mtls(pki: &Pki) -> (Server, Server) {
    (
        perch_tls(pki, ""),
        perch_tls(
            pki,
            &format!("ca = {:?}\nverify = true\n", pki.p("ca1.pem")),
        ),
    )
}

#[test]
fn nats_py_over_tls_handshake_first_and_mtls() {
    let pki = Pki::new();
    let (plain_tls, mtls) = tls_and_mtls(&pki);
    let first = Server::perch_with_config_silent(
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nhandshake_first = true\n",
            pki.p("server1.pem"),
            pki.p("server1.key")
        ),
        &[],
    );
    let script = repo().join("tests/py/tls_client.py");
    let py = |server: &Server, extra: &[String]| {
        run_client(
            Command::new("python3")
                .arg(&script)
                .arg(format!("tls://127.0.0.1:{}", server.port))
                .arg(pki.path("ca1.pem"))
                .args(extra),
        )
    };
    let alice = [
        "--cert".to_string(),
        pki.p("alice.pem"),
        "--key".into(),
        pki.p("alice.key"),
    ];
    assert_eq!(py(&plain_tls, &[]).as_deref().map(str::trim), Ok("ok"));
    assert_eq!(
        py(&first, &["--first".into()]).as_deref().map(str::trim),
        Ok("ok")
    );
    assert_eq!(py(&mtls, &alice).as_deref().map(str::trim), Ok("ok"));
    let refused = py(&mtls, &["--expect-refused".into()]);
    assert!(
        refused.as_deref().is_ok_and(|o| o.starts_with("refused")),
        "{refused:?}"
    );
}

#[test]
fn nats_go_over_tls_and_mtls() {
    let pki = Pki::new();
    let (plain_tls, mtls) = tls_and_mtls(&pki);
    let binary = pki.path("tlsclient-go");
    // Debian's nats.go as GOPATH source, offline (as tests/run.sh builds tests/go).
    let built = run_client(
        Command::new("go")
            .current_dir(repo())
            .args(["build", "-o"])
            .arg(&binary)
            .arg("./tests/go/tlsclient")
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOTOOLCHAIN", "local")
            .env("GOCACHE", pki.path("gocache")),
    );
    assert!(built.is_ok(), "go build: {built:?}");
    let go = |server: &Server, extra: &[String]| {
        run_client(
            Command::new(&binary)
                .arg("-url")
                .arg(format!("tls://127.0.0.1:{}", server.port))
                .arg("-ca")
                .arg(pki.path("ca1.pem"))
                .args(extra),
        )
    };
    let alice = [
        "-cert".to_string(),
        pki.p("alice.pem"),
        "-key".into(),
        pki.p("alice.key"),
    ];
    assert_eq!(go(&plain_tls, &[]).as_deref().map(str::trim), Ok("ok"));
    assert_eq!(go(&mtls, &alice).as_deref().map(str::trim), Ok("ok"));
    let refused = go(&mtls, &["-expect-refused".into()]);
    assert!(
        refused.as_deref().is_ok_and(|o| o.starts_with("refused")),
        "{refused:?}"
    );
}

#[test]
fn libnats_over_tls_and_mtls() {
    let pki = Pki::new();
    let (plain_tls, mtls) = tls_and_mtls(&pki);
    let binary = pki.path("tlsclient-c");
    let built = run_client(
        Command::new("cc")
            .arg(repo().join("tests/c/tls_client.c"))
            .arg("-o")
            .arg(&binary)
            .arg("-lnats"),
    );
    assert!(built.is_ok(), "cc (Debian's libnats-dev): {built:?}");
    let c = |server: &Server, extra: &[String]| {
        run_client(
            Command::new(&binary)
                .arg(format!("tls://127.0.0.1:{}", server.port))
                .arg(pki.path("ca1.pem"))
                .args(extra),
        )
    };
    assert_eq!(c(&plain_tls, &[]).as_deref().map(str::trim), Ok("ok"));
    let alice = [pki.p("alice.pem"), pki.p("alice.key")];
    assert_eq!(c(&mtls, &alice).as_deref().map(str::trim), Ok("ok"));
    assert!(
        c(&mtls, &[]).is_err(),
        "libnats without a certificate was let in"
    );
}
