//! `--self-check`: the loadgen's own ceilings with no broker in the way, to
//! show its overhead is not what a scenario measures. Publishing into a TCP
//! sink that discards, counting MSG frames streamed from a TCP source, and
//! parsing MSG frames from memory.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proto::{pub_batch, Conn, FrameKind, FrameReader, STREAM_READ_BUFFER_BYTES};

const SUBJECT: &str = "bench.p";
const BATCH_BYTES: usize = 64 * 1024;

fn msg_frames(payload_bytes: usize, count: usize) -> Vec<u8> {
    let header = format!("MSG {SUBJECT} 1 {payload_bytes}\r\n");
    let mut frames = Vec::with_capacity(count * (header.len() + payload_bytes + 2));
    for _ in 0..count {
        frames.extend_from_slice(header.as_bytes());
        frames.resize(frames.len() + payload_bytes, b'x');
        frames.extend_from_slice(b"\r\n");
    }
    frames
}

fn loopback_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let client = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (server, _) = listener.accept().context("accepting on loopback")?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

/// Publisher → discarding reader: the PUB rate the loadgen can produce.
fn publish_ceiling(payload_bytes: usize, duration: Duration) -> Result<f64> {
    let (mut publisher, mut sink) = loopback_pair()?;
    let frame_bytes = format!("PUB {SUBJECT} {payload_bytes}\r\n").len() + payload_bytes + 2;
    let batch = pub_batch(SUBJECT, payload_bytes, BATCH_BYTES / frame_bytes);
    let sink_thread = thread::spawn(move || -> Result<u64> {
        let mut buffer = vec![0u8; STREAM_READ_BUFFER_BYTES];
        let mut total_bytes = 0u64;
        loop {
            let read_bytes = sink.read(&mut buffer).context("sink read")?;
            if read_bytes == 0 {
                return Ok(total_bytes);
            }
            total_bytes += read_bytes as u64;
        }
    });
    let started = Instant::now();
    while started.elapsed() < duration {
        publisher.write_all(&batch).context("publisher write")?;
    }
    publisher.shutdown(Shutdown::Write)?;
    let total_bytes = sink_thread
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
    Ok(total_bytes as f64 / frame_bytes as f64 / started.elapsed().as_secs_f64())
}

/// Writer of prebuilt MSG frames → the scenario's counting reader.
fn count_ceiling(payload_bytes: usize, duration: Duration) -> Result<f64> {
    let (mut source, subscriber) = loopback_pair()?;
    let frames_per_write = BATCH_BYTES / (payload_bytes + 20);
    let frames = msg_frames(payload_bytes, frames_per_write);
    let stop = AtomicBool::new(false);
    thread::scope(|scope| -> Result<f64> {
        let stop = &stop;
        let source_thread = scope.spawn(move || -> Result<u64> {
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                source.write_all(&frames).context("source write")?;
                written += frames_per_write as u64;
            }
            source.shutdown(Shutdown::Write)?;
            Ok(written)
        });
        let mut conn = Conn {
            stream: subscriber,
            reader: FrameReader::with_capacity(STREAM_READ_BUFFER_BYTES),
        };
        let started = Instant::now();
        let mut count = 0u64;
        let mut measured_rate = None;
        loop {
            while let Some(frame) = conn.reader.next_frame()? {
                if frame.kind == FrameKind::Msg {
                    count += 1;
                }
            }
            if measured_rate.is_none() && started.elapsed() >= duration {
                measured_rate = Some(count as f64 / started.elapsed().as_secs_f64());
                stop.store(true, Ordering::Relaxed);
            }
            match conn.reader.fill(&mut conn.stream) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => return Err(error).context("counting reader"),
            }
        }
        let written = source_thread
            .join()
            .map_err(|_| anyhow::anyhow!("source thread panicked"))??;
        if written != count {
            bail!("counted {count} of {written} frames");
        }
        measured_rate.context("the source stopped early")
    })
}

/// The counting parser alone, on frames already in memory.
fn parse_ceiling(payload_bytes: usize) -> Result<f64> {
    let frame_count = 2_000_000;
    let frames = msg_frames(payload_bytes, frame_count);
    let mut reader = FrameReader::with_capacity(STREAM_READ_BUFFER_BYTES);
    let started = Instant::now();
    let mut count = 0usize;
    for chunk in frames.chunks(BATCH_BYTES) {
        let mut src = chunk;
        while !src.is_empty() {
            reader.fill(&mut src).context("slice read")?;
        }
        while let Some(frame) = reader.next_frame()? {
            if frame.kind == FrameKind::Msg {
                count += 1;
            }
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    if count != frame_count {
        bail!("parsed {count} of {frame_count} frames");
    }
    Ok(count as f64 / elapsed_s)
}

pub fn run(payload_bytes: usize, duration: Duration) -> Result<()> {
    println!("loadgen self-check ({payload_bytes} B payloads, no broker):");
    println!(
        "  PUB frames written to a discarding TCP reader: {:.2} M msg/s",
        publish_ceiling(payload_bytes, duration)? / 1e6
    );
    println!(
        "  MSG frames counted from a TCP writer:          {:.2} M msg/s",
        count_ceiling(payload_bytes, duration)? / 1e6
    );
    println!(
        "  MSG frames parsed from memory (one core):      {:.2} M msg/s",
        parse_ceiling(payload_bytes)? / 1e6
    );
    Ok(())
}
