//! The `std` helpers over real loopback sockets, against a one-session
//! responder thread that speaks perch-wire.
#![cfg(feature = "std")]

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::thread;
use std::time::Duration;

use perch_device::host::{run_until, Clock, TcpTransport, UdpTransport};
use perch_device::{Client, Config, Event, Target};
use perch_wire::{decode_from_device, tcp, Code, Frame, Qos};

/// The broker's answer to one device frame (CONNACK, REGACK, PUBACK).
fn answer(bytes: &[u8], next_topic: &mut u32) -> Option<Vec<u8>> {
    let frame = match decode_from_device(bytes).expect("valid frame") {
        Frame::Connect { .. } => Frame::Connack {
            session_present: false,
            code: Code::Ok,
            session_token: 9,
        },
        Frame::Register { id, .. } => {
            *next_topic += 1;
            Frame::Regack {
                req_id: id,
                topic: *next_topic,
                code: Code::Ok,
            }
        }
        Frame::Publish {
            qos: Qos::AtLeastOnce,
            msg_id,
            ..
        } => Frame::Puback {
            msg_id,
            code: Code::Ok,
        },
        _ => return None,
    };
    let mut out = vec![0u8; frame.encoded_len()];
    let len = frame.encode(&mut out).unwrap();
    out.truncate(len);
    Some(out)
}

fn publish_once_acked<T: perch_device::host::Transport>(transport: &mut T) {
    let clock = Clock::new();
    let mut client: Client<2, 2, 128> = Client::new(Config::new(b"host1").unwrap());
    client.connect(clock.now_ms());
    let connected = run_until(
        &mut client,
        transport,
        &clock,
        Duration::from_secs(5),
        |event| matches!(event, Event::Connected { .. }),
    )
    .unwrap();
    assert!(connected);
    let msg_id = client
        .publish(
            Target::Subject(b"host.t"),
            b"hi",
            Qos::AtLeastOnce,
            clock.now_ms(),
        )
        .unwrap();
    let acked = run_until(
        &mut client,
        transport,
        &clock,
        Duration::from_secs(5),
        |event| event == Event::PublishAcked { msg_id },
    )
    .unwrap();
    assert!(acked);
}

#[test]
fn udp_loopback() {
    let broker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = broker.local_addr().unwrap();
    let responder = thread::spawn(move || {
        broker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut next_topic = 0;
        let mut buf = [0u8; 1500];
        // CONNECT, REGISTER, PUBLISH: three answers, then done.
        for _ in 0..3 {
            let (len, from) = broker.recv_from(&mut buf).unwrap();
            if let Some(reply) = answer(&buf[..len], &mut next_topic) {
                broker.send_to(&reply, from).unwrap();
            }
        }
    });
    let mut transport = UdpTransport::connect(address).unwrap();
    publish_once_acked(&mut transport);
    responder.join().unwrap();
}

#[test]
fn tcp_loopback() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let responder = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut next_topic = 0;
        let mut pending = Vec::new();
        let mut answered = 0;
        while answered < 3 {
            let mut chunk = [0u8; 512];
            let len = stream.read(&mut chunk).unwrap();
            assert!(len > 0, "client closed early");
            pending.extend_from_slice(&chunk[..len]);
            while let Some(Ok((frame, consumed))) = tcp::split_frame(&pending) {
                if let Some(reply) = answer(frame, &mut next_topic) {
                    let mut prefix = [0u8; 3];
                    let prefix_len = tcp::encode_prefix(reply.len(), &mut prefix).unwrap();
                    stream.write_all(&prefix[..prefix_len]).unwrap();
                    stream.write_all(&reply).unwrap();
                }
                answered += 1;
                pending.drain(..consumed);
            }
        }
    });
    let mut transport = TcpTransport::connect(address).unwrap();
    publish_once_acked(&mut transport);
    responder.join().unwrap();
}
