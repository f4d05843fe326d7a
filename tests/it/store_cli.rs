//! `perch store verify` and `perch store dump`, run as the real binary over stores
//! written with the library: their output, their exit codes (0 clean, 1 corrupt,
//! 2 no such store or stream), that a torn tail is only a warning and left as it
//! was, and that a flipped byte fails verify with the file's path and offset.

use std::path::{Path, PathBuf};
use std::process::Output;

use perch::store::streams::stream_dir;
use perch::store::{Log, LogConfig, NewRecord, OsDirectory};

use crate::support::TempDir;

/// Small segments, so that a few records span several files.
const CONFIG: LogConfig = LogConfig {
    segment_bytes_max: 256,
    index_interval_records: 2,
};
const TIMESTAMP_NS: i64 = 1_700_000_000_000_000_000;

/// Writes stream `name` into the store at `root`: `count` records on `dev.<n>.temp`
/// with payload `reading <nn>` (50 bytes each, 5 to a segment), the last one (79
/// bytes) with a header block and a payload that needs escaping. Returns the stream's directory.
fn write_stream(root: &Path, name: &str, count: u64) -> PathBuf {
    let dir = stream_dir(root, name).expect("valid name");
    let mut log = Log::open(OsDirectory::open(&dir).unwrap(), CONFIG).unwrap();
    for n in 1..count {
        let subject = format!("dev.{n}.temp");
        let payload = format!("reading {n:02}");
        let record = NewRecord {
            timestamp_ns: TIMESTAMP_NS + n as i64,
            subject: subject.as_bytes(),
            headers: b"",
            payload: payload.as_bytes(),
        };
        assert_eq!(log.append(&[record]).unwrap(), n..n + 1);
    }
    let last = NewRecord {
        timestamp_ns: -1,
        subject: b"dev.x.alert",
        headers: b"NATS/1.0\r\nNats-Msg-Id: 7\r\n\r\n",
        payload: b"say \"hi\"\n\xff",
    };
    log.append(&[last]).unwrap();
    dir
}

fn perch_store(args: &[&str]) -> Output {
    crate::support::perch_command()
        .arg("store")
        .args(args)
        .output()
        .expect("run perch")
}

/// The exit code, stdout and stderr of `perch store ARGS`.
fn run(args: &[&str]) -> (i32, String, String) {
    let output = perch_store(args);
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8(output.stdout).expect("utf-8 stdout"),
        String::from_utf8(output.stderr).expect("utf-8 stderr"),
    )
}

fn segment(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn verify_and_dump_a_clean_store() {
    let store = TempDir::new("store-cli-clean");
    let root = store.path.to_str().unwrap();
    write_stream(&store.path, "ORDERS", 10);
    write_stream(&store.path, "EVENTS", 1);

    let (code, stdout, stderr) = run(&["verify", root]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!(
            "stream EVENTS: ok: 1 segment, 1 record, seq 1..=1, 79 bytes\n\
             stream ORDERS: ok: 3 segments, 10 records, seq 1..=10, 529 bytes\n\
             2 streams in {root}: 2 ok, 0 failed, 0 with warnings\n"
        )
    );
    assert_eq!(stderr, "");

    let (code, stdout, stderr) = run(&["dump", root, "--stream", "ORDERS"]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    assert_eq!(
        lines[0],
        "seq=1 time=2023-11-14T22:13:20.000000001Z subject=dev.1.temp headers_bytes=0 \
         payload_bytes=10 payload=\"reading 01\""
    );
    assert_eq!(
        lines[9],
        r#"seq=10 time=1969-12-31T23:59:59.999999999Z subject=dev.x.alert headers_bytes=28 payload_bytes=10 payload="say \"hi\"\n\xff""#
    );

    // --from and --limit, across a segment boundary; --from below the first record.
    let (code, stdout, _) = run(&[
        "dump", root, "--stream", "ORDERS", "--from", "4", "--limit", "3",
    ]);
    assert_eq!(code, 0);
    let seqs: Vec<&str> = stdout
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(seqs, ["seq=4", "seq=5", "seq=6"]);
    let (code, stdout, _) = run(&[
        "dump", root, "--stream", "ORDERS", "--from", "0", "--limit", "1",
    ]);
    assert_eq!((code, stdout.lines().count()), (0, 1));
    assert!(stdout.starts_with("seq=1 "));
    let (code, stdout, _) = run(&["dump", root, "--stream", "ORDERS", "--from", "11"]);
    assert_eq!((code, stdout.as_str()), (0, ""));

    // What the command could not run on: exit 2, with the reason.
    let missing = store.path.join("missing");
    let (code, _, stderr) = run(&["verify", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("is no store"), "{stderr}");
    let (code, _, stderr) = run(&["dump", root, "--stream", "NOPE"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no stream \"NOPE\""), "{stderr}");
    let (code, _, stderr) = run(&["dump", root, "--stream", "a.b"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("contains '.'"), "{stderr}");
}

#[test]
fn verify_warns_of_a_torn_tail_and_fails_on_a_flipped_byte() {
    let store = TempDir::new("store-cli-damage");
    let root = store.path.to_str().unwrap();
    let orders = write_stream(&store.path, "ORDERS", 10);

    // Garbage after the last record of the last segment: a torn write. A warning,
    // exit 0, and the file stays exactly as it was.
    let last = segment(&orders, 10);
    flip_byte(&last, 150);
    let before = std::fs::read(&last).unwrap();
    let (code, stdout, stderr) = run(&["verify", root]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "warning: torn tail at offset 79 of {} (bad record length 0), non-zero bytes \
             up to offset 151",
            last.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("1 ok, 0 failed, 1 with warnings\n"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "verify changed nothing"
    );
    // Dump prints every record and warns on stderr.
    let (code, stdout, stderr) = run(&["dump", root, "--stream", "ORDERS"]);
    assert_eq!((code, stdout.lines().count()), (0, 10));
    assert!(stderr.contains("torn tail at offset 79"), "{stderr}");

    // A flipped byte in record 2's payload, with valid records after it: corruption,
    // exit 1, naming the segment's path and the bad record's offset.
    let first = segment(&orders, 1);
    flip_byte(&first, 50 + 30);
    let (code, stdout, stderr) = run(&["verify", root]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let want = format!(
        "stream ORDERS: FAILED: corrupt {}: bad record at offset 50 (bad record crc",
        first.display()
    );
    assert!(stdout.contains(&want), "{stdout}");
    assert!(
        stdout.contains("followed by valid record 3 at offset 100"),
        "{stdout}"
    );
    assert!(
        stderr.contains("failed verification: 1 of 1 streams"),
        "{stderr}"
    );
    // Dump refuses the corrupt log the same way.
    let (code, stdout, stderr) = run(&["dump", root, "--stream", "ORDERS"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(stderr.contains(&first.display().to_string()), "{stderr}");
}

/// Deleted messages are not dumped; an interrupted deletion at the end of the
/// `deletes` file (a torn last entry) is a warning that names it, is not applied,
/// and is left in place for the broker to cut.
#[test]
fn dump_skips_deleted_and_warns_of_a_torn_deletion() {
    let root = TempDir::new("store-cli-deletes");
    let dir = write_stream(&root.path, "DEL", 6);
    {
        let mut log = Log::open(OsDirectory::open(&dir).unwrap(), CONFIG).unwrap();
        let runs = [2..3, 3..4];
        assert_eq!(log.delete(&runs).unwrap(), 2);
    }
    let (code, out, err) = run(&["dump", root.path.to_str().unwrap(), "--stream", "DEL"]);
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(seqs, ["seq=1", "seq=4", "seq=5", "seq=6"], "{out}");
    assert!(err.is_empty(), "no warning yet: {err}");

    // Tear the deletes file: append half an entry, as a power cut mid-write would.
    let deletes = dir.join("deletes");
    let mut bytes = std::fs::read(&deletes).unwrap();
    let whole = bytes.len();
    bytes.extend_from_slice(&[0xAB; 10]);
    std::fs::write(&deletes, &bytes).unwrap();
    let (code, out_again, err) = run(&["dump", root.path.to_str().unwrap(), "--stream", "DEL"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out_again, out, "the torn entry deletes nothing");
    assert!(
        err.contains("deletes file ends in an interrupted deletion")
            && err.contains(&format!("at offset {whole} of {} bytes", whole + 10)),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&deletes).unwrap().len(),
        whole + 10,
        "left as it was"
    );
}
