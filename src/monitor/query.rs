//! The query strings of the monitoring endpoints, parsed into typed options
//! with nats-server's defaults and its error texts. A query string is peer
//! input: anything malformed is a [`QueryError`] (answered with 400), never a
//! panic, and nothing here allocates more than the string's own length.

use std::fmt;

/// nats-server's default and largest page of `/connz` and `/subsz`.
pub const PAGE_LIMIT_DEFAULT: usize = 1024;

/// A query value the endpoint cannot use; the text is the 400 response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError(pub String);

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QueryError {}

/// `key=value` pairs of a query string, percent-decoded (`+` is a space, as
/// in HTML forms and Go's `url.ParseQuery`). A key given twice keeps its
/// first value, as Go's `Query().Get` does.
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, QueryError> {
        let mut pairs = Vec::new();
        for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((percent_decode(key)?, percent_decode(value)?));
        }
        Ok(Query { pairs })
    }

    /// The value of `key`, "" when absent (Go's `Query().Get`).
    pub fn get(&self, key: &str) -> &str {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Go's `strconv.ParseBool`; absent or empty is false.
    pub fn bool(&self, key: &str) -> Result<bool, QueryError> {
        match self.get(key) {
            "" | "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
            other => Err(QueryError(format!(
                "Error decoding boolean for '{key}': strconv.ParseBool: parsing {other:?}: invalid syntax"
            ))),
        }
    }

    /// A decimal integer (Go's `strconv.Atoi`); absent or empty is 0.
    pub fn int(&self, key: &str) -> Result<i64, QueryError> {
        let value = self.get(key);
        if value.is_empty() {
            return Ok(0);
        }
        value.parse::<i64>().map_err(|_| {
            QueryError(format!(
                "Error decoding int for '{key}': strconv.Atoi: parsing {value:?}: invalid syntax"
            ))
        })
    }

    /// `offset` and `limit` as nats-server reads them: a negative offset is 0,
    /// a limit of 0 or less (or absent) is the default.
    pub fn page(&self) -> Result<Page, QueryError> {
        let offset = self.int("offset")?.max(0);
        let limit = match self.int("limit")? {
            l if l <= 0 => PAGE_LIMIT_DEFAULT as i64,
            l => l,
        };
        Ok(Page {
            offset: usize::try_from(offset).unwrap_or(usize::MAX),
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        })
    }
}

fn percent_decode(text: &str) -> Result<String, QueryError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| QueryError(format!("invalid URL escape in {text:?}")))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError(format!("query value {text:?} is not UTF-8")))
}

/// A page of a list: skip `offset`, take at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: usize,
    pub limit: usize,
}

/// `/connz?subs=`: none, the subjects, or each subscription in detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubsDetail {
    None,
    Subjects,
    Detail,
}

/// `/connz?sort=`: the orders perch can give. nats-server sorts cid and start
/// ascending, uptime from youngest, and the counters from the largest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnSort {
    Cid,
    Start,
    Subs,
    Pending,
    MsgsTo,
    MsgsFrom,
    BytesTo,
    BytesFrom,
    Uptime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnzOptions {
    pub sort: ConnSort,
    pub subs: SubsDetail,
    pub page: Page,
    /// `cid=`: only this connection.
    pub cid: Option<u64>,
    /// `auth=`: show each connection's `authorized_user`.
    pub auth: bool,
}

impl ConnzOptions {
    pub fn parse(query: &Query) -> Result<ConnzOptions, QueryError> {
        let sort = match query.get("sort") {
            "" | "cid" => ConnSort::Cid,
            "start" => ConnSort::Start,
            "subs" => ConnSort::Subs,
            "pending" => ConnSort::Pending,
            "msgs_to" => ConnSort::MsgsTo,
            "msgs_from" => ConnSort::MsgsFrom,
            "bytes_to" => ConnSort::BytesTo,
            "bytes_from" => ConnSort::BytesFrom,
            "uptime" => ConnSort::Uptime,
            // nats-server's text: these need closed connections, which
            // perch does not keep.
            by @ ("stop" | "reason") => {
                return Err(QueryError(format!(
                    "sort by {by} only valid on closed connections"
                )))
            }
            by @ ("last" | "idle" | "rtt") => {
                return Err(QueryError(format!(
                    "sort by {by} is not supported by perch: it keeps no per-connection \
                     activity time or round-trip time"
                )))
            }
            other => return Err(QueryError(format!("invalid sorting option: {other}"))),
        };
        let subs = match query.get("subs") {
            "detail" => SubsDetail::Detail,
            _ if query.bool("subs")? => SubsDetail::Subjects,
            _ => SubsDetail::None,
        };
        match query.get("state") {
            "" | "open" => {}
            "closed" | "all" | "any" => {
                return Err(QueryError(
                    "state=closed is not supported by perch: it keeps no closed connections".into(),
                ))
            }
            other => return Err(QueryError(format!("invalid connection state: {other}"))),
        }
        let cid = match query.int("cid")? {
            0 => None,
            cid => Some(u64::try_from(cid).map_err(|_| QueryError(format!("invalid cid: {cid}")))?),
        };
        Ok(ConnzOptions {
            sort,
            subs,
            page: query.page()?,
            cid,
            auth: query.bool("auth")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubszOptions {
    pub subs: bool,
    pub page: Page,
    /// `test=`: only subscriptions that a message on this subject would reach.
    pub test: Option<String>,
}

impl SubszOptions {
    pub fn parse(query: &Query) -> Result<SubszOptions, QueryError> {
        let test = match query.get("test") {
            "" => None,
            subject if crate::nats::subject::is_valid_publish_subject(subject.as_bytes()) => {
                Some(subject.to_owned())
            }
            subject => {
                return Err(QueryError(format!(
                    "invalid test subject, must be valid publish subject: {subject}"
                )))
            }
        };
        Ok(SubszOptions {
            subs: query.bool("subs")?,
            page: query.page()?,
            test,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthzOptions {
    /// Only check that JetStream, when configured, is running.
    pub js_enabled_only: bool,
    /// Check the server and JetStream, not each stream.
    pub js_server_only: bool,
}

impl HealthzOptions {
    pub fn parse(query: &Query) -> Result<HealthzOptions, QueryError> {
        Ok(HealthzOptions {
            js_enabled_only: query.bool("js-enabled-only")?,
            js_server_only: query.bool("js-server-only")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connz(raw: &str) -> Result<ConnzOptions, QueryError> {
        ConnzOptions::parse(&Query::parse(Some(raw))?)
    }

    #[test]
    fn connz_options_follow_nats_server() {
        let o = connz("").expect("empty query");
        assert_eq!(o.sort, ConnSort::Cid);
        assert_eq!(o.subs, SubsDetail::None);
        assert_eq!(
            o.page,
            Page {
                offset: 0,
                limit: PAGE_LIMIT_DEFAULT
            }
        );
        let o = connz("sort=bytes_to&subs=1&limit=2&offset=3").expect("valid");
        assert_eq!(o.sort, ConnSort::BytesTo);
        assert_eq!(o.subs, SubsDetail::Subjects);
        assert_eq!(
            o.page,
            Page {
                offset: 3,
                limit: 2
            }
        );
        assert_eq!(
            connz("subs=detail").expect("detail").subs,
            SubsDetail::Detail
        );
        assert_eq!(connz("subs=false").expect("false").subs, SubsDetail::None);
        // nats-server: negative offset is 0, limit ≤ 0 is the default.
        let o = connz("offset=-5&limit=0").expect("clamped");
        assert_eq!(
            o.page,
            Page {
                offset: 0,
                limit: PAGE_LIMIT_DEFAULT
            }
        );
        assert_eq!(connz("cid=7").expect("cid").cid, Some(7));
    }

    #[test]
    fn bad_values_are_errors_with_nats_servers_text() {
        let cases = [
            ("sort=bogus", "invalid sorting option: bogus"),
            ("sort=stop", "sort by stop only valid on closed connections"),
            (
                "limit=abc",
                "Error decoding int for 'limit': strconv.Atoi: parsing \"abc\": invalid syntax",
            ),
            (
                "subs=maybe",
                "Error decoding boolean for 'subs': strconv.ParseBool: parsing \"maybe\": invalid syntax",
            ),
            ("limit=%zz", "invalid URL escape in \"%zz\""),
            ("cid=-1", "invalid cid: -1"),
        ];
        for (raw, text) in cases {
            assert_eq!(connz(raw), Err(QueryError(text.into())), "{raw}");
        }
        assert!(connz("sort=idle").is_err_and(|e| e.0.contains("not supported by perch")));
        assert!(connz("limit=99999999999999999999").is_err());
    }

    #[test]
    fn subsz_and_healthz_options() {
        let q = Query::parse(Some("subs=true&test=foo.bar&limit=1")).expect("query");
        let o = SubszOptions::parse(&q).expect("valid");
        assert!(o.subs);
        assert_eq!(o.test.as_deref(), Some("foo.bar"));
        assert_eq!(o.page.limit, 1);
        let q = Query::parse(Some("test=a.*")).expect("query");
        assert_eq!(
            SubszOptions::parse(&q),
            Err(QueryError(
                "invalid test subject, must be valid publish subject: a.*".into()
            ))
        );
        let q = Query::parse(Some("js-enabled-only=true")).expect("query");
        let o = HealthzOptions::parse(&q).expect("valid");
        assert!(o.js_enabled_only && !o.js_server_only);
        let q = Query::parse(Some("js-server-only=abc")).expect("query");
        assert!(HealthzOptions::parse(&q).is_err());
    }

    #[test]
    fn percent_escapes_and_plus_decode() {
        let q = Query::parse(Some("test=a%2Eb+c&x")).expect("query");
        assert_eq!(q.get("test"), "a.b c");
        assert_eq!(q.get("x"), "");
        assert!(Query::parse(Some("a=%ff")).is_err(), "not UTF-8");
    }
}
