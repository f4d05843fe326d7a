//! The monitoring HTTP server (`--http`): nats-server's `/varz`, `/connz`,
//! `/subsz`, `/jsz`, `/healthz`, and Prometheus `/metrics`.
//!
//! It runs on a thread of its own with its own small tokio current-thread
//! runtime, off every shard, and parses HTTP with hyper (HTTP/1 only). It
//! reads what the shards publish as atomics ([`ShardStats`], connection
//! counts, mailbox capacity) and the JetStream catalog without asking them.
//! What only a shard knows (its connections and their subscriptions, its
//! device sessions) it asks for over the shard's control mailbox
//! ([`Control::Monitor`]) with a oneshot reply and a deadline: a busy or
//! stuck shard delays (or fails) the HTTP answer, and nothing the HTTP side
//! does can make a shard wait. The shard answers from its control loop with a
//! synchronous snapshot; the request costs it one pass over its connections.
//!
//! Deliberately does not: serve TLS, authenticate (bind it to loopback or a
//! management network, as with nats-server), or keep closed connections.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::mailbox::{Control, MAILBOX_BATCHES_MAX};
use super::shard::{MonitorRequest, ShardReport, Shared};
use crate::jetstream::api::Timestamp;
use crate::monitor::endpoints::{self, Health, JsApiStats, JsConfig, JsStats, Jsz, Varz};
use crate::monitor::histogram::FSYNC;
use crate::monitor::prometheus::{self, Exposition, Kind};
use crate::monitor::query::{ConnzOptions, HealthzOptions, Query, QueryError, SubszOptions};

/// How long a request waits for every shard's answer before it gives up
/// (503 for the JSON endpoints; `/metrics` marks the shard not responding).
const SHARD_REPLY_MS_MAX: u64 = 2_000;
/// Simultaneous HTTP connections; more wait in the listen backlog.
const HTTP_CONNECTIONS_MAX: usize = 64;
/// A client has this long to send a request's headers.
const HEADER_READ_MS_MAX: u64 = 10_000;

/// The monitoring server's state: the shards' shared state, and request counts
/// per path (`/varz`'s `http_req_stats`, only touched by this thread).
struct Monitor {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    requests: Mutex<BTreeMap<&'static str, u64>>,
}

/// Starts the monitoring thread on an already-bound listener (bound before
/// the shards start, so a bad address fails the start).
pub(crate) fn spawn(listener: std::net::TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    let http_addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let monitor = Arc::new(Monitor {
        shared,
        http_addr,
        requests: Mutex::new(BTreeMap::new()),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("perch-http".into())
        .spawn(move || runtime.block_on(serve(listener, monitor)))?;
    Ok(())
}

async fn serve(listener: std::net::TcpListener, monitor: Arc<Monitor>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("monitoring: cannot listen: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("monitoring: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let monitor = Arc::clone(&monitor);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let monitor = Arc::clone(&monitor);
                async move { Ok::<_, Infallible>(monitor.handle(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HEADER_READ_MS_MAX))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("monitoring: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse {
    respond(
        status,
        "text/plain; charset=utf-8",
        body.into().into_bytes(),
    )
}

/// nats-server writes its monitoring JSON indented.
fn json(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {e}"),
        ),
    }
}

fn bad_request(error: QueryError) -> HttpResponse {
    text(StatusCode::BAD_REQUEST, error.0)
}

/// The paths served, as `http_req_stats` names them.
const PATHS: [&str; 11] = [
    "/",
    "/varz",
    "/connz",
    "/subsz",
    "/jsz",
    "/healthz",
    "/metrics",
    "/subscriptionsz",
    "/routez",
    "/gatewayz",
    "/leafz",
];

impl Monitor {
    async fn handle(&self, request: Request<Incoming>) -> HttpResponse {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        }
        let uri = request.uri();
        let path = uri.path().trim_end_matches('/');
        let path = if path.is_empty() { "/" } else { path };
        let Some(&path) = PATHS.iter().find(|&&p| p == path) else {
            return text(StatusCode::NOT_FOUND, "404 page not found");
        };
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry(path).or_insert(0) += 1;
        }
        let query = match Query::parse(uri.query()) {
            Ok(query) => query,
            Err(e) => return bad_request(e),
        };
        let outcome = match path {
            "/" => Ok(text(
                StatusCode::OK,
                "perch monitoring: /varz /connz /subsz /jsz /healthz /metrics /routez /gatewayz /leafz\n",
            )),
            "/varz" => Ok(json(StatusCode::OK, &self.varz())),
            "/connz" => self.connz(&query).await,
            "/subsz" | "/subscriptionsz" => self.subsz(&query).await,
            "/jsz" => Ok(json(StatusCode::OK, &self.jsz())),
            "/healthz" => self.healthz(&query).await,
            "/metrics" => Ok(self.metrics().await),
            // perch has no routes, gateways or leaf nodes: nats-server's
            // answers for a server without them, so exporters asked to
            // scrape these find what they expect.
            "/routez" => Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "server_id": self.shared.server_id, "now": now(),
                    "num_routes": 0, "routes": [],
                }),
            )),
            "/gatewayz" => Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "server_id": self.shared.server_id, "now": now(),
                    "outbound_gateways": {}, "inbound_gateways": {},
                }),
            )),
            "/leafz" => Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "server_id": self.shared.server_id, "now": now(),
                    "leafnodes": 0, "leafs": null,
                }),
            )),
            _ => unreachable!("every path in PATHS is handled"),
        };
        outcome.unwrap_or_else(bad_request)
    }

    /// Asks every shard; `None` for a shard that did not answer in time. The
    /// requests go out together, so the wait is the slowest shard's, bounded
    /// by one deadline.
    async fn ask_shards(&self, connections: bool, subscriptions: bool) -> Vec<Option<ShardReport>> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(SHARD_REPLY_MS_MAX);
        let pending: Vec<_> = self
            .shared
            .peers
            .control
            .iter()
            .map(|control| {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let request = MonitorRequest {
                    connections,
                    subscriptions,
                    reply,
                };
                control
                    .send(Control::Monitor(request))
                    .ok()
                    .map(|()| answer)
            })
            .collect();
        let mut reports = Vec::with_capacity(pending.len());
        for answer in pending {
            let report = match answer {
                Some(answer) => tokio::time::timeout_at(deadline, answer)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            reports.push(report);
        }
        reports
    }

    /// Every shard's report, or the 503 naming the first that did not answer.
    async fn all_shards(
        &self,
        connections: bool,
        subscriptions: bool,
    ) -> Result<Vec<ShardReport>, HttpResponse> {
        let reports = self.ask_shards(connections, subscriptions).await;
        let mut all = Vec::with_capacity(reports.len());
        for (shard, report) in reports.into_iter().enumerate() {
            match report {
                Some(report) => all.push(report),
                None => {
                    return Err(text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("shard {shard} did not answer within {SHARD_REPLY_MS_MAX} ms"),
                    ))
                }
            }
        }
        Ok(all)
    }

    fn server_name(&self) -> String {
        let shared = &self.shared;
        shared
            .config
            .server_name
            .clone()
            .unwrap_or_else(|| shared.server_id.clone())
    }

    fn total<F: Fn(&super::shard::ShardStats) -> u64>(&self, field: F) -> u64 {
        self.shared.stats.iter().map(field).sum()
    }

    fn varz(&self) -> Varz {
        let shared = &self.shared;
        let config = &shared.config;
        let now = now();
        let process = ProcessStats::read();
        let uptime_s = uptime_seconds(shared.started, now);
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Varz {
            server_id: shared.server_id.clone(),
            server_name: self.server_name(),
            version: crate::nats::encode::PROTOCOL_VERSION.to_string(),
            proto: 1,
            go: crate::nats::encode::GO_FIELD.to_string(),
            host: config.listen.ip().to_string(),
            port: config.listen.port(),
            max_connections: config.max_connections,
            ping_interval: config.ping_interval_ms.saturating_mul(1_000_000),
            ping_max: config.ping_max_outstanding,
            http_host: self.http_addr.ip().to_string(),
            http_port: self.http_addr.port(),
            http_base_path: String::new(),
            https_port: 0,
            auth_timeout: config.connect_timeout_ms as f64 / 1000.0,
            auth_required: shared.auth_required.load(Ordering::Relaxed),
            max_control_line: config.max_control_line,
            max_payload: config.max_payload,
            max_pending: config.max_pending,
            cluster: endpoints::Empty {},
            gateway: endpoints::Empty {},
            leaf: endpoints::Empty {},
            mqtt: endpoints::Empty {},
            websocket: endpoints::Empty {},
            jetstream: match self.jetstream() {
                Some(js) => endpoints::VarzJetStream {
                    config: Some(js.config),
                    stats: Some(js.stats),
                },
                None => endpoints::VarzJetStream::default(),
            },
            start: shared.started,
            now,
            uptime: endpoints::go_uptime(Duration::from_secs_f64(uptime_s)),
            mem: process.resident_bytes,
            cores: super::affinity::allowed_cpus().len().max(1),
            cpu: if uptime_s > 0.0 {
                (process.cpu_seconds / uptime_s * 100.0 * 100.0).round() / 100.0
            } else {
                0.0
            },
            connections: shared.connections_total.load(Ordering::Relaxed),
            total_connections: shared.connections_accepted(),
            routes: 0,
            remotes: 0,
            leafnodes: 0,
            in_msgs: self.total(|s| load(&s.msgs_in)),
            out_msgs: self.total(|s| load(&s.msgs_out)),
            in_bytes: self.total(|s| load(&s.bytes_in)),
            out_bytes: self.total(|s| load(&s.bytes_out)),
            slow_consumers: self.total(|s| load(&s.slow_consumers)),
            subscriptions: self.total(|s| load(&s.subscriptions)),
            http_req_stats: self
                .requests
                .lock()
                .map(|r| r.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default(),
            config_load_time: shared.started,
        }
    }

    async fn connz(&self, query: &Query) -> Result<HttpResponse, QueryError> {
        let options = ConnzOptions::parse(query)?;
        let subscriptions = options.subs != crate::monitor::query::SubsDetail::None;
        let reports = match self.all_shards(true, subscriptions).await {
            Ok(reports) => reports,
            Err(response) => return Ok(response),
        };
        let conns = reports.into_iter().flat_map(|r| r.connections).collect();
        let connz = endpoints::connz(&self.shared.server_id, now(), conns, &options);
        Ok(json(StatusCode::OK, &connz))
    }

    async fn subsz(&self, query: &Query) -> Result<HttpResponse, QueryError> {
        let options = SubszOptions::parse(query)?;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (conns, subscriptions) = if options.subs {
            let reports = match self.all_shards(true, true).await {
                Ok(reports) => reports,
                Err(response) => return Ok(response),
            };
            let conns: Vec<_> = reports.into_iter().flat_map(|r| r.connections).collect();
            // Counted from the same snapshot as the list, so they agree.
            let count = conns.iter().map(|c| u64::from(c.subscriptions)).sum();
            (conns, count)
        } else {
            (Vec::new(), self.total(|s| load(&s.subscriptions)))
        };
        let inserted = self.total(|s| load(&s.subscriptions_inserted));
        let subsz = endpoints::subsz(
            &self.shared.server_id,
            now(),
            subscriptions,
            inserted,
            &conns,
            &options,
        );
        Ok(json(StatusCode::OK, &subsz))
    }

    /// nats-server's `/healthz`: ok when the server (here: every shard
    /// answers its control mailbox in time) and JetStream (every shard's
    /// streams recovered) are up. `js-enabled-only` checks JetStream only;
    /// `js-server-only` skips per-stream checks, which perch does not make
    /// anyway (a failed stream stops the broker).
    async fn healthz(&self, query: &Query) -> Result<HttpResponse, QueryError> {
        let options = HealthzOptions::parse(query)?;
        let shared = &self.shared;
        let unavailable = |error: String| {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &Health {
                    status: "unavailable",
                    error: Some(error),
                },
            )
        };
        if shared.js.is_some() {
            let ready = shared.js_ready.load(Ordering::Acquire);
            if ready < shared.shard_count {
                return Ok(unavailable(format!(
                    "JetStream is recovering: {ready} of {} shards ready",
                    shared.shard_count
                )));
            }
        }
        if !options.js_enabled_only {
            let reports = self.ask_shards(false, false).await;
            if let Some(shard) = reports.iter().position(Option::is_none) {
                return Ok(unavailable(format!(
                    "shard {shard} did not answer within {SHARD_REPLY_MS_MAX} ms"
                )));
            }
        }
        Ok(json(
            StatusCode::OK,
            &Health {
                status: "ok",
                error: None,
            },
        ))
    }

    fn jsz(&self) -> Jsz {
        let (disabled, js) = match self.jetstream() {
            Some(js) => (false, js),
            None => (true, JetStreamView::default()),
        };
        Jsz {
            server_id: self.shared.server_id.clone(),
            now: now(),
            disabled,
            config: js.config,
            stats: js.stats,
            streams: js.streams.len() as u64,
            consumers: js.streams.iter().map(|s| s.consumers).sum(),
            messages: js.streams.iter().map(|s| s.messages).sum(),
            bytes: js.streams.iter().map(|s| s.bytes).sum(),
        }
    }

    /// JetStream's numbers from the catalog (each stream's owner refreshes its
    /// entry after every change). Only numbers and names are copied under the
    /// lock, which shards also take briefly after commits.
    fn jetstream(&self) -> Option<JetStreamView> {
        let js = self.shared.js.as_ref()?;
        let (streams, api) = match js.catalog.lock() {
            Ok(catalog) => (
                catalog
                    .streams
                    .iter()
                    .map(|(name, info)| StreamNumbers {
                        name: name.clone(),
                        messages: info.state.messages,
                        bytes: info.state.bytes,
                        consumers: info.state.consumer_count,
                    })
                    .collect::<Vec<_>>(),
                JsApiStats {
                    total: catalog.api_total,
                    errors: catalog.api_errors,
                },
            ),
            Err(_) => (Vec::new(), JsApiStats::default()),
        };
        let store_dir = js.root.path.display().to_string();
        Some(JetStreamView {
            config: JsConfig {
                max_memory: 0,
                max_storage: available_bytes(&js.root.path),
                store_dir,
            },
            stats: JsStats {
                memory: 0,
                storage: streams.iter().map(|s| s.bytes).sum(),
                reserved_memory: 0,
                reserved_storage: 0,
                accounts: 1,
                ha_assets: 0,
                api,
            },
            streams,
        })
    }

    async fn metrics(&self) -> HttpResponse {
        let shared = &self.shared;
        let reports = self.ask_shards(false, false).await;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        let shard_labels: Vec<String> = (0..shared.shard_count).map(|s| s.to_string()).collect();
        let per_shard: Vec<[(&str, &str); 1]> = shard_labels
            .iter()
            .map(|s| [("shard", s.as_str())])
            .collect();
        let mut out = Exposition::default();

        let version = crate::nats::encode::PROTOCOL_VERSION;
        let info_labels = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("protocol_version", version),
            ("server_id", shared.server_id.as_str()),
        ];
        out.family(
            "perch_info",
            "Always 1; the labels name the build and the server.",
            Kind::Gauge,
            [(&info_labels[..], 1.0)],
        );
        let started_s = shared.started.unix_seconds as f64 + f64::from(shared.started.nanos) / 1e9;
        out.single(
            "perch_start_time_seconds",
            "When the broker started, in seconds since the Unix epoch.",
            Kind::Gauge,
            started_s,
        );
        out.single(
            "perch_connections",
            "Open NATS client connections.",
            Kind::Gauge,
            shared.connections_total.load(Ordering::Relaxed) as f64,
        );
        out.single(
            "perch_connections_accepted_total",
            "NATS client connections accepted since start.",
            Kind::Counter,
            shared.connections_accepted() as f64,
        );
        out.single(
            "perch_subscriptions",
            "Client subscriptions.",
            Kind::Gauge,
            self.total(|s| s.subscriptions.load(Ordering::Relaxed)) as f64,
        );
        let shard_family =
            |out: &mut Exposition, name, help, kind, value: &dyn Fn(usize) -> f64| {
                out.family(
                    name,
                    help,
                    kind,
                    per_shard
                        .iter()
                        .enumerate()
                        .map(|(s, l)| (&l[..], value(s))),
                );
            };
        let stats = &shared.stats;
        for (name, help, field) in [
            (
                "perch_in_messages_total",
                "Messages published by clients, per shard.",
                (|s: &super::shard::ShardStats| &s.msgs_in) as fn(&_) -> &_,
            ),
            (
                "perch_out_messages_total",
                "Messages delivered to clients, per shard.",
                |s| &s.msgs_out,
            ),
            (
                "perch_in_bytes_total",
                "Header and payload bytes published by clients, per shard.",
                |s| &s.bytes_in,
            ),
            (
                "perch_out_bytes_total",
                "Header and payload bytes delivered to clients, per shard.",
                |s| &s.bytes_out,
            ),
            (
                "perch_slow_consumers_total",
                "Clients closed for exceeding max_pending, per shard.",
                |s| &s.slow_consumers,
            ),
        ] {
            shard_family(&mut out, name, help, Kind::Counter, &|s| {
                load(field(&stats[s]))
            });
        }
        out.single(
            "perch_connection_moves_total",
            "Client connections moved to the shard they have most round trips with.",
            Kind::Counter,
            shared.moves_total.load(Ordering::Relaxed) as f64,
        );
        out.single(
            "perch_connections_rate_limited_total",
            "Connections closed at accept for exceeding connection_rate_per_ip.",
            Kind::Counter,
            shared.connections_rate_limited.load(Ordering::Relaxed) as f64,
        );
        shard_family(
            &mut out,
            "perch_shard_connections",
            "Open NATS client connections per shard (placement balances these).",
            Kind::Gauge,
            &|s| shared.connections_per_shard[s].load(Ordering::Relaxed) as f64,
        );
        shard_family(
            &mut out,
            "perch_shard_mailbox_batches",
            "Message batches waiting in a shard's data mailbox; at capacity, publishers on other shards wait.",
            Kind::Gauge,
            &|s| (MAILBOX_BATCHES_MAX - shared.peers.data[s].capacity()) as f64,
        );
        out.single(
            "perch_shard_mailbox_capacity_batches",
            "Batches a shard's data mailbox holds before publishers wait.",
            Kind::Gauge,
            MAILBOX_BATCHES_MAX as f64,
        );
        shard_family(
            &mut out,
            "perch_shard_responding",
            "1 if the shard answered this scrape's question within the deadline, else 0.",
            Kind::Gauge,
            &|s| f64::from(u8::from(reports[s].is_some())),
        );

        out.histogram_us(
            "perch_store_fsync_duration_seconds",
            "Time of each fdatasync of the store's group commit.",
            &FSYNC.snapshot(),
        );
        let js = self.jetstream();
        out.single(
            "perch_jetstream_enabled",
            "1 if streams are enabled (a store directory is configured).",
            Kind::Gauge,
            f64::from(u8::from(js.is_some())),
        );
        let streams = js.as_ref().map(|js| js.streams.as_slice()).unwrap_or(&[]);
        let stream_labels: Vec<[(&str, &str); 1]> = streams
            .iter()
            .map(|s| [("stream", s.name.as_str())])
            .collect();
        for (name, help, value) in [
            (
                "perch_stream_messages",
                "Messages stored in a stream.",
                (|s: &StreamNumbers| s.messages) as fn(&StreamNumbers) -> u64,
            ),
            ("perch_stream_bytes", "Bytes stored in a stream.", |s| {
                s.bytes
            }),
            ("perch_stream_consumers", "Consumers of a stream.", |s| {
                s.consumers
            }),
        ] {
            out.family(
                name,
                help,
                Kind::Gauge,
                streams
                    .iter()
                    .zip(&stream_labels)
                    .map(|(s, l)| (&l[..], value(s) as f64)),
            );
        }
        let api = js.as_ref().map(|js| js.stats.api).unwrap_or_default();
        out.single(
            "perch_jetstream_api_requests_total",
            "JetStream API requests answered.",
            Kind::Counter,
            api.total as f64,
        );
        out.single(
            "perch_jetstream_api_errors_total",
            "JetStream API requests answered with an error.",
            Kind::Counter,
            api.errors as f64,
        );

        let devices: Vec<(usize, crate::lite::gateway::Stats)> = reports
            .iter()
            .enumerate()
            .filter_map(|(s, r)| r.as_ref().and_then(|r| r.devices).map(|d| (s, d.1)))
            .collect();
        let sessions: Vec<(usize, usize)> = reports
            .iter()
            .enumerate()
            .filter_map(|(s, r)| r.as_ref().and_then(|r| r.devices).map(|d| (s, d.0)))
            .collect();
        out.family(
            "perch_device_sessions",
            "Device sessions (compact device protocol) per shard.",
            Kind::Gauge,
            sessions.iter().map(|&(s, n)| (&per_shard[s][..], n as f64)),
        );
        type StatField = fn(&crate::lite::gateway::Stats) -> u64;
        let device_counters: [(&str, &str, StatField); 14] = [
            (
                "perch_device_malformed_frames_total",
                "Device frames that did not decode.",
                |s| s.malformed_frames,
            ),
            (
                "perch_device_unknown_session_frames_total",
                "Device frames for no known session.",
                |s| s.unknown_session_frames,
            ),
            (
                "perch_device_duplicate_publishes_total",
                "QoS 1 device publishes received again (already acknowledged).",
                |s| s.duplicate_publishes,
            ),
            (
                "perch_device_sleep_buffer_dropped_total",
                "Messages dropped from full sleeping-device buffers.",
                |s| s.sleep_buffer_dropped,
            ),
            (
                "perch_device_qos1_queue_full_total",
                "QoS 1 messages for devices refused because the device's queue was full.",
                |s| s.qos1_queue_full,
            ),
            (
                "perch_device_qos1_undeliverable_total",
                "QoS 1 messages for devices dropped after the last retry.",
                |s| s.qos1_undeliverable,
            ),
            (
                "perch_device_sessions_expired_total",
                "Device sessions expired.",
                |s| s.sessions_expired,
            ),
            (
                "perch_device_refused_total",
                "Device connections refused (sessions_max).",
                |s| s.refused,
            ),
            (
                "perch_device_errors_suppressed_total",
                "ERROR replies to devices not sent because the per-second budget was spent.",
                |s| s.errors_suppressed,
            ),
            (
                "perch_device_unverified_dropped_total",
                "Protected device frames dropped unanswered: unparsable, unknown client or a bad tag.",
                |s| s.unverified_dropped,
            ),
            (
                "perch_device_replays_dropped_total",
                "Protected device frames dropped as replays.",
                |s| s.replays_dropped,
            ),
            (
                "perch_device_plain_refused_total",
                "Plain device frames refused because the device must seal them with its key.",
                |s| s.plain_refused,
            ),
            (
                "perch_device_replies_too_large_total",
                "Replies to unverified device datagrams not sent because they were larger.",
                |s| s.replies_too_large,
            ),
            (
                "perch_device_not_permitted_total",
                "Device publishes and subscriptions refused by permissions.",
                |s| s.not_permitted,
            ),
        ];
        for (name, help, field) in device_counters {
            out.family(
                name,
                help,
                Kind::Counter,
                devices
                    .iter()
                    .map(|(s, stats)| (&per_shard[*s][..], field(stats) as f64)),
            );
        }

        let process = ProcessStats::read();
        out.single(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            Kind::Gauge,
            process.resident_bytes as f64,
        );
        out.single(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            Kind::Counter,
            process.cpu_seconds,
        );
        out.single(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            Kind::Gauge,
            started_s,
        );
        if let Some(fds) = process.open_fds {
            out.single(
                "process_open_fds",
                "Number of open file descriptors.",
                Kind::Gauge,
                fds as f64,
            );
        }
        respond(
            StatusCode::OK,
            prometheus::CONTENT_TYPE,
            out.finish().into_bytes(),
        )
    }
}

#[derive(Default)]
struct JetStreamView {
    config: JsConfig,
    stats: JsStats,
    streams: Vec<StreamNumbers>,
}

struct StreamNumbers {
    name: String,
    messages: u64,
    bytes: u64,
    consumers: u64,
}

fn now() -> Timestamp {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Timestamp::from_unix_nanos(ns)
}

fn uptime_seconds(started: Timestamp, now: Timestamp) -> f64 {
    match (started.unix_nanos(), now.unix_nanos()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => 0.0,
    }
}

/// Free space for an unprivileged writer on the store's filesystem (what
/// perch's streams may still grow into): `/jsz`'s `max_storage`.
/// The store directory appears with its first stream, so until then the
/// nearest existing ancestor's filesystem is the one asked.
fn available_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    for dir in path.ancestors() {
        let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return 0;
        };
        // SAFETY: all-zero is a valid statvfs; statvfs(3) fills it from a
        // NUL-terminated path.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } == 0 {
            return (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64);
        }
    }
    0
}

/// The process's own resource use, from /proc (Linux only, like perch).
struct ProcessStats {
    resident_bytes: u64,
    cpu_seconds: f64,
    open_fds: Option<usize>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        // SAFETY: sysconf has no preconditions.
        let page_bytes =
            u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // SAFETY: as above.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let resident_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        // Fields after the command name (which may contain spaces, hence the
        // last ')'): state is field 3, utime 14, stime 15.
        let cpu_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 1..];
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let utime: u64 = fields.get(11)?.parse().ok()?;
                let stime: u64 = fields.get(12)?.parse().ok()?;
                Some(utime + stime)
            })
            .unwrap_or(0);
        ProcessStats {
            resident_bytes: resident_pages * page_bytes,
            cpu_seconds: cpu_ticks as f64 / ticks_per_second,
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count),
        }
    }
}
