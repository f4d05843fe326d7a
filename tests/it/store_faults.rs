//! The store fails closed: when the disk refuses a write, perch acknowledges nothing
//! more, logs it and exits nonzero, and every message it did acknowledge is there
//! after a restart.
//!
//! The "full disk" is RLIMIT_FSIZE on the broker process (no root, no special file
//! system needed): with SIGXFSZ ignored, a write or preallocation past the limit
//! fails with EFBIG, which is what the store sees when a disk fills up. Segments are
//! made small (`--store-segment-bytes`) so the failure comes after a few messages:
//! the stream's first segment exists before the limit is set; the first roll to a
//! new segment then fails.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, TempDir};

const SEGMENT_BYTES: u64 = 256 * 1024;
/// Below a segment's size, above everything else perch writes.
const FILE_BYTES_LIMIT: u64 = 128 * 1024;
const EXIT_STORE_FAILED: i32 = 74;

/// The broker process, killed when the test ends (also by a failing assertion:
/// a leaked child would keep the test harness's output open).
struct Perch(Child);

impl Drop for Perch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_perch(port: u16, store: &std::path::Path, file_limit: Option<u64>) -> Perch {
    let io = std::env::var("PERCH_IO").unwrap_or_else(|_| "auto".into());
    let mut command = crate::support::perch_command();
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--io",
            &io,
        ])
        .args([
            "--shards",
            "2",
            "--store-segment-bytes",
            &SEGMENT_BYTES.to_string(),
        ])
        .arg("--store-dir")
        .arg(store)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    if let Some(limit) = file_limit {
        // SAFETY: between fork and exec only async-signal-safe calls (setrlimit,
        // signal) touching this process's own limits and dispositions.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let mut child = command.spawn().expect("spawn perch");
    let started = Instant::now();
    loop {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .ok();
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                return Perch(child);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("perch exited during startup: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "perch did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(Perch(child): &mut Perch, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait perch") {
            return status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("perch kept running after its store failed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn full_disk_stops_acks_and_exits_nonzero_keeping_every_acked_message() {
    let store = TempDir::new("full-disk");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");

    // Create the stream (and its first segment) with room to spare.
    let child = spawn_perch(port, &store.path, None);
    {
        let client = async_nats::connect(&url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "F".into(),
            subjects: vec!["f".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    drop(child);

    // Restart with the disk "full" for any new file: publish until the roll fails.
    let mut child = spawn_perch(port, &store.path, Some(FILE_BYTES_LIMIT));
    let client = async_nats::connect(&url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut refused = false;
    for i in 0u32..200 {
        let payload: Vec<u8> = format!("message {i} ").repeat(400).into_bytes();
        let ack = match js.publish("f", payload.clone().into()).await {
            Ok(future) => tokio::time::timeout(Duration::from_secs(10), future).await,
            Err(_) => {
                refused = true;
                break;
            }
        };
        match ack {
            Ok(Ok(ack)) => acked.push((ack.sequence, payload)),
            Ok(Err(_)) | Err(_) => {
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "200 × 4.8 KB fit in one 256 KiB segment?");
    assert!(
        acked.len() > 10,
        "the first segment took only {} messages",
        acked.len()
    );
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(EXIT_STORE_FAILED), "{status}");

    // Without the limit: every acknowledged message is there, in order.
    let child = spawn_perch(port, &store.path, None);
    let client = async_nats::connect(&url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("F").await.expect("stream F");
    let info = stream.info().await.expect("stream info");
    let last_acked = acked.last().map(|(seq, _)| *seq).unwrap_or(0);
    assert!(info.state.last_sequence >= last_acked);
    for (seq, payload) in &acked {
        let message = stream.get_raw_message(*seq).await.expect("acked message");
        assert_eq!(&message.payload[..], &payload[..], "seq {seq}");
    }
    // And it takes messages again.
    let ack = js
        .publish("f", "after".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert!(ack.sequence > last_acked);
    drop(child);
}
