//! Recovery time of a store log: writes `PERCH_BENCH_STORE_MIB` MiB (default
//! 1024) of 16-byte-payload records into a temporary directory in group-committed
//! batches, drops the log, then times `Log::open` (scan, CRC check of every
//! record, index rebuild) over several runs and prints the median. By default the
//! page cache stays warm (a process restart); with `PERCH_BENCH_DROP_CACHES=1`
//! (root) the caches are dropped before each open (a cold boot reads the disk).
//! Run: `cargo bench --bench store_recovery`.

use std::time::Instant;

use perch::jetstream::api::StreamConfig;
use perch::jetstream::stream::Stream;
use perch::store::{Log, LogConfig, NewRecord, OsDirectory};

const RECORDS_PER_BATCH: usize = 4096;
const RUNS: usize = 5;
const STREAM_RUNS: usize = 3;

fn main() {
    let mib: u64 = std::env::var("PERCH_BENCH_STORE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = std::env::temp_dir().join(format!("perch-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let payload = [b'x'; 16];
    let subjects: Vec<String> = (0..1000).map(|i| format!("sensors.{i}.t")).collect();
    let target_bytes = mib << 20;
    let mut written_bytes = 0u64;
    let mut records = 0u64;
    let started = Instant::now();
    {
        let mut log = Log::open(OsDirectory::open(&dir).expect("dir"), LogConfig::default())
            .expect("open new log");
        while written_bytes < target_bytes {
            let batch: Vec<NewRecord<'_>> = (0..RECORDS_PER_BATCH)
                .map(|i| NewRecord {
                    timestamp_ns: i as i64,
                    subject: subjects[(records as usize + i) % subjects.len()].as_bytes(),
                    headers: b"",
                    payload: &payload,
                })
                .collect();
            log.append(&batch).expect("append");
            records += batch.len() as u64;
            // 30 bytes of framing + subject + payload per record (store-format.md).
            written_bytes += batch
                .iter()
                .map(|r| 30 + r.subject.len() as u64 + r.payload.len() as u64)
                .sum::<u64>();
        }
    }
    println!(
        "wrote {records} records, {:.0} MiB, in {:.1} s",
        written_bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let drop_caches = std::env::var("PERCH_BENCH_DROP_CACHES").is_ok_and(|v| v == "1");
    let mut times = Vec::new();
    for _ in 0..RUNS {
        if drop_caches {
            // sync(1), then the kernel's documented cache-drop knob.
            let _ = std::process::Command::new("sync").status();
            std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (needs root)");
        }
        let started = Instant::now();
        let log =
            Log::open(OsDirectory::open(&dir).expect("dir"), LogConfig::default()).expect("reopen");
        times.push(started.elapsed().as_secs_f64());
        assert_eq!(log.last_seq(), records, "every record recovered");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "recovery (Log::open, {} cache) of {:.0} MiB: median {:.3} s over {RUNS} runs (min {:.3}, max {:.3})",
        if drop_caches { "cold" } else { "warm" },
        written_bytes as f64 / (1 << 20) as f64,
        times[RUNS / 2],
        times[0],
        times[RUNS - 1]
    );
    // The whole stream: the log's recovery plus the state a stream rebuilds from
    // it (live messages, per-subject counts, the dedupe window) — what a broker
    // restart costs before the stream answers.
    let config: StreamConfig =
        serde_json::from_str(r#"{"name":"BENCH","subjects":["sensors.>"]}"#).expect("config");
    let config = config.with_server_defaults();
    let mut stream_times = Vec::new();
    for _ in 0..STREAM_RUNS {
        if drop_caches {
            let _ = std::process::Command::new("sync").status();
            std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (needs root)");
        }
        let started = Instant::now();
        let stream = Stream::open(
            OsDirectory::open(&dir).expect("dir"),
            config.clone(),
            records as i64,
        )
        .expect("reopen stream");
        stream_times.push(started.elapsed().as_secs_f64());
        assert_eq!(stream.state().messages, records, "every message live");
    }
    stream_times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "stream open (log recovery + state rebuild, {} cache): median {:.3} s over {STREAM_RUNS} runs (min {:.3}, max {:.3})",
        if drop_caches { "cold" } else { "warm" },
        stream_times[STREAM_RUNS / 2],
        stream_times[0],
        stream_times[STREAM_RUNS - 1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
