//! The JSON of nats-server's monitoring endpoints (`/varz`, `/connz`,
//! `/subsz`, `/jsz`, `/healthz`), field for field where perch has the
//! concept: same names, same JSON types, same defaults, so tooling written for
//! nats-server (prometheus-nats-exporter, nats-top, dashboards, probes) reads
//! perch unchanged. Fields perch has no concept for are omitted (Go's decoders
//! leave them at their zero value) or, where nats-server itself always sends
//! a neutral value (`routes: 0`, `cluster: {}`), sent with that value.
//!
//! Pure: the runtime gathers snapshots and the time; this module sorts, pages
//! and shapes them. Nothing here touches a socket, a shard or the clock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::query::{ConnSort, ConnzOptions, Page, SubsDetail, SubszOptions};
use crate::jetstream::api::Timestamp;
use crate::nats::session::{ClientDescription, SubscriptionView};

/// An empty JSON object (`"cluster": {}` and the like).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Empty {}

/// `/varz`. Omitted (perch has no such thing): `tls_timeout`,
/// `write_deadline`, `gomaxprocs`, `system_account`, `tags`, TLS and auth
/// fields, `config_digest`.
#[derive(Debug, Clone, Serialize)]
pub struct Varz {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub proto: u32,
    pub go: String,
    pub host: String,
    pub port: u16,
    pub max_connections: usize,
    /// Nanoseconds (Go's `time.Duration`).
    pub ping_interval: u64,
    pub ping_max: u32,
    pub http_host: String,
    pub http_port: u16,
    pub http_base_path: String,
    pub https_port: u16,
    /// Seconds (float in nats-server).
    pub auth_timeout: f64,
    /// Clients must authenticate (omitted when false, as nats-server does).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub auth_required: bool,
    pub max_control_line: usize,
    pub max_payload: usize,
    pub max_pending: usize,
    pub cluster: Empty,
    pub gateway: Empty,
    pub leaf: Empty,
    pub mqtt: Empty,
    pub websocket: Empty,
    pub jetstream: VarzJetStream,
    pub start: Timestamp,
    pub now: Timestamp,
    pub uptime: String,
    /// Resident set size in bytes.
    pub mem: u64,
    pub cores: usize,
    /// Percent of one CPU, averaged over the process's life (what `ps -o pcpu`,
    /// nats-server's source, reports).
    pub cpu: f64,
    pub connections: usize,
    pub total_connections: u64,
    pub routes: u32,
    pub remotes: u32,
    pub leafnodes: u32,
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub slow_consumers: u64,
    pub subscriptions: u64,
    pub http_req_stats: BTreeMap<String, u64>,
    pub config_load_time: Timestamp,
}

/// `/varz`'s `jetstream`: `{}` when JetStream is off, as nats-server sends.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VarzJetStream {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<JsConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<JsStats>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct JsConfig {
    pub max_memory: u64,
    pub max_storage: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub store_dir: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct JsApiStats {
    pub total: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct JsStats {
    pub memory: u64,
    pub storage: u64,
    pub reserved_memory: u64,
    pub reserved_storage: u64,
    pub accounts: u64,
    pub ha_assets: u64,
    pub api: JsApiStats,
}

/// `/jsz` (without `accounts`/`streams` details, which perch does not
/// serve: the counts are there, the per-account breakdown is not).
#[derive(Debug, Clone, Serialize)]
pub struct Jsz {
    pub server_id: String,
    pub now: Timestamp,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    pub config: JsConfig,
    #[serde(flatten)]
    pub stats: JsStats,
    pub streams: u64,
    pub consumers: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// One client connection as a shard saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnSnapshot {
    pub cid: u64,
    pub ip: String,
    pub port: u16,
    pub start: Timestamp,
    pub pending_bytes: u64,
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub subscriptions: u32,
    pub client: Option<ClientDescription>,
    /// The user it authenticated as (name or public nkey).
    pub authorized_user: Option<String>,
    /// Filled only when the request asked for subscriptions.
    pub subs: Vec<SubscriptionView>,
}

/// `/connz`.
#[derive(Debug, Clone, Serialize)]
pub struct Connz {
    pub server_id: String,
    pub now: Timestamp,
    pub num_connections: usize,
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub connections: Vec<ConnInfo>,
}

/// One entry of `/connz`. Omitted: `last_activity`, `idle` and `rtt` (perch
/// keeps no per-connection activity time and does not time PINGs), TLS,
/// auth and account fields.
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    pub cid: u64,
    pub kind: &'static str,
    #[serde(rename = "type")]
    pub kind_type: &'static str,
    pub ip: String,
    pub port: u16,
    pub start: Timestamp,
    pub uptime: String,
    pub pending_bytes: u64,
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub subscriptions: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Only with `auth=true`, as in nats-server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorized_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriptions_list: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriptions_list_detail: Option<Vec<SubDetail>>,
}

/// One subscription in `/connz?subs=detail` and `/subsz?subs=1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubDetail {
    /// Only in `/subsz` (nats-server's global account is `$G`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<&'static str>,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qgroup: Option<String>,
    pub sid: String,
    pub msgs: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max: u64,
    pub cid: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// nats-server's account for clients without accounts.
pub const GLOBAL_ACCOUNT: &str = "$G";

fn sub_detail(cid: u64, view: &SubscriptionView, account: Option<&'static str>) -> SubDetail {
    SubDetail {
        account,
        subject: view.subject.clone(),
        qgroup: view.queue.clone(),
        sid: view.sid.clone(),
        msgs: view.delivered,
        max: view.max_msgs,
        cid,
    }
}

/// Builds `/connz` from every shard's connections: filters, sorts and pages
/// as nats-server does (`total` counts before paging, `num_connections` after).
pub fn connz(
    server_id: &str,
    now: Timestamp,
    mut conns: Vec<ConnSnapshot>,
    options: &ConnzOptions,
) -> Connz {
    if let Some(cid) = options.cid {
        conns.retain(|c| c.cid == cid);
    }
    // Ties keep cid order, so a page boundary is stable between requests.
    conns.sort_by_key(|c| c.cid);
    match options.sort {
        ConnSort::Cid => {}
        // Starts are kept to the millisecond: within one, accept order (cid).
        ConnSort::Start => conns.sort_by_key(|c| (c.start, c.cid)),
        ConnSort::Uptime => conns.sort_by_key(|c| std::cmp::Reverse((c.start, c.cid))),
        ConnSort::Subs => conns.sort_by_key(|c| std::cmp::Reverse(c.subscriptions)),
        ConnSort::Pending => conns.sort_by_key(|c| std::cmp::Reverse(c.pending_bytes)),
        ConnSort::MsgsTo => conns.sort_by_key(|c| std::cmp::Reverse(c.out_msgs)),
        ConnSort::MsgsFrom => conns.sort_by_key(|c| std::cmp::Reverse(c.in_msgs)),
        ConnSort::BytesTo => conns.sort_by_key(|c| std::cmp::Reverse(c.out_bytes)),
        ConnSort::BytesFrom => conns.sort_by_key(|c| std::cmp::Reverse(c.in_bytes)),
    }
    let total = conns.len();
    let Page { offset, limit } = options.page;
    let connections: Vec<ConnInfo> = conns
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|c| conn_info(c, now, options.subs, options.auth))
        .collect();
    Connz {
        server_id: server_id.to_owned(),
        now,
        num_connections: connections.len(),
        total,
        offset,
        limit,
        connections,
    }
}

fn conn_info(c: ConnSnapshot, now: Timestamp, subs: SubsDetail, auth: bool) -> ConnInfo {
    let uptime = duration_between(c.start, now);
    let client = c.client.unwrap_or_default();
    let (list, detail) = match subs {
        SubsDetail::None => (None, None),
        SubsDetail::Subjects => (
            Some(c.subs.iter().map(|s| s.subject.clone()).collect()),
            None,
        ),
        SubsDetail::Detail => (
            None,
            Some(c.subs.iter().map(|s| sub_detail(c.cid, s, None)).collect()),
        ),
    };
    // nats-server omits empty lists (`omitempty`).
    let (list, detail) = (
        list.filter(|l: &Vec<String>| !l.is_empty()),
        detail.filter(|d: &Vec<SubDetail>| !d.is_empty()),
    );
    ConnInfo {
        cid: c.cid,
        kind: "Client",
        kind_type: "nats",
        ip: c.ip,
        port: c.port,
        start: c.start,
        uptime: go_uptime(uptime),
        pending_bytes: c.pending_bytes,
        in_msgs: c.in_msgs,
        out_msgs: c.out_msgs,
        in_bytes: c.in_bytes,
        out_bytes: c.out_bytes,
        subscriptions: c.subscriptions,
        name: client.name.filter(|s| !s.is_empty()),
        lang: client.lang.filter(|s| !s.is_empty()),
        version: client.version.filter(|s| !s.is_empty()),
        authorized_user: c.authorized_user.filter(|_| auth),
        subscriptions_list: list,
        subscriptions_list_detail: detail,
    }
}

/// `/subsz`. The sublist cache statistics (`num_cache`, `num_matches`,
/// `cache_hit_rate`, `max_fanout`, `avg_fanout`) are 0: perch's index keeps
/// no match statistics. `num_inserts` counts client SUBs since start and
/// `num_removes` those gone since.
#[derive(Debug, Clone, Serialize)]
pub struct Subsz {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<Timestamp>,
    pub num_subscriptions: u64,
    pub num_cache: u64,
    pub num_inserts: u64,
    pub num_removes: u64,
    pub num_matches: u64,
    pub cache_hit_rate: f64,
    pub max_fanout: u64,
    pub avg_fanout: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriptions_list: Option<Vec<SubDetail>>,
}

/// Builds `/subsz`. As in nats-server 2.9, `server_id`, `now` and the paging
/// fields appear only with `subs=1`; `num_subscriptions` counts every
/// subscription, `total` those that pass `test`.
pub fn subsz(
    server_id: &str,
    now: Timestamp,
    num_subscriptions: u64,
    num_inserts: u64,
    conns: &[ConnSnapshot],
    options: &SubszOptions,
) -> Subsz {
    let mut subsz = Subsz {
        server_id: None,
        now: None,
        num_subscriptions,
        num_cache: 0,
        num_inserts,
        num_removes: num_inserts.saturating_sub(num_subscriptions),
        num_matches: 0,
        cache_hit_rate: 0.0,
        max_fanout: 0,
        avg_fanout: 0.0,
        total: None,
        offset: None,
        limit: None,
        subscriptions_list: None,
    };
    if !options.subs {
        return subsz;
    }
    let mut details: Vec<SubDetail> = conns
        .iter()
        .flat_map(|c| {
            c.subs
                .iter()
                .map(|s| sub_detail(c.cid, s, Some(GLOBAL_ACCOUNT)))
        })
        .filter(|d| {
            options.test.as_deref().is_none_or(|subject| {
                crate::nats::subject::subject_matches(d.subject.as_bytes(), subject.as_bytes())
            })
        })
        .collect();
    details.sort_by(|a, b| (a.cid, &a.sid).cmp(&(b.cid, &b.sid)));
    let Page { offset, limit } = options.page;
    subsz.server_id = Some(server_id.to_owned());
    subsz.now = Some(now);
    subsz.total = Some(details.len());
    subsz.offset = Some(offset);
    subsz.limit = Some(limit);
    subsz.subscriptions_list = Some(details.into_iter().skip(offset).take(limit).collect());
    subsz
}

/// `/healthz`'s body: `{"status":"ok"}`, or `unavailable` with the reason.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn duration_between(from: Timestamp, to: Timestamp) -> Duration {
    match (from.unix_nanos(), to.unix_nanos()) {
        (Some(a), Some(b)) if b > a => Duration::from_nanos((b - a) as u64),
        _ => Duration::ZERO,
    }
}

/// nats-server's uptime text: whole seconds as `1y2d3h4m5s`, leading zero
/// units dropped (`0s`, `59s`, `1m0s`, `1d0h0m1s`).
pub fn go_uptime(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    let years = days / 365;
    let (s, m, h, d) = (seconds % 60, minutes % 60, hours % 24, days % 365);
    if years > 0 {
        format!("{years}y{d}d{h}h{m}m{s}s")
    } else if days > 0 {
        format!("{days}d{h}h{m}m{s}s")
    } else if hours > 0 {
        format!("{hours}h{m}m{s}s")
    } else if minutes > 0 {
        format!("{minutes}m{s}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::query::Query;

    fn snapshot(cid: u64, start_s: i64, in_msgs: u64, subs: &[&str]) -> ConnSnapshot {
        ConnSnapshot {
            cid,
            ip: "127.0.0.1".into(),
            port: 40_000 + cid as u16,
            start: Timestamp {
                unix_seconds: start_s,
                nanos: 0,
            },
            pending_bytes: 0,
            in_msgs,
            out_msgs: 0,
            in_bytes: in_msgs * 3,
            out_bytes: 0,
            subscriptions: subs.len() as u32,
            client: None,
            authorized_user: None,
            subs: subs
                .iter()
                .enumerate()
                .map(|(i, s)| SubscriptionView {
                    subject: s.to_string(),
                    queue: None,
                    sid: (i + 1).to_string(),
                    delivered: 0,
                    max_msgs: 0,
                })
                .collect(),
        }
    }

    fn cids(raw: &str, conns: &[ConnSnapshot]) -> (Vec<u64>, usize) {
        let options =
            ConnzOptions::parse(&Query::parse(Some(raw)).expect("query")).expect("options");
        let now = Timestamp {
            unix_seconds: 1_000,
            nanos: 0,
        };
        let connz = connz("S", now, conns.to_vec(), &options);
        assert_eq!(connz.num_connections, connz.connections.len());
        (
            connz.connections.iter().map(|c| c.cid).collect(),
            connz.total,
        )
    }

    #[test]
    fn connz_sorts_and_pages_like_nats_server() {
        let conns = [
            snapshot(3, 30, 0, &["a"]),
            snapshot(1, 10, 5, &["a", "b", "c"]),
            snapshot(2, 20, 9, &[]),
        ];
        let check = |raw: &str, want: &[u64]| {
            assert_eq!(cids(raw, &conns), (want.to_vec(), 3), "{raw}");
        };
        check("", &[1, 2, 3]);
        check("sort=start", &[1, 2, 3]);
        check("sort=uptime", &[3, 2, 1]);
        check("sort=subs", &[1, 3, 2]);
        check("sort=msgs_from", &[2, 1, 3]);
        check("sort=bytes_from&limit=1", &[2]);
        check("sort=bytes_from&limit=1&offset=1", &[1]);
        check("offset=5", &[]);
        assert_eq!(cids("cid=2", &conns), (vec![2], 1));
    }

    #[test]
    fn connz_lists_subscriptions_only_when_asked() {
        let conns = vec![snapshot(1, 10, 0, &["a", "b"]), snapshot(2, 10, 0, &[])];
        let now = Timestamp {
            unix_seconds: 75,
            nanos: 0,
        };
        let parse = |raw| ConnzOptions::parse(&Query::parse(Some(raw)).expect("q")).expect("o");
        let plain = serde_json::to_value(connz("S", now, conns.clone(), &parse(""))).expect("json");
        assert!(plain["connections"][0].get("subscriptions_list").is_none());
        assert_eq!(plain["connections"][0]["uptime"], "1m5s");
        let listed =
            serde_json::to_value(connz("S", now, conns.clone(), &parse("subs=1"))).expect("json");
        assert_eq!(
            listed["connections"][0]["subscriptions_list"],
            serde_json::json!(["a", "b"])
        );
        // Empty lists are omitted, as Go's omitempty does.
        assert!(listed["connections"][1].get("subscriptions_list").is_none());
        let detail =
            serde_json::to_value(connz("S", now, conns, &parse("subs=detail"))).expect("json");
        assert_eq!(
            detail["connections"][0]["subscriptions_list_detail"][1],
            serde_json::json!({"subject": "b", "sid": "2", "msgs": 0, "cid": 1})
        );
    }

    #[test]
    fn subsz_lists_pages_and_tests_subjects() {
        let conns = vec![
            snapshot(1, 10, 0, &["a.*", "b"]),
            snapshot(2, 10, 0, &["a.x"]),
        ];
        let now = Timestamp::GO_ZERO;
        let parse = |raw| SubszOptions::parse(&Query::parse(Some(raw)).expect("q")).expect("o");
        let bare = serde_json::to_value(subsz("S", now, 3, 5, &conns, &parse(""))).expect("json");
        assert!(bare.get("server_id").is_none() && bare.get("subscriptions_list").is_none());
        assert_eq!(bare["num_removes"], 2);
        let tested = subsz("S", now, 3, 3, &conns, &parse("subs=1&test=a.x"));
        assert_eq!(tested.total, Some(2));
        let list = tested.subscriptions_list.expect("listed");
        assert_eq!(
            list.iter()
                .map(|d| (d.cid, d.subject.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "a.*"), (2, "a.x")]
        );
        assert!(list.iter().all(|d| d.account == Some("$G")));
        let paged = subsz("S", now, 3, 3, &conns, &parse("subs=1&offset=1&limit=1"));
        assert_eq!(paged.subscriptions_list.map(|l| l.len()), Some(1));
    }

    #[test]
    fn uptime_reads_like_nats_servers() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m0s"),
            (3_661, "1h1m1s"),
            (86_401, "1d0h0m1s"),
            (365 * 86_400 + 61, "1y0d0h1m1s"),
        ];
        for (seconds, text) in cases {
            assert_eq!(go_uptime(Duration::from_secs(seconds)), text);
        }
    }
}
