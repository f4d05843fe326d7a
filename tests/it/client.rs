//! perch driven by the official Rust client (async-nats) across the protocol
//! surface. perch runs with 2 shards and round-robin placement, so consecutive
//! connections land on different shards: most of these tests cross shards.

use std::time::Duration;

use futures::StreamExt;

use crate::support::Server;

/// Every await in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

async fn connect(server: &Server) -> async_nats::Client {
    tokio::time::timeout(WAIT, async_nats::connect(server.url()))
        .await
        .expect("connect timed out")
        .expect("connect")
}

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("timed out waiting for a message")
        .expect("subscription ended")
}

/// A round trip through the server on `client`'s connection: async-nats's
/// `flush` only empties the client's buffer, so after it the server may not have
/// seen a SUB yet. A message to its own inbox comes back only after every
/// earlier op on the connection was processed (and, by the SUB barrier, applied
/// on every shard).
async fn sync(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, "".into()).await.unwrap();
    client.flush().await.unwrap();
    next(&mut probe).await;
    probe.unsubscribe().await.unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn pub_sub_across_shards_with_wildcards() {
    let server = Server::perch(&[]);
    runtime().block_on(async {
        let subscriber = connect(&server).await; // shard 0
        let publisher = connect(&server).await; // shard 1
        let mut exact = subscriber.subscribe("sensors.1.t").await.unwrap();
        let mut star = subscriber.subscribe("sensors.*.t").await.unwrap();
        let mut tail = subscriber.subscribe("sensors.>").await.unwrap();
        sync(&subscriber).await;

        publisher
            .publish("sensors.1.t", "21.5".into())
            .await
            .unwrap();
        publisher.publish("sensors.2.h", "40".into()).await.unwrap();
        publisher
            .publish("sensors", "not matched by sensors.>".into())
            .await
            .unwrap();
        publisher.flush().await.unwrap();

        assert_eq!(next(&mut exact).await.payload, "21.5");
        assert_eq!(next(&mut star).await.payload, "21.5");
        assert_eq!(next(&mut tail).await.subject.as_str(), "sensors.1.t");
        assert_eq!(next(&mut tail).await.subject.as_str(), "sensors.2.h");
        // Nothing else arrives: a probe published last is the next message.
        publisher
            .publish("sensors.9.t", "probe".into())
            .await
            .unwrap();
        assert_eq!(next(&mut star).await.payload, "probe");
    });
}

#[test]
fn per_publisher_order_is_kept_across_shards() {
    let server = Server::perch(&[]);
    const COUNT: u32 = 50_000;
    runtime().block_on(async {
        let subscriber = connect(&server).await;
        let publisher = connect(&server).await;
        let mut sub = subscriber.subscribe("seq").await.unwrap();
        sync(&subscriber).await;
        let send = tokio::spawn(async move {
            for i in 0..COUNT {
                publisher
                    .publish("seq", i.to_string().into())
                    .await
                    .unwrap();
            }
            publisher.flush().await.unwrap();
        });
        for i in 0..COUNT {
            let msg = next(&mut sub).await;
            assert_eq!(msg.payload, i.to_string(), "message {i} out of order");
        }
        send.await.unwrap();
    });
}

#[test]
fn queue_group_delivers_each_message_to_exactly_one_member() {
    let server = Server::perch(&[]);
    const COUNT: usize = 3000;
    runtime().block_on(async {
        // Four members over two shards, plus a plain subscriber that sees all.
        let mut members = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let client = connect(&server).await;
            members.push(
                client
                    .queue_subscribe("work", "workers".into())
                    .await
                    .unwrap(),
            );
            sync(&client).await;
            clients.push(client);
        }
        let watcher = connect(&server).await;
        let mut all = watcher.subscribe("work").await.unwrap();
        sync(&watcher).await;
        let publisher = connect(&server).await;
        for i in 0..COUNT {
            publisher
                .publish("work", i.to_string().into())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        for _ in 0..COUNT {
            next(&mut all).await;
        }
        let mut seen = vec![0u8; COUNT];
        let mut per_member = Vec::new();
        for member in &mut members {
            let mut got = 0;
            while let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(300), member.next()).await
            {
                let i: usize = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
                seen[i] += 1;
                got += 1;
            }
            per_member.push(got);
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "every message exactly once: {per_member:?}"
        );
        assert!(
            per_member.iter().all(|&n| n > 0),
            "every member got some: {per_member:?}"
        );
    });
}

#[test]
fn request_reply_and_no_responders() {
    request_reply_against(Server::perch(&[]));
}

/// The same with busy-polling after activity (used by the epoll backend;
/// ignored with a warning on io_uring).
#[test]
fn request_reply_with_spinning_shards() {
    request_reply_against(Server::perch(&["--spin-us", "50"]));
}

fn request_reply_against(server: Server) {
    runtime().block_on(async {
        let responder = connect(&server).await;
        let requester = connect(&server).await;
        let mut service = responder.subscribe("svc.echo").await.unwrap();
        sync(&responder).await;
        let serve = tokio::spawn(async move {
            for _ in 0..3 {
                let msg = next(&mut service).await;
                let reply = msg.reply.expect("request has a reply subject");
                responder.publish(reply, msg.payload).await.unwrap();
            }
            responder.flush().await.unwrap();
        });
        for i in 0..3 {
            let answer = tokio::time::timeout(
                WAIT,
                requester.request("svc.echo", format!("ping {i}").into()),
            )
            .await
            .expect("request timed out")
            .expect("request");
            assert_eq!(answer.payload, format!("ping {i}"));
        }
        serve.await.unwrap();

        let err = tokio::time::timeout(WAIT, requester.request("svc.nobody", "?".into()))
            .await
            .expect("no-responders must answer at once")
            .expect_err("nobody is subscribed");
        assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    });
}

#[test]
fn headers_round_trip() {
    let server = Server::perch(&[]);
    runtime().block_on(async {
        let subscriber = connect(&server).await;
        let publisher = connect(&server).await;
        let mut sub = subscriber.subscribe("h").await.unwrap();
        sync(&subscriber).await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Device", "gw-7");
        headers.append("Tag", "a");
        headers.append("Tag", "b");
        publisher
            .publish_with_headers("h", headers, "body".into())
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        let msg = next(&mut sub).await;
        let got = msg.headers.expect("headers arrive");
        assert_eq!(got.get("Device").map(|v| v.as_str()), Some("gw-7"));
        let tags: Vec<_> = got.get_all("Tag").map(|v| v.as_str().to_string()).collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(msg.payload, "body");
    });
}

#[test]
fn unsubscribe_after_max_messages() {
    let server = Server::perch(&[]);
    runtime().block_on(async {
        let subscriber = connect(&server).await;
        let publisher = connect(&server).await;
        let mut sub = subscriber.subscribe("limited").await.unwrap();
        sub.unsubscribe_after(3).await.unwrap();
        sync(&subscriber).await;
        for i in 0..10 {
            publisher
                .publish("limited", i.to_string().into())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        let mut got = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout(WAIT, sub.next()).await {
            got.push(msg.payload);
        }
        assert_eq!(got, ["0", "1", "2"]);
    });
}

#[test]
fn slow_consumer_is_closed_without_stalling_others() {
    // 1 MiB of pending output allowed per client.
    let server = Server::perch(&["--max-pending", "1048576", "--max-payload", "8192"]);
    runtime().block_on(async {
        // The slow consumer speaks raw protocol and never reads.
        let mut slow = crate::support::Raw::connect(&server);
        slow.send(b"CONNECT {\"verbose\":false}\r\nSUB firehose 1\r\nPING\r\n");
        assert_eq!(slow.read_line(), "PONG");
        let healthy = connect(&server).await;
        let mut sub = healthy.subscribe("firehose").await.unwrap();
        sync(&healthy).await;
        let publisher = connect(&server).await;
        let payload = bytes::Bytes::from(vec![b'x'; 1024]);
        // 32 MiB in all: far beyond max_pending plus what loopback socket buffers
        // hold. The publisher stays at most WINDOW messages (256 KiB) ahead of the
        // healthy subscriber, which therefore never nears max_pending itself.
        const COUNT: usize = 32 * 1024;
        const WINDOW: usize = 256;
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = std::sync::Arc::clone(&received);
        let publish = tokio::spawn(async move {
            for i in 0..COUNT {
                while i >= seen.load(std::sync::atomic::Ordering::Relaxed) + WINDOW {
                    publisher.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                publisher
                    .publish("firehose", payload.clone())
                    .await
                    .unwrap();
            }
            publisher.flush().await.unwrap();
        });
        for i in 0..COUNT {
            next(&mut sub).await;
            received.store(i + 1, std::sync::atomic::Ordering::Relaxed);
        }
        publish.await.unwrap();
        // The slow consumer was closed: the server ends its stream.
        let (_, closed) = slow.read_until_closed(WAIT);
        assert!(closed, "slow consumer must be disconnected");
    });
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let server = Server::perch(&[]);
    runtime().block_on(async {
        let client = connect(&server).await;
        client.publish("x", "y".into()).await.unwrap();
        client.flush().await.unwrap();
    });
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
}
