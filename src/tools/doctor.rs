//! `perch doctor`: checks the machine against the configuration perch would
//! run with, and says for each finding what to do about it. Read-only except
//! for a small probe file in the store directory (for the fsync timing) and
//! the ports it tries to bind (released at once).
//!
//! Every check turns what it read into a [`Finding`] through a pure function
//! of those readings (`judge_*`), so the judgements are unit-tested with
//! readings of machines we do not have; the readers are thin.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::runtime::io::IoMode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Error,
}

/// One check's verdict: what was found and, unless all is well, the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub what: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, what: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            check,
            what: what.into(),
            fix: None,
        }
    }

    fn warn(check: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Warn,
            check,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    fn error(check: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Error,
            check,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        write!(f, "{level:<5} {:<13} {}", self.check, self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

/// Runs every check for `config`; prints each finding to `out` as it comes
/// (the fsync timing takes a moment) and returns them all.
pub fn run(config: &Config, out: &mut impl Write) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut emit = |f: Finding| {
        let _ = writeln!(out, "{f}");
        findings.push(f);
    };
    let kernel = kernel_release();
    emit(judge_io_uring(&IoReadings::read(), config.io, &kernel));
    emit(judge_nofile(read_rlimit(libc::RLIMIT_NOFILE), config));
    emit(judge_memlock(
        read_rlimit(libc::RLIMIT_MEMLOCK),
        &kernel,
        config.shard_count(),
    ));
    emit(judge_cpus(
        crate::runtime::affinity::allowed_cpus().len(),
        read_cpu_quota(),
        config.shards,
    ));
    match &config.store_dir {
        Some(dir) => {
            for f in check_store(dir, config.store_segment_bytes) {
                emit(f);
            }
        }
        None => emit(Finding::ok(
            "store",
            "none configured (streams off); --store-dir turns them on",
        )),
    }
    emit(judge_clock(SystemTime::now()));
    emit(check_tcp_port("nats port", config.listen));
    if let Some(addr) = config.device.udp {
        emit(check_udp_port("device udp", addr));
    }
    if let Some(addr) = config.device.tcp {
        emit(check_tcp_port("device tcp", addr));
    }
    findings
}

/// 0: all ok; 1: warnings; 2: errors.
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.level).max() {
        Some(Level::Error) => 2,
        Some(Level::Warn) => 1,
        _ => 0,
    }
}

// ------------------------------------------------------------------ io_uring

/// What the io_uring check reads off the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoReadings {
    /// The result of setting up a ring (as the shards would): None = it worked.
    pub setup_errno: Option<i32>,
    /// This binary was built with the io_uring backend.
    pub built_with_uring: bool,
    /// `kernel.io_uring_disabled` (0, 1, 2), when the kernel has the sysctl.
    pub disabled_sysctl: Option<u8>,
    /// The process runs under a seccomp filter (`Seccomp: 2` in /proc/self/status).
    pub seccomp_filter: bool,
}

impl IoReadings {
    fn read() -> IoReadings {
        let setup_errno = crate::runtime::io::probe_io_uring()
            .err()
            .map(|e| e.raw_os_error().unwrap_or(libc::EIO));
        let disabled_sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let seccomp_filter = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim() == "2"))
            })
            .unwrap_or(false);
        IoReadings {
            setup_errno,
            built_with_uring: cfg!(feature = "uring"),
            disabled_sysctl,
            seccomp_filter,
        }
    }
}

/// The kernel's release (`uname -r`) and its (major, minor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub release: String,
    pub version: Option<(u32, u32)>,
}

impl Kernel {
    pub fn parse(release: &str) -> Kernel {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|p| p.parse().ok());
        let minor = parts.next().and_then(|p| p.parse().ok());
        Kernel {
            release: release.to_string(),
            version: major.zip(minor),
        }
    }

    fn older_than(&self, major: u32, minor: u32) -> bool {
        self.version.is_some_and(|v| v < (major, minor))
    }
}

fn kernel_release() -> Kernel {
    // SAFETY: utsname is plain data that uname fills.
    let release = unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) != 0 {
            return Kernel::parse("");
        }
        std::ffi::CStr::from_ptr(uts.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    Kernel::parse(&release)
}

pub fn judge_io_uring(r: &IoReadings, mode: IoMode, kernel: &Kernel) -> Finding {
    const CHECK: &str = "io_uring";
    if mode == IoMode::Epoll {
        return Finding::ok(CHECK, "not used (io = \"epoll\" configured)");
    }
    let Some(errno) = r.setup_errno else {
        return Finding::ok(
            CHECK,
            format!(
                "available (kernel {}); shards run on io_uring",
                kernel.release
            ),
        );
    };
    let (why, fix) = if !r.built_with_uring {
        (
            "this binary was built without the io_uring backend".to_string(),
            "use a build with the default `uring` feature".to_string(),
        )
    } else if kernel.older_than(5, 11) {
        (
            format!(
                "kernel {} is older than 5.11, which the backend needs",
                kernel.release
            ),
            "upgrade the kernel (5.11 or newer)".to_string(),
        )
    } else if errno == libc::EPERM && r.disabled_sysctl == Some(2) {
        (
            "disabled by sysctl kernel.io_uring_disabled=2".to_string(),
            "sysctl -w kernel.io_uring_disabled=0 (and in /etc/sysctl.d/ to keep it)".to_string(),
        )
    } else if errno == libc::EPERM && r.disabled_sysctl == Some(1) {
        (
            "kernel.io_uring_disabled=1 and this user is not in kernel.io_uring_group".to_string(),
            "sysctl -w kernel.io_uring_group=<perch's group id>, or kernel.io_uring_disabled=0"
                .to_string(),
        )
    } else if (errno == libc::EPERM || errno == libc::ENOSYS) && r.seccomp_filter {
        (
            format!(
                "refused by this process's seccomp filter ({})",
                errno_name(errno)
            ),
            "allow io_uring_setup, io_uring_enter and io_uring_register in the sandbox \
             (Docker: a seccomp profile that allows them; systemd: SystemCallFilter=@system-service \
             includes them)"
                .to_string(),
        )
    } else if errno == libc::ENOSYS {
        (
            "the io_uring system calls do not exist here (an emulator such as qemu-user, \
             or a kernel built without CONFIG_IO_URING)"
                .to_string(),
            "none needed under emulation; on real hardware use a kernel with CONFIG_IO_URING=y"
                .to_string(),
        )
    } else if errno == libc::ENOMEM && kernel.older_than(5, 12) {
        (
            "ring memory refused: before 5.12 rings count against RLIMIT_MEMLOCK".to_string(),
            "raise the memlock limit (LimitMEMLOCK= in the unit, ulimit -l)".to_string(),
        )
    } else {
        (
            format!("setting up a ring failed ({})", errno_name(errno)),
            "see the kernel log; `--io epoll` runs without io_uring".to_string(),
        )
    };
    match mode {
        IoMode::Uring => Finding::error(
            CHECK,
            format!("unavailable: {why}; io = \"uring\" is configured, so perch will not start"),
            format!("{fix}; or use io = \"auto\" to fall back to epoll"),
        ),
        _ => Finding::warn(
            CHECK,
            format!("unavailable: {why}; perch falls back to epoll"),
            fix,
        ),
    }
}

fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOSYS => "ENOSYS",
        libc::ENOMEM => "ENOMEM",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

// ------------------------------------------------------------------ limits

/// (soft, hard); None when unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// getrlimit's resource argument: glibc has its own type, musl an int.
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

// rlim_t is u64 on 64-bit targets and u32 on 32-bit ARM.
#[allow(clippy::unnecessary_cast)]
fn read_rlimit(resource: Resource) -> Rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Rlimit {
            soft: None,
            hard: None,
        };
    }
    let value = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v as u64);
    Rlimit {
        soft: value(lim.rlim_cur),
        hard: value(lim.rlim_max),
    }
}

/// Descriptors perch needs beyond its client connections: listeners, the
/// store's segment files, rings, eventfds, device sockets.
const FDS_BEYOND_CONNECTIONS: u64 = 256;

pub fn judge_nofile(limit: Rlimit, config: &Config) -> Finding {
    const CHECK: &str = "open files";
    let needed = config.max_connections as u64 + FDS_BEYOND_CONNECTIONS;
    match limit.soft {
        Some(soft) if soft < needed => {
            let hard_note = match limit.hard {
                Some(hard) if hard < needed => format!(" (the hard limit, {hard}, too)"),
                _ => String::new(),
            };
            Finding::warn(
                CHECK,
                format!(
                    "soft limit {soft}{hard_note} < {needed} needed for max_connections = {}; \
                     connections beyond ~{} are refused",
                    config.max_connections,
                    soft.saturating_sub(FDS_BEYOND_CONNECTIONS)
                ),
                format!(
                    "LimitNOFILE={needed} in the systemd unit, or `ulimit -n {needed}`; \
                     or lower max_connections"
                ),
            )
        }
        Some(soft) => Finding::ok(
            CHECK,
            format!(
                "limit {soft} ≥ {needed} for max_connections = {}",
                config.max_connections
            ),
        ),
        None => Finding::ok(CHECK, "unlimited"),
    }
}

/// Locked memory a shard's ring needs at most before kernel 5.12 (256
/// entries of SQ and CQ plus the rings' headers, rounded up generously).
const MEMLOCK_PER_RING_BYTES: u64 = 128 * 1024;

pub fn judge_memlock(limit: Rlimit, kernel: &Kernel, shards: usize) -> Finding {
    const CHECK: &str = "locked memory";
    if !kernel.older_than(5, 12) {
        return Finding::ok(
            CHECK,
            "not used by io_uring on this kernel (5.12 and newer account rings as memory)",
        );
    }
    let needed = shards as u64 * MEMLOCK_PER_RING_BYTES;
    match limit.soft {
        Some(soft) if soft < needed => Finding::warn(
            CHECK,
            format!(
                "RLIMIT_MEMLOCK {soft} B < {needed} B for {shards} rings on kernel {} \
                 (before 5.12 rings are locked memory): shards may fall back to epoll",
                kernel.release
            ),
            format!(
                "LimitMEMLOCK={needed} in the systemd unit, or `ulimit -l {}`",
                needed / 1024
            ),
        ),
        _ => Finding::ok(CHECK, format!("enough for {shards} rings")),
    }
}

// ------------------------------------------------------------------ CPUs

/// The cgroup v2 CPU quota of this process, in CPUs (`cpu.max`), if any.
fn read_cpu_quota() -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    // The quota may be set on any ancestor; the tightest one counts.
    let mut tightest: Option<f64> = None;
    loop {
        if let Some(q) = std::fs::read_to_string(dir.join("cpu.max"))
            .ok()
            .and_then(|s| parse_cpu_max(&s))
        {
            tightest = Some(tightest.map_or(q, |t| t.min(q)));
        }
        if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
            break;
        }
    }
    tightest
}

/// `cpu.max` ("max 100000" or "150000 100000") as CPUs; None when unlimited.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period: f64 = fields.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

pub fn judge_cpus(allowed: usize, quota: Option<f64>, shards: Option<usize>) -> Finding {
    const CHECK: &str = "cpus";
    let running = shards.unwrap_or(allowed).max(1);
    let quota_note = quota.map_or(String::new(), |q| format!(", cgroup quota {q:.2} CPUs"));
    if running > allowed {
        return Finding::warn(
            CHECK,
            format!(
                "{running} shards configured but this process may run on {allowed} CPUs: \
                 shards share CPUs and cannot all be pinned"
            ),
            format!("shards = {allowed} (or leave it unset: one per allowed CPU)"),
        );
    }
    if let Some(q) = quota {
        if running as f64 > q.ceil() {
            return Finding::warn(
                CHECK,
                format!(
                    "{running} shards but the cgroup allows {q:.2} CPUs of time: busy shards \
                     are throttled, which shows as latency spikes"
                ),
                format!(
                    "shards = {} to match the quota, or raise CPUQuota=",
                    q.ceil().max(1.0)
                ),
            );
        }
    }
    Finding::ok(
        CHECK,
        format!("{running} shards on {allowed} allowed CPUs{quota_note}"),
    )
}

// ------------------------------------------------------------------ store

/// Filesystem magic numbers (statfs f_type) and what they mean for a store.
pub fn filesystem_name(f_type: i64) -> &'static str {
    match f_type {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0xF2F5_2010 => "f2fs",
        0x2FC1_2FC1 => "zfs",
        0x0102_1994 => "tmpfs",
        0x6969 => "nfs",
        0x794C_7630 => "overlayfs",
        0x4d44 => "vfat",
        0x2011_BAB0 => "exfat",
        0x5346_544E => "ntfs",
        0x7366_746E => "ntfs3",
        0x6573_5546 => "fuse",
        0x7371_7368 => "squashfs",
        _ => "unknown",
    }
}

/// Store-directory findings from its filesystem, free space and fsync times.
pub fn judge_store(
    fs: &str,
    free_bytes: u64,
    total_bytes: u64,
    segment_bytes: u64,
    fsync: Option<(Duration, Duration)>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(match fs {
        "tmpfs" => Finding::warn(
            "store fs",
            "tmpfs: the store lives in RAM and is lost at every reboot; acks are not durable",
            "put store_dir on a disk or flash filesystem (ext4, f2fs, xfs)",
        ),
        "nfs" | "fuse" | "overlayfs" => Finding::warn(
            "store fs",
            format!("{fs}: fsync and rename may not be durable or atomic here"),
            "put store_dir on a local filesystem (ext4, f2fs, xfs)",
        ),
        "vfat" | "exfat" | "ntfs" | "ntfs3" | "squashfs" => Finding::warn(
            "store fs",
            format!("{fs}: no journal, or read-only; a power cut can corrupt the directory"),
            "put store_dir on a journaling filesystem (ext4, f2fs, xfs)",
        ),
        fs => Finding::ok("store fs", fs.to_string()),
    });
    let floor = (2 * segment_bytes).max(total_bytes / 20);
    out.push(if free_bytes < floor {
        Finding::warn(
            "store space",
            format!(
                "{} MiB free of {} MiB: below {} MiB (two segments or 5%); a full disk \
                 refuses new stream writes",
                free_bytes >> 20,
                total_bytes >> 20,
                floor >> 20
            ),
            "free space, or set streams' max_bytes / max_age so they stay within it",
        )
    } else {
        Finding::ok(
            "store space",
            format!("{} MiB free of {} MiB", free_bytes >> 20, total_bytes >> 20),
        )
    });
    out.push(match fsync {
        Some((p50, max)) if p50 > Duration::from_millis(10) => Finding::warn(
            "store fsync",
            format!(
                "fdatasync p50 {:.2} ms, max {:.2} ms: slow storage (an SD card?); every \
                 acked publish waits for one (group-committed)",
                p50.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            ),
            "faster storage, or store_durability = \"interval\" for streams that can lose \
             the last interval at a power cut",
        ),
        Some((p50, max)) => Finding::ok(
            "store fsync",
            format!(
                "fdatasync p50 {:.2} ms, max {:.2} ms (16 × 4 KiB)",
                p50.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            ),
        ),
        None => Finding::warn(
            "store fsync",
            "could not time fdatasync (the probe file could not be written)",
            "check that perch's user may write store_dir",
        ),
    });
    out
}

fn check_store(dir: &Path, segment_bytes: u64) -> Vec<Finding> {
    // The directory itself, or the nearest existing parent (perch creates it).
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    let Some(stat) = statfs(&existing) else {
        return vec![Finding::error(
            "store",
            format!("{}: cannot read its filesystem", dir.display()),
            "create the directory, writable by perch's user",
        )];
    };
    let fsync = if dir.exists() {
        time_fsync(dir)
    } else {
        return vec![Finding::warn(
            "store",
            format!(
                "{} does not exist yet (perch creates it; {} is on {})",
                dir.display(),
                existing.display(),
                filesystem_name(stat.f_type)
            ),
            format!("mkdir -p {} (owned by perch's user)", dir.display()),
        )];
    };
    judge_store(
        filesystem_name(stat.f_type),
        stat.free_bytes,
        stat.total_bytes,
        segment_bytes,
        fsync,
    )
}

struct Statfs {
    f_type: i64,
    free_bytes: u64,
    total_bytes: u64,
}

// statfs's field types differ per target (u64 on x86_64, u32 on 32-bit ARM).
#[allow(clippy::unnecessary_cast)]
fn statfs(path: &Path) -> Option<Statfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        let block = s.f_bsize as u64;
        Some(Statfs {
            f_type: s.f_type as i64,
            free_bytes: s.f_bavail as u64 * block,
            total_bytes: s.f_blocks as u64 * block,
        })
    }
}

/// (p50, max) of 16 fdatasyncs of a 4 KiB write in `dir`.
fn time_fsync(dir: &Path) -> Option<(Duration, Duration)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!(".perch-doctor-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .ok()?;
    let block = [0x5au8; 4096];
    let mut times = Vec::with_capacity(16);
    for i in 0..16u64 {
        let start = Instant::now();
        if file.write_all_at(&block, i * 4096).is_err() || file.sync_data().is_err() {
            break;
        }
        times.push(start.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    if times.is_empty() {
        return None;
    }
    times.sort();
    Some((times[times.len() / 2], times[times.len() - 1]))
}

// ------------------------------------------------------------------ clock

/// Before this the wall clock cannot be right (JetStream's clock agrees).
const CLOCK_PLAUSIBLE_AFTER_S: u64 =
    (crate::jetstream::clock::PLAUSIBLE_AFTER_NS / 1_000_000_000) as u64;

pub fn judge_clock(now: SystemTime) -> Finding {
    const CHECK: &str = "clock";
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if secs < CLOCK_PLAUSIBLE_AFTER_S {
        let year = 1970 + secs / 31_556_952;
        return Finding::warn(
            CHECK,
            format!(
                "the wall clock says {year}: it looks unset (no RTC, NTP not synced yet). \
                 perch's timers run on the monotonic clock, but stored messages are \
                 stamped with this time and max_age counts from it"
            ),
            "enable time sync (systemd-timesyncd, chrony) and order perch after \
             time-sync.target, or keep the time across reboots (fake-hwclock)",
        );
    }
    Finding::ok(CHECK, "the wall clock looks set")
}

// ------------------------------------------------------------------ ports

fn judge_bind(check: &'static str, addr: SocketAddr, result: std::io::Result<()>) -> Finding {
    match result {
        Ok(()) => Finding::ok(check, format!("{addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Finding::error(
            check,
            format!("{addr} is in use (another perch or nats-server running?)"),
            "stop what holds it (`ss -ltnup` shows it), or configure another address",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Finding::error(
            check,
            format!("{addr}: not allowed to bind ({e})"),
            "ports below 1024 need CAP_NET_BIND_SERVICE (AmbientCapabilities= in the unit)",
        ),
        Err(e) => Finding::error(
            check,
            format!("{addr}: cannot bind ({e})"),
            "check that the address belongs to this machine",
        ),
    }
}

fn check_tcp_port(check: &'static str, addr: SocketAddr) -> Finding {
    judge_bind(check, addr, std::net::TcpListener::bind(addr).map(drop))
}

fn check_udp_port(check: &'static str, addr: SocketAddr) -> Finding {
    judge_bind(check, addr, std::net::UdpSocket::bind(addr).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(errno: Option<i32>) -> IoReadings {
        IoReadings {
            setup_errno: errno,
            built_with_uring: true,
            disabled_sysctl: Some(0),
            seccomp_filter: false,
        }
    }

    #[test]
    fn io_uring_causes_are_told_apart() {
        let new = Kernel::parse("6.1.0-18-arm64");
        assert_eq!(new.version, Some((6, 1)));
        assert_eq!(
            judge_io_uring(&readings(None), IoMode::Auto, &new).level,
            Level::Ok
        );
        let seccomp = IoReadings {
            seccomp_filter: true,
            ..readings(Some(libc::EPERM))
        };
        let f = judge_io_uring(&seccomp, IoMode::Auto, &new);
        assert_eq!(f.level, Level::Warn);
        assert!(f.what.contains("seccomp"), "{f}");
        assert_eq!(
            judge_io_uring(&seccomp, IoMode::Uring, &new).level,
            Level::Error
        );
        let sysctl = IoReadings {
            disabled_sysctl: Some(2),
            ..readings(Some(libc::EPERM))
        };
        assert!(judge_io_uring(&sysctl, IoMode::Auto, &new)
            .fix
            .is_some_and(|f| f.contains("io_uring_disabled=0")));
        let qemu = judge_io_uring(&readings(Some(libc::ENOSYS)), IoMode::Auto, &new);
        assert!(qemu.what.contains("qemu"), "{qemu}");
        let old = Kernel::parse("4.19.0");
        assert!(
            judge_io_uring(&readings(Some(libc::ENOSYS)), IoMode::Auto, &old)
                .what
                .contains("older than 5.11")
        );
        assert_eq!(
            judge_io_uring(&readings(Some(libc::EPERM)), IoMode::Epoll, &new).level,
            Level::Ok
        );
    }

    #[test]
    fn limits_are_checked_against_the_config() {
        let config = Config {
            max_connections: 10_000,
            ..Config::default()
        };
        let low = Rlimit {
            soft: Some(1024),
            hard: Some(4096),
        };
        let f = judge_nofile(low, &config);
        assert_eq!(f.level, Level::Warn);
        assert!(f.what.contains("hard limit"), "{f}");
        assert!(f.fix.is_some_and(|f| f.contains("LimitNOFILE=10256")));
        let high = Rlimit {
            soft: Some(1 << 20),
            hard: Some(1 << 20),
        };
        assert_eq!(judge_nofile(high, &config).level, Level::Ok);
        let old = Kernel::parse("5.10.0");
        assert_eq!(
            judge_memlock(
                Rlimit {
                    soft: Some(64 * 1024),
                    hard: None
                },
                &old,
                4
            )
            .level,
            Level::Warn
        );
        assert_eq!(
            judge_memlock(
                Rlimit {
                    soft: Some(0),
                    hard: None
                },
                &Kernel::parse("5.12.1"),
                4
            )
            .level,
            Level::Ok
        );
    }

    #[test]
    fn cpus_and_quotas() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(judge_cpus(4, None, None).level, Level::Ok);
        assert_eq!(judge_cpus(2, None, Some(4)).level, Level::Warn);
        assert_eq!(judge_cpus(4, Some(1.0), None).level, Level::Warn);
        assert_eq!(judge_cpus(4, Some(2.0), Some(2)).level, Level::Ok);
    }

    #[test]
    fn store_findings() {
        let mib = 1u64 << 20;
        let fast = Some((Duration::from_micros(200), Duration::from_millis(1)));
        let all_ok = judge_store("ext4", 10_000 * mib, 20_000 * mib, 64 * mib, fast);
        assert!(all_ok.iter().all(|f| f.level == Level::Ok), "{all_ok:?}");
        let tmp = judge_store("tmpfs", 10_000 * mib, 20_000 * mib, 64 * mib, fast);
        assert_eq!(tmp[0].level, Level::Warn);
        let full = judge_store("ext4", 100 * mib, 20_000 * mib, 64 * mib, fast);
        assert_eq!(full[1].level, Level::Warn);
        let slow = Some((Duration::from_millis(30), Duration::from_millis(90)));
        let sd = judge_store("ext4", 10_000 * mib, 20_000 * mib, 64 * mib, slow);
        assert_eq!(sd[2].level, Level::Warn);
        assert_eq!(filesystem_name(0x0102_1994), "tmpfs");
    }

    #[test]
    fn an_unset_clock_is_noticed() {
        let boot = UNIX_EPOCH + Duration::from_secs(3600);
        let f = judge_clock(boot);
        assert_eq!(f.level, Level::Warn);
        assert!(f.what.contains("1970"), "{f}");
        let now = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(judge_clock(now).level, Level::Ok);
    }

    #[test]
    fn exit_codes() {
        let ok = Finding::ok("a", "fine");
        let warn = Finding::warn("b", "meh", "fix");
        let error = Finding::error("c", "bad", "fix");
        assert_eq!(exit_code(std::slice::from_ref(&ok)), 0);
        assert_eq!(exit_code(&[ok.clone(), warn.clone()]), 1);
        assert_eq!(exit_code(&[ok, warn, error]), 2);
    }
}
