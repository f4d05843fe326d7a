//! `perch pub|sub|req|bench`, the operator's NATS client commands, as a
//! shell runs them: against perch and against nats-server (the same
//! commands must work on either).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::{Raw, Server};

fn perch_cli(server: &Server, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_perch"));
    command.args(args).arg("--server").arg(server.url());
    command
}

/// `perch sub` started and subscribed (it says so on stderr once its
/// subscription is in place).
fn start_sub(server: &Server, args: &[&str]) -> std::process::Child {
    let mut child = perch_cli(server, &[&["sub"], args].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run perch sub");
    let mut ready = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("sub's ready line");
    assert!(ready.contains("subscribed to"), "{ready}");
    child
}

fn pub_sub_req(server: &Server) {
    let sub = start_sub(server, &["--count", "3", "--headers", "cli.>"]);
    let status = perch_cli(server, &["pub", "--count", "2", "cli.a", "hello"])
        .status()
        .expect("run perch pub");
    assert!(status.success());
    let status = perch_cli(
        server,
        &["pub", "-H", "Perch-Qos: 1", "cli.b", "two\nlines"],
    )
    .status()
    .expect("run perch pub -H");
    assert!(status.success());
    let output = sub.wait_with_output().expect("sub exits after 3");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "cli.a hello\ncli.a hello\ncli.b [NATS/1.0\\r\\nPerch-Qos: 1] two\\nlines\n"
    );

    // A responder on a raw connection; `perch req` prints its answer.
    let mut responder = Raw::connect(server);
    responder.send(b"CONNECT {\"verbose\":false}\r\nSUB svc.ping 1\r\nPING\r\n");
    assert_eq!(responder.read_line(), "PONG");
    let answering = std::thread::spawn(move || {
        let line = responder.read_line();
        let reply = line.split(' ').nth(3).expect("a reply subject").to_string();
        assert_eq!(responder.read_line(), "hi");
        responder.send(format!("PUB {reply} 4\r\npong\r\n").as_bytes());
        responder
    });
    let output = perch_cli(server, &["req", "svc.ping", "hi"])
        .output()
        .expect("run perch req");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "pong\n");
    drop(answering.join().expect("responder"));

    // Nobody listens: no responders (not a timeout), and a failing exit code.
    let output = perch_cli(server, &["req", "--timeout-ms", "10000", "svc.nobody", "x"])
        .output()
        .expect("run perch req");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no responders"),
        "{output:?}"
    );
}

#[test]
fn pub_sub_req_against_perch() {
    pub_sub_req(&Server::perch(&["--shards", "2"]));
}

#[test]
fn pub_sub_req_against_nats_server() {
    pub_sub_req(&Server::nats_server(""));
}

#[test]
fn bench_counts_every_message_at_every_subscriber() {
    let server = Server::perch(&["--shards", "2"]);
    let output = perch_cli(
        &server,
        &[
            "bench", "--msgs", "20000", "--size", "32", "--pubs", "2", "--subs", "2",
        ],
    )
    .output()
    .expect("run perch bench");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with("pub: 20000 msgs of 32 B from 2 publisher(s)"),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(": 20000 of 20000 msgs"))
            .count(),
        2,
        "{text}"
    );
    // A server that is not there: a clear error, not a hang.
    let status = Command::new(env!("CARGO_BIN_EXE_perch"))
        .args(["pub", "--server", "127.0.0.1:1", "x", "y"])
        .output()
        .expect("run perch pub");
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("cannot reach"));
}
