//! What machine and which server builds a run measured: CPU count and model,
//! kernel, memory, the servers' version strings, and for the JetStream
//! scenarios the disk under the store directories and how long it takes to
//! fdatasync.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::scenarios::percentile;

/// fdatasyncs timed by [`StoreDisk::probe`] at the start of a run.
const FDATASYNC_PROBE_COUNT: usize = 200;
/// Bytes appended before each probed fdatasync: about one small record.
const FDATASYNC_PROBE_BYTES: usize = 64;

#[derive(Clone, Debug)]
pub struct Machine {
    /// CPUs this process may run on (what `nproc` prints).
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// MemTotal from /proc/meminfo (0 if unreadable).
    pub mem_total_kib: u64,
}

impl Machine {
    pub fn detect() -> Self {
        let nproc = std::thread::available_parallelism().map_or(1, usize::from);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        // x86 names it "model name"; many ARM kernels only give "Hardware" or
        // "CPU part".
        let cpu_model = ["model name", "Hardware", "CPU part"]
            .iter()
            .find_map(|key| {
                cpuinfo.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    (name.trim() == *key).then(|| value.trim().to_string())
                })
            })
            .unwrap_or_else(|| "unknown".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let mem_total_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|meminfo| {
                meminfo.lines().find_map(|line| {
                    let rest = line.strip_prefix("MemTotal:")?;
                    rest.trim().trim_end_matches("kB").trim().parse().ok()
                })
            })
            .unwrap_or(0);
        Self {
            nproc,
            cpu_model,
            kernel,
            mem_total_kib,
        }
    }
}

/// The disk the JetStream scenarios' store directories live on. Its fsync
/// latency bounds a server that syncs before acking (perch), not one that
/// does not (nats-server), so it belongs next to every JetStream number.
#[derive(Clone, Debug)]
pub struct StoreDisk {
    pub root: PathBuf,
    /// Mount point, device and filesystem type from /proc/mounts.
    pub mount_point: String,
    pub device: String,
    pub fs_type: String,
    /// p50 and p99 of append 64 B + fdatasync, in µs.
    pub fdatasync_p50_us: f64,
    pub fdatasync_p99_us: f64,
}

impl StoreDisk {
    /// Finds the mount under `root` and times [`FDATASYNC_PROBE_COUNT`]
    /// appends + fdatasyncs to a scratch file there (removed afterwards).
    pub fn probe(root: &Path) -> Result<Self> {
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving the store root {}", root.display()))?;
        let (mount_point, device, fs_type) = mount_of(&root);
        let (fdatasync_p50_us, fdatasync_p99_us) =
            fdatasync_latency_us(&root, FDATASYNC_PROBE_COUNT)?;
        Ok(Self {
            root,
            mount_point,
            device,
            fs_type,
            fdatasync_p50_us,
            fdatasync_p99_us,
        })
    }
}

/// (p50, p99) in µs of `count` × (append 64 B + fdatasync) to a scratch file
/// in `dir`, which is removed afterwards.
pub fn fdatasync_latency_us(dir: &Path, count: usize) -> Result<(f64, f64)> {
    let probe_path = dir.join(format!(".perch-loadgen-fsync-probe-{}", std::process::id()));
    let latencies_ns = time_fdatasyncs(&probe_path, count);
    let _ = std::fs::remove_file(&probe_path);
    let mut latencies_ns =
        latencies_ns.with_context(|| format!("timing fdatasync in {}", dir.display()))?;
    latencies_ns.sort_unstable();
    let micros =
        |quantile| percentile(&latencies_ns, quantile).map_or(0.0, |ns| ns as f64 / 1000.0);
    Ok((micros(0.50), micros(0.99)))
}

fn time_fdatasyncs(path: &Path, count: usize) -> Result<Vec<u64>> {
    let mut file: File = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let record = [b'x'; FDATASYNC_PROBE_BYTES];
    let mut latencies_ns = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        file.write_all(&record).context("appending")?;
        file.sync_data().context("fdatasync")?;
        let elapsed = started.elapsed().min(Duration::from_secs(3600));
        latencies_ns.push(elapsed.as_nanos() as u64);
    }
    Ok(latencies_ns)
}

/// (mount point, device, filesystem type) of the longest /proc/mounts entry
/// containing `path`; "unknown" fields when /proc/mounts is unreadable.
fn mount_of(path: &Path) -> (String, String, String) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(String, String, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mount_point), Some(fs_type)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // /proc/mounts escapes spaces and the like as \ooo octal.
        let mount_point = mount_point.replace("\\040", " ");
        if !path.starts_with(&mount_point) {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(best_point, _, _)| mount_point.len() >= best_point.len())
        {
            best = Some((mount_point, device.to_string(), fs_type.to_string()));
        }
    }
    best.unwrap_or_else(|| ("unknown".into(), "unknown".into(), "unknown".into()))
}

/// First line of `<program> --version`, or why there is none.
pub fn program_version(program: &Path) -> String {
    match Command::new(program).arg("--version").output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(error) => format!("unknown ({error})"),
    }
}
