//! The TLS scenarios: full handshakes per second, 1 → 1 throughput over TLS
//! with the server's CPU per message, and RSS per idle TLS connection. Both
//! servers get the same certificate (an ECDSA P-256 chain made with the
//! `openssl` command for the run) and the same client: rustls with ring,
//! TLS 1.3, session resumption off (every handshake is a full one).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::scenarios::{CpuWindow, Measurement, Params};
use crate::server::RunningServer;

type Stream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// The run's certificate and the two servers' configs that use it.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    /// `perch serve --config` file with its `[tls]` table.
    pub perch_config: PathBuf,
    /// `nats-server -c` file with its `tls {}` block.
    pub nats_config: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl (the TLS scenarios make their certificate with it)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Makes a CA and a server certificate for 127.0.0.1 in `dir`.
pub fn prepare(dir: &Path) -> Result<TlsFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-days",
        "2",
        "-subj",
        "/CN=loadgen CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(dir, &ca)?;
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(dir, &csr)?;
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n")
        .context("writing server.ext")?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    )?;
    let cert = dir.join("server.pem").display().to_string();
    let key = dir.join("server.key").display().to_string();
    let perch_config = dir.join("perch-tls.toml");
    std::fs::write(
        &perch_config,
        format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n"),
    )
    .context("writing perch-tls.toml")?;
    let nats_config = dir.join("nats-tls.conf");
    std::fs::write(
        &nats_config,
        format!("tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n}}\n"),
    )
    .context("writing nats-tls.conf")?;
    Ok(TlsFiles {
        ca: dir.join("ca.pem"),
        perch_config,
        nats_config,
    })
}

fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.ca).context("reading the CA")? {
        roots
            .add(cert.context("CA PEM")?)
            .context("adding the CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Reads the plain INFO line, upgrades, sends `CONNECT` + `setup` + PING and
/// waits for the PONG.
fn open(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    setup: &[u8],
    deadline: Instant,
) -> Result<Stream> {
    let mut sock = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10)),
    ))?;
    let mut byte = [0u8; 1];
    let mut info = Vec::new();
    while !info.ends_with(b"\r\n") {
        if sock.read(&mut byte).context("reading INFO")? == 0 {
            bail!("closed before INFO");
        }
        info.push(byte[0]);
    }
    let name = ServerName::try_from("127.0.0.1").context("server name")?;
    let mut conn = rustls::ClientConnection::new(Arc::clone(config), name)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).context("TLS handshake")?;
    }
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let mut hello = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n".to_vec();
    hello.extend_from_slice(setup);
    hello.extend_from_slice(b"PING\r\n");
    stream.write_all(&hello)?;
    stream.flush()?;
    wait_for_pong(&mut stream)?;
    Ok(stream)
}

fn wait_for_pong(stream: &mut Stream) -> Result<()> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.windows(6).any(|w| w == b"PONG\r\n") {
        let n = stream.read(&mut buf).context("waiting for PONG")?;
        if n == 0 {
            bail!("closed before PONG: {:?}", String::from_utf8_lossy(&seen));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// tls-handshake: `connect_threads` clients in a loop of connect, full
/// handshake, CONNECT + PING/PONG, close, for `duration`.
pub fn handshake_rate(
    server: &RunningServer,
    params: &Params,
    files: &TlsFiles,
) -> Result<Measurement> {
    let config = client_config(files)?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..params.connect_threads.max(1) {
        let (config, stop, done, counting) = (
            Arc::clone(&config),
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&counting),
        );
        let addr = server.addr;
        let timeout = params.timeout;
        threads.push(thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let stream = open(addr, &config, b"", Instant::now() + timeout)?;
                drop(stream);
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    thread::sleep(params.warmup);
    let cpu = CpuWindow::start(server)?;
    counting.store(true, Ordering::Relaxed);
    thread::sleep(params.duration);
    counting.store(false, Ordering::Relaxed);
    let handshakes = done.load(Ordering::Relaxed);
    let cpu = cpu.finish(server)?;
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a handshake thread panicked"))??;
    }
    if handshakes == 0 {
        bail!("no handshake completed in the measured window");
    }
    Ok(vec![
        (
            "handshakes_per_s",
            handshakes as f64 / cpu.wall.as_secs_f64(),
        ),
        (
            "server_cpu_us_per_handshake",
            cpu.server.as_secs_f64() * 1e6 / handshakes as f64,
        ),
        ("server_cpu_cores", cpu.server_cores()),
        ("loadgen_cpu_cores", cpu.loadgen_cores()),
    ])
}

/// tls-pub-sub: one publisher → one subscriber over TLS, `payload_bytes`
/// each, the publisher at most `window_msgs` ahead.
pub fn pub_sub(server: &RunningServer, params: &Params, files: &TlsFiles) -> Result<Measurement> {
    let config = client_config(files)?;
    let deadline = Instant::now() + params.timeout;
    let mut subscriber = open(server.addr, &config, b"SUB bench.t 1\r\n", deadline)?;
    let mut publisher = open(server.addr, &config, b"", deadline)?;
    let payload = vec![b'x'; params.payload_bytes];
    let frame_bytes = format!("MSG bench.t 1 {}\r\n", payload.len()).len() + payload.len() + 2;
    let received_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received_bytes, stop) = (Arc::clone(&received_bytes), Arc::clone(&stop));
        subscriber
            .sock
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        thread::spawn(move || -> Result<()> {
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match subscriber.read(&mut buf) {
                    Ok(0) => bail!("subscriber closed"),
                    Ok(n) => {
                        received_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => return Err(e).context("subscriber read"),
                }
            }
            Ok(())
        })
    };
    let mut batch = Vec::new();
    let batch_msgs = (64 * 1024 / frame_bytes).max(1) as u64;
    for _ in 0..batch_msgs {
        batch.extend_from_slice(format!("PUB bench.t {}\r\n", payload.len()).as_bytes());
        batch.extend_from_slice(&payload);
        batch.extend_from_slice(b"\r\n");
    }
    let delivered = || received_bytes.load(Ordering::Relaxed) / frame_bytes as u64;
    let mut sent = 0u64;
    let mut publish_for = |how_long: Duration| -> Result<()> {
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            if sent.saturating_sub(delivered()) + batch_msgs > params.window_msgs.max(batch_msgs) {
                thread::yield_now();
                continue;
            }
            publisher.write_all(&batch).context("publishing")?;
            sent += batch_msgs;
        }
        Ok(())
    };
    publish_for(params.warmup)?;
    let cpu = CpuWindow::start(server)?;
    let before = delivered();
    publish_for(params.duration)?;
    let moved = delivered() - before;
    let cpu = cpu.finish(server)?;
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the subscriber thread panicked"))??;
    Ok(vec![
        ("delivered_per_s", moved as f64 / cpu.wall.as_secs_f64()),
        (
            "server_cpu_s_per_m_delivered",
            cpu.server_s_per_million(moved)?,
        ),
        ("server_cpu_cores", cpu.server_cores()),
        ("loadgen_cpu_cores", cpu.loadgen_cores()),
    ])
}

/// tls-idle-conn: `idle_conns` TLS connections, each with one SUB, idle.
pub fn idle_conn(server: &RunningServer, params: &Params, files: &TlsFiles) -> Result<Measurement> {
    let config = client_config(files)?;
    thread::sleep(params.settle);
    let rss_before_kib = server.rss_kib()?;
    let deadline = Instant::now() + params.timeout;
    let cpu = CpuWindow::start(server)?;
    let threads = params.connect_threads.max(1);
    let per_thread = params.idle_conns.div_ceil(threads);
    let mut handles = Vec::new();
    for t in 0..threads {
        let config = Arc::clone(&config);
        let addr = server.addr;
        let first = t * per_thread;
        let last = ((t + 1) * per_thread).min(params.idle_conns);
        handles.push(thread::spawn(move || -> Result<Vec<Stream>> {
            (first..last)
                .map(|id| {
                    open(
                        addr,
                        &config,
                        format!("SUB dev.{id}.cmd 1\r\n").as_bytes(),
                        deadline,
                    )
                })
                .collect()
        }));
    }
    let mut conns = Vec::new();
    for handle in handles {
        conns.extend(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a connect thread panicked"))??,
        );
    }
    let cpu = cpu.finish(server)?;
    thread::sleep(params.settle);
    let rss_after_kib = server.rss_kib()?;
    for (id, conn) in conns.iter_mut().enumerate() {
        conn.write_all(b"PING\r\n")?;
        conn.flush()?;
        wait_for_pong(conn).with_context(|| format!("idle TLS connection {id} after settling"))?;
    }
    let count = conns.len().max(1) as f64;
    drop(conns);
    Ok(vec![
        (
            "rss_per_conn_kib",
            (rss_after_kib as f64 - rss_before_kib as f64) / count,
        ),
        ("rss_before_kib", rss_before_kib as f64),
        ("rss_after_kib", rss_after_kib as f64),
        (
            "server_cpu_us_per_conn",
            cpu.server.as_secs_f64() * 1e6 / count,
        ),
    ])
}
