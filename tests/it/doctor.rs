//! `perch doctor` as an operator runs it, on this machine and under
//! conditions made for the test: a seccomp filter that refuses io_uring, a low
//! open-file limit, a port already taken, a store on tmpfs.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use crate::support::{free_port, TempDir};

fn doctor(args: &[&str], setup: Option<fn() -> std::io::Result<()>>) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_perch"));
    command.arg("doctor").args(args);
    if let Some(setup) = setup {
        // SAFETY: the closure only makes system calls (prctl, setrlimit) that
        // are safe between fork and exec.
        unsafe {
            command.pre_exec(setup);
        }
    }
    let Output { status, stdout, .. } = command.output().expect("run perch doctor");
    let text = String::from_utf8_lossy(&stdout).into_owned();
    (status.code().expect("exited, not killed"), text)
}

/// The finding of `check`: its line and its fix line, if any.
fn finding(text: &str, check: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check)))
        .unwrap_or_else(|| panic!("no {check} finding in:\n{text}"));
    let mut found = lines[at].to_string();
    if let Some(fix) = lines.get(at + 1).filter(|l| l.starts_with("      fix: ")) {
        found.push('\n');
        found.push_str(fix);
    }
    found
}

/// Whether io_uring works for this process, asked of the kernel directly.
fn io_uring_works() -> bool {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup writes at most sizeof(io_uring_params) (120 B).
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: the ring's fd is ours.
        unsafe { libc::close(fd as i32) };
        true
    } else {
        false
    }
}

#[test]
fn a_healthy_setup_reports_every_check() {
    let dir = TempDir::new("doctor");
    let port = free_port().to_string();
    let store = dir.path.to_str().expect("utf-8");
    let (code, text) = doctor(
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store-dir",
            store,
            "--max-connections",
            "1000",
            "--shards",
            "1",
        ],
        None,
    );
    for check in [
        "io_uring",
        "open files",
        "locked memory",
        "cpus",
        "store fs",
        "store space",
        "store fsync",
        "clock",
        "nats port",
    ] {
        finding(&text, check);
    }
    let io = finding(&text, "io_uring");
    assert_eq!(
        io.starts_with("ok"),
        io_uring_works(),
        "doctor and the kernel disagree:\n{text}"
    );
    assert!(
        finding(&text, "store fsync").contains("fdatasync p50"),
        "{text}"
    );
    assert!(text.contains("perch doctor: "), "{text}");
    // Warnings only where this machine earns them; never an error here.
    assert!(code == 0 || code == 1, "exit {code}:\n{text}");
    assert_eq!(
        code == 1,
        text.lines().any(|l| l.starts_with("warn")),
        "{text}"
    );
    // The probe file is gone.
    let left: Vec<_> = std::fs::read_dir(&dir.path)
        .expect("read store dir")
        .collect();
    assert!(left.is_empty(), "doctor left {left:?}");
}

/// A seccomp filter that makes io_uring_setup fail with EPERM, as Docker's
/// default profile does.
fn refuse_io_uring() -> std::io::Result<()> {
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let filter = [
        // A = seccomp_data.nr
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls with a program that outlives them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn io_uring_refused_by_seccomp_is_explained() {
    let port = format!("127.0.0.1:{}", free_port());
    let (code, text) = doctor(&["--listen", &port], Some(refuse_io_uring));
    let io = finding(&text, "io_uring");
    assert!(io.starts_with("warn"), "{text}");
    assert!(io.contains("seccomp") && io.contains("EPERM"), "{text}");
    assert!(
        io.contains("falls back to epoll") && io.contains("fix:"),
        "{text}"
    );
    assert!(code >= 1, "{text}");
    // Asked for io_uring outright, the same machine is an error.
    let (code, text) = doctor(&["--listen", &port, "--io", "uring"], Some(refuse_io_uring));
    assert!(finding(&text, "io_uring").starts_with("error"), "{text}");
    assert_eq!(code, 2, "{text}");
}

fn few_files() -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    // SAFETY: setrlimit with a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_low_open_file_limit_gets_the_number_to_set() {
    let port = format!("127.0.0.1:{}", free_port());
    let (code, text) = doctor(
        &["--listen", &port, "--max-connections", "5000"],
        Some(few_files),
    );
    let files = finding(&text, "open files");
    assert!(files.starts_with("warn") && files.contains("256"), "{text}");
    assert!(files.contains("LimitNOFILE=5256"), "{text}");
    assert!(code >= 1);
}

#[test]
fn a_taken_port_and_a_tmpfs_store_are_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    // /dev/shm is a tmpfs on Debian (and on CI); the store there is in RAM.
    let store = TempDir {
        path: std::path::Path::new("/dev/shm").join(format!("perch-doctor-{}", std::process::id())),
    };
    std::fs::create_dir_all(&store.path).expect("a directory in /dev/shm");
    let path = store.path.to_string_lossy().into_owned();
    let (code, text) = doctor(&["--listen", &addr, "--store-dir", &path], None);
    let port = finding(&text, "nats port");
    assert!(
        port.starts_with("error") && port.contains("in use"),
        "{text}"
    );
    let fs = finding(&text, "store fs");
    assert!(fs.starts_with("warn") && fs.contains("tmpfs"), "{text}");
    assert_eq!(code, 2, "{text}");
    drop(taken);
}
