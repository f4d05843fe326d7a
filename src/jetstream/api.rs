//! JetStream API wire types: the JSON requests clients send to `$JS.API.>`, the
//! JSON replies, the stream-publish ack, the pull-request body, ack bodies, the
//! `$JS.ACK.…` delivery reply subject and the pull status header blocks.
//!
//! Everything here was checked against Debian's nats-server 2.9.10 run with
//! `-js`: `tests/fixtures/jetstream/*.json` hold the captured exchanges and the
//! tests at the bottom decode every request and re-encode every reply from its
//! typed value back to the same JSON.
//!
//! Field order, `skip_serializing_if` rules and zero-value defaults follow what
//! the reference emits (Go `omitempty` semantics): a field the reference always
//! writes is always written here, even when zero. Durations are nanoseconds
//! (`*_ns` on the Rust side, the wire names are unchanged).
//!
//! This module deliberately does no I/O, owns no state and knows nothing about
//! the store: it turns bytes into values and values into bytes. Deciding what a
//! request *means* (validation beyond shape, limits, which error to send) is the
//! API layer's job; the few pieces of reference policy kept here are the
//! defaults the reference fills into a config (`with_server_defaults`) and the
//! exact error texts (`ApiError` constructors), because both are wire facts.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Every JetStream API request subject starts with this.
pub const API_PREFIX: &str = "$JS.API.";
/// Every delivery reply (ack) subject starts with this.
pub const ACK_PREFIX: &str = "$JS.ACK.";

/// The reference's defaults, applied by `with_server_defaults`.
pub const DUPLICATE_WINDOW_NS_DEFAULT: i64 = 120_000_000_000;
pub const ACK_WAIT_NS_DEFAULT: i64 = 30_000_000_000;
pub const MAX_ACK_PENDING_DEFAULT: i64 = 1000;
/// Pull consumers only; push consumers keep 0 (omitted).
pub const MAX_WAITING_DEFAULT: i64 = 512;
/// Ephemeral consumers (no durable name) are removed after this long without interest.
pub const INACTIVE_THRESHOLD_NS_DEFAULT: i64 = 5_000_000_000;
/// Page sizes the reference reports in `limit` for the names and list calls.
pub const NAMES_PAGE_LIMIT: i64 = 1024;
pub const LIST_PAGE_LIMIT: i64 = 256;
/// `limit` of a stream info reply that carries a `subjects` map.
pub const STREAM_INFO_SUBJECTS_PAGE_LIMIT: i64 = 100_000;

/// The status header block of a "no responders" reply. The reference without
/// `-js` has no `$JS.API` subscription, so a client that set `no_responders`
/// (and headers) in CONNECT gets exactly this with an empty payload; any other
/// client gets nothing and times out. There is no JSON body.
pub const NO_RESPONDERS_HEADER: &str = "NATS/1.0 503\r\n\r\n";

/// The `type` string of every API reply.
pub mod response_type {
    pub const ACCOUNT_INFO: &str = "io.nats.jetstream.api.v1.account_info_response";
    pub const STREAM_CREATE: &str = "io.nats.jetstream.api.v1.stream_create_response";
    pub const STREAM_UPDATE: &str = "io.nats.jetstream.api.v1.stream_update_response";
    pub const STREAM_INFO: &str = "io.nats.jetstream.api.v1.stream_info_response";
    pub const STREAM_NAMES: &str = "io.nats.jetstream.api.v1.stream_names_response";
    pub const STREAM_LIST: &str = "io.nats.jetstream.api.v1.stream_list_response";
    pub const STREAM_DELETE: &str = "io.nats.jetstream.api.v1.stream_delete_response";
    pub const STREAM_PURGE: &str = "io.nats.jetstream.api.v1.stream_purge_response";
    pub const STREAM_MSG_GET: &str = "io.nats.jetstream.api.v1.stream_msg_get_response";
    pub const STREAM_MSG_DELETE: &str = "io.nats.jetstream.api.v1.stream_msg_delete_response";
    pub const CONSUMER_CREATE: &str = "io.nats.jetstream.api.v1.consumer_create_response";
    pub const CONSUMER_INFO: &str = "io.nats.jetstream.api.v1.consumer_info_response";
    pub const CONSUMER_DELETE: &str = "io.nats.jetstream.api.v1.consumer_delete_response";
    pub const CONSUMER_NAMES: &str = "io.nats.jetstream.api.v1.consumer_names_response";
    pub const CONSUMER_LIST: &str = "io.nats.jetstream.api.v1.consumer_list_response";
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// The `error` object of a failed reply. Clients branch on `err_code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// An HTTP-like status: 400 the request is wrong, 404 the thing is missing,
    /// 500 the reference's catch-all for "refused" (e.g. config it rejects).
    pub code: u16,
    pub err_code: u16,
    pub description: String,
}

/// An error whose description is fixed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownError {
    pub code: u16,
    pub err_code: u16,
    pub description: &'static str,
}

impl KnownError {
    pub fn to_api_error(self) -> ApiError {
        ApiError {
            code: self.code,
            err_code: self.err_code,
            description: self.description.to_owned(),
        }
    }
}

impl From<KnownError> for ApiError {
    fn from(known: KnownError) -> ApiError {
        known.to_api_error()
    }
}

/// The errors observed from nats-server 2.9.10, with their exact text.
pub mod errors {
    use super::KnownError;

    pub(crate) const fn known(code: u16, err_code: u16, description: &'static str) -> KnownError {
        KnownError {
            code,
            err_code,
            description,
        }
    }

    pub const BAD_REQUEST: KnownError = known(400, 10003, "bad request");
    pub const CONSUMER_NOT_FOUND: KnownError = known(404, 10014, "consumer not found");
    /// `$JS.API.CONSUMER.DURABLE.CREATE.<s>.<c>` whose body names another durable.
    pub const CONSUMER_NAME_MISMATCH: KnownError = known(
        400,
        10017,
        "consumer name in subject does not match durable name in request",
    );
    /// Unparseable body, empty body, or an unknown enum value (e.g. retention "bogus").
    pub const INVALID_JSON: KnownError = known(400, 10025, "invalid JSON");
    /// Message get by seq past the end, or last_by_subj with no such subject.
    pub const NO_MESSAGE_FOUND: KnownError = known(404, 10037, "no message found");
    /// A publish larger than the stream's max_msg_size.
    pub const MESSAGE_SIZE_EXCEEDS_MAXIMUM: KnownError =
        known(400, 10054, "message size exceeds maximum allowed");
    pub const STREAM_NAME_MISMATCH: KnownError =
        known(400, 10056, "stream name in subject does not match request");
    pub const STREAM_NAME_IN_USE: KnownError = known(
        400,
        10058,
        "stream name already in use with a different configuration",
    );
    pub const STREAM_NOT_FOUND: KnownError = known(404, 10059, "stream not found");
    /// Nats-Expected-Stream names another stream.
    pub const EXPECTED_STREAM_MISMATCH: KnownError =
        known(400, 10060, "expected stream does not match");
    pub const SUBJECTS_OVERLAP: KnownError =
        known(400, 10065, "subjects overlap with an existing stream");
    pub const CONSUMER_START_SEQ_REQUIRED: KnownError = known(
        400,
        10094,
        "consumer delivery policy is deliver by start sequence, but optional start sequence is not set",
    );
    pub const STREAM_PURGE_NOT_PERMITTED: KnownError =
        known(500, 10110, "stream purge not permitted");

    /// err_codes whose description is a template (see the `ApiError` constructors).
    pub const CONSUMER_CREATE_FAILED_ERR_CODE: u16 = 10012;
    /// Message delete of a sequence already deleted ("sequence N not found").
    pub const SEQUENCE_NOT_FOUND_ERR_CODE: u16 = 10043;
    /// A stream the store could not create (description: the store's error).
    pub const STREAM_CREATE_FAILED_ERR_CODE: u16 = 10049;
    pub const STREAM_INVALID_CONFIG_ERR_CODE: u16 = 10052;
    pub const STREAM_MSG_DELETE_FAILED_ERR_CODE: u16 = 10057;
    pub const WRONG_LAST_MSG_ID_ERR_CODE: u16 = 10070;
    pub const WRONG_LAST_SEQUENCE_ERR_CODE: u16 = 10071;

    /// Texts observed inside the templated errors.
    pub const INVALID_STREAM_NAME_REASON: &str =
        "stream name is required and can not contain '.', '*', '>'";
    pub const NEGATIVE_DUPLICATE_WINDOW_REASON: &str = "duplicates window can not be negative";
    pub const ROLLUP_NEEDS_PURGE_REASON: &str = "roll-ups require the purge permission";
    /// (sic: "then") A duplicate window longer than a max_age that is set.
    pub const DUPLICATE_WINDOW_OVER_MAX_AGE_REASON: &str =
        "duplicates window can not be larger then max age";
    pub const ACK_POLICY_UPDATE_REASON: &str = "ack policy can not be updated";
    pub const MSG_DELETE_NOT_PERMITTED_REASON: &str = "message delete not permitted";
    /// What the reference says when deleting a sequence past the end of the stream.
    pub const MSG_DELETE_PAST_END_REASON: &str = "stream store EOF";
}

impl ApiError {
    /// 10052: the stream config was refused; `reason` is the whole description.
    pub fn stream_invalid_config(reason: &str) -> ApiError {
        ApiError {
            code: 500,
            err_code: errors::STREAM_INVALID_CONFIG_ERR_CODE,
            description: reason.to_owned(),
        }
    }

    /// 10057: a message delete failed; `reason` is the whole description.
    pub fn stream_msg_delete_failed(reason: &str) -> ApiError {
        ApiError {
            code: 500,
            err_code: errors::STREAM_MSG_DELETE_FAILED_ERR_CODE,
            description: reason.to_owned(),
        }
    }

    /// 10012: a consumer create/update was refused; `reason` is the whole description.
    pub fn consumer_create_failed(reason: &str) -> ApiError {
        ApiError {
            code: 500,
            err_code: errors::CONSUMER_CREATE_FAILED_ERR_CODE,
            description: reason.to_owned(),
        }
    }

    /// 10071 for Nats-Expected-Last-Sequence and -Last-Subject-Sequence: the text
    /// carries the sequence the stream (or subject) actually has.
    pub fn wrong_last_sequence(actual_seq: u64) -> ApiError {
        ApiError {
            code: 400,
            err_code: errors::WRONG_LAST_SEQUENCE_ERR_CODE,
            description: format!("wrong last sequence: {actual_seq}"),
        }
    }

    /// 10070 for Nats-Expected-Last-Msg-Id: the text carries the stream's actual
    /// last message id (empty when the last message had none).
    pub fn wrong_last_msg_id(actual_msg_id: &str) -> ApiError {
        ApiError {
            code: 400,
            err_code: errors::WRONG_LAST_MSG_ID_ERR_CODE,
            description: format!("wrong last msg ID: {actual_msg_id}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Time and bytes as the reference writes them
// ---------------------------------------------------------------------------

/// A UTC instant written the way Go writes `time.Time` in JSON (RFC 3339 with
/// up to nine fraction digits, trailing zeros dropped, `Z`). Go's zero time,
/// `0001-01-01T00:00:00Z`, means "never" (e.g. `first_ts` of an empty stream).
///
/// Offsets other than `Z` are accepted on input and converted to UTC, so a
/// client's `opt_start_time` with an offset is echoed back in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub unix_seconds: i64,
    /// Always below 1_000_000_000.
    pub nanos: u32,
}

const NANOS_PER_SECOND: i64 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

impl Timestamp {
    /// Go's zero `time.Time`.
    pub const GO_ZERO: Timestamp = Timestamp {
        unix_seconds: -62_135_596_800,
        nanos: 0,
    };

    pub fn from_unix_nanos(unix_nanos: i64) -> Timestamp {
        Timestamp {
            unix_seconds: unix_nanos.div_euclid(NANOS_PER_SECOND),
            nanos: unix_nanos.rem_euclid(NANOS_PER_SECOND) as u32,
        }
    }

    /// `None` outside i64 nanoseconds (about years 1677..2262), e.g. for `GO_ZERO`.
    pub fn unix_nanos(self) -> Option<i64> {
        self.unix_seconds
            .checked_mul(NANOS_PER_SECOND)?
            .checked_add(i64::from(self.nanos))
    }

    pub fn is_go_zero(self) -> bool {
        self == Timestamp::GO_ZERO
    }

    /// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`).
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let bytes = text.as_bytes();
        if bytes.len() < 20 {
            return None;
        }
        let digits = |range: std::ops::Range<usize>| -> Option<i64> {
            let slice = bytes.get(range)?;
            if slice.is_empty() || !slice.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(
                slice
                    .iter()
                    .fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0')),
            )
        };
        let separators_ok = bytes[4] == b'-'
            && bytes[7] == b'-'
            && (bytes[10] == b'T' || bytes[10] == b't')
            && bytes[13] == b':'
            && bytes[16] == b':';
        if !separators_ok {
            return None;
        }
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let mut position = 19;
        let mut nanos: i64 = 0;
        if bytes[position] == b'.' {
            let start = position + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
            let count = end - start;
            if count == 0 || count > 9 {
                return None;
            }
            nanos = digits(start..end)? * 10i64.pow(9 - count as u32);
            position = end;
        }
        let offset_seconds = match bytes.get(position)? {
            b'Z' | b'z' if position + 1 == bytes.len() => 0,
            sign @ (b'+' | b'-') if position + 6 == bytes.len() => {
                if bytes[position + 3] != b':' {
                    return None;
                }
                let hours = digits(position + 1..position + 3)?;
                let minutes = digits(position + 4..position + 6)?;
                let magnitude = hours * 3600 + minutes * 60;
                if *sign == b'+' {
                    magnitude
                } else {
                    -magnitude
                }
            }
            _ => return None,
        };
        let days = days_from_civil(year, month, day);
        let unix_seconds =
            days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset_seconds;
        Some(Timestamp {
            unix_seconds,
            nanos: nanos as u32,
        })
    }

    /// Writes Go's `RFC3339Nano` in UTC.
    pub fn to_rfc3339(self) -> String {
        let days = self.unix_seconds.div_euclid(SECONDS_PER_DAY);
        let second_of_day = self.unix_seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let mut text = format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60
        );
        if self.nanos != 0 {
            let fraction = format!("{:09}", self.nanos);
            text.push('.');
            text.push_str(fraction.trim_end_matches('0'));
        }
        text.push('Z');
        text
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// public-domain `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12; // March = 0
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Inverse of `days_from_civil`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {text:?}")))
    }
}

/// Go encodes `[]byte` as standard base64 with padding; message get uses it
/// for `hdrs` and `data`.
mod base64_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut output = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let triple = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for index in 0..4 {
                if index <= chunk.len() {
                    output.push(char::from(
                        ALPHABET[(triple >> (18 - 6 * index) & 63) as usize],
                    ));
                } else {
                    output.push('=');
                }
            }
        }
        output
    }

    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let bytes = text.as_bytes();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let mut output = Vec::with_capacity(bytes.len() / 4 * 3);
        for (chunk_index, chunk) in bytes.chunks(4).enumerate() {
            let last_chunk = chunk_index == bytes.len() / 4 - 1;
            let padding = chunk.iter().rev().take_while(|&&b| b == b'=').count();
            if padding > 2 || (padding > 0 && !last_chunk) {
                return None;
            }
            let mut triple: u32 = 0;
            for &byte in &chunk[..4 - padding] {
                let value = ALPHABET.iter().position(|&a| a == byte)? as u32;
                triple = triple << 6 | value;
            }
            triple <<= 6 * padding as u32;
            let decoded = [(triple >> 16) as u8, (triple >> 8) as u8, triple as u8];
            output.extend_from_slice(&decoded[..3 - padding]);
        }
        Some(output)
    }

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        decode(&text).ok_or_else(|| serde::de::Error::custom("invalid base64"))
    }
}

pub use base64_bytes::{decode as base64_decode, encode as base64_encode};

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero_i64(value: &i64) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

/// Decodes the body of a request whose body is optional (stream info, names,
/// list, purge; consumer names, list): empty or all-whitespace is the default.
/// Create and update need a body: use `decode_required_request`, for which an
/// empty body is an error (the reference answers 10025 "invalid JSON").
pub fn decode_request<T: DeserializeOwned + Default>(body: &[u8]) -> serde_json::Result<T> {
    // async-nats sends `null` for "no options" (stream info); the reference takes it.
    if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    decode_required_request(body)
}

/// Drops `"key": null` members at every depth: clients (async-nats) send null for
/// "not set", which the reference reads as the field's zero value.
fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(members) => {
            members.retain(|_, member| !member.is_null());
            members.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Decodes the body of a request that must have one (stream create/update,
/// message get/delete, consumer create).
pub fn decode_required_request<T: DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    let mut value: serde_json::Value = serde_json::from_slice(body)?;
    strip_nulls(&mut value);
    serde_json::from_value(value)
}

// ---------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------

/// Defaults are Go's zero values, which is what the reference assumes when a
/// field is missing. An unknown string is a 10025 "invalid JSON" error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionPolicy {
    #[default]
    Limits,
    Interest,
    Workqueue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    #[default]
    File,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscardPolicy {
    #[default]
    Old,
    New,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    #[default]
    All,
    Last,
    New,
    ByStartSequence,
    ByStartTime,
    LastPerSubject,
}

/// A consumer created without `ack_policy` gets `none` (observed), not explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    #[default]
    None,
    All,
    Explicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayPolicy {
    #[default]
    Instant,
    Original,
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

/// `$JS.API.STREAM.CREATE|UPDATE.<name>` request body, and `config` in replies.
///
/// Deserialising gives the request as sent (missing = Go zero value); the
/// reference then fills defaults, see `with_server_defaults`. Fields perch does
/// not implement (mirror, sources, placement, republish) are kept as raw JSON
/// so the API layer can refuse them instead of silently ignoring them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub retention: RetentionPolicy,
    /// -1 = unlimited (0 on input means the same).
    #[serde(default)]
    pub max_consumers: i64,
    #[serde(default)]
    pub max_msgs: i64,
    #[serde(default)]
    pub max_bytes: i64,
    /// 0 = messages never expire.
    #[serde(default, rename = "max_age")]
    pub max_age_ns: i64,
    #[serde(default)]
    pub max_msgs_per_subject: i64,
    /// The reference writes -1 and omits 0.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub max_msg_size: i64,
    #[serde(default)]
    pub discard: DiscardPolicy,
    #[serde(default)]
    pub storage: StorageType,
    #[serde(default)]
    pub num_replicas: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_ack: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template_owner: String,
    #[serde(
        default,
        rename = "duplicate_window",
        skip_serializing_if = "is_zero_i64"
    )]
    pub duplicate_window_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub republish: Option<serde_json::Value>,
    #[serde(default)]
    pub allow_direct: bool,
    #[serde(default)]
    pub mirror_direct: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub discard_new_per_subject: bool,
    #[serde(default)]
    pub sealed: bool,
    #[serde(default)]
    pub deny_delete: bool,
    #[serde(default)]
    pub deny_purge: bool,
    #[serde(default)]
    pub allow_rollup_hdrs: bool,
}

impl StreamConfig {
    /// The config as the reference stores and echoes it: no subjects means the
    /// stream's own name; 0 limits mean -1 (unlimited); no duplicate window means
    /// two minutes, or `max_age` when that is shorter; replicas at least 1.
    ///
    /// A negative `max_age` thus becomes a negative duplicate window, which the
    /// reference refuses with 10052 "duplicates window can not be negative".
    pub fn with_server_defaults(mut self) -> StreamConfig {
        if self.subjects.is_empty() {
            self.subjects.push(self.name.clone());
        }
        for limit in [
            &mut self.max_consumers,
            &mut self.max_msgs,
            &mut self.max_bytes,
            &mut self.max_msgs_per_subject,
            &mut self.max_msg_size,
        ] {
            if *limit == 0 {
                *limit = -1;
            }
        }
        if self.duplicate_window_ns == 0 {
            self.duplicate_window_ns =
                if self.max_age_ns != 0 && self.max_age_ns < DUPLICATE_WINDOW_NS_DEFAULT {
                    self.max_age_ns
                } else {
                    DUPLICATE_WINDOW_NS_DEFAULT
                };
        }
        if self.num_replicas == 0 {
            self.num_replicas = 1;
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    pub messages: u64,
    pub bytes: u64,
    /// After a purge this is last_seq + 1 with `first_ts` the Go zero time.
    pub first_seq: u64,
    pub first_ts: Timestamp,
    pub last_seq: u64,
    pub last_ts: Timestamp,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub num_subjects: u64,
    /// Only with a `subjects_filter` request; message count per subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<BTreeMap<String, u64>>,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub num_deleted: u64,
    /// Only with a `deleted_details` request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<u64>,
    pub consumer_count: u64,
}

impl StreamState {
    /// The state of a stream that never held a message.
    pub fn empty() -> StreamState {
        StreamState {
            messages: 0,
            bytes: 0,
            first_seq: 0,
            first_ts: Timestamp::GO_ZERO,
            last_seq: 0,
            last_ts: Timestamp::GO_ZERO,
            num_subjects: 0,
            subjects: None,
            num_deleted: 0,
            deleted: Vec::new(),
            consumer_count: 0,
        }
    }
}

/// A standalone server writes no `cluster`/`domain`; kept raw for completeness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub config: StreamConfig,
    pub created: Timestamp,
    pub state: StreamState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<serde_json::Value>,
}

/// `total`/`offset`/`limit` of list-like replies (also on stream info, where
/// they page the `subjects` map and are all 0 without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApiPaged {
    pub total: i64,
    pub offset: i64,
    pub limit: i64,
}

/// `$JS.API.STREAM.INFO.<name>` body (often empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamInfoRequest {
    #[serde(skip_serializing_if = "is_false")]
    pub deleted_details: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subjects_filter: String,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub offset: i64,
}

/// `$JS.API.STREAM.NAMES` and `$JS.API.STREAM.LIST` body: `subject` keeps only
/// streams whose subjects overlap it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamListRequest {
    pub offset: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subject: String,
}

/// `$JS.API.STREAM.PURGE.<name>` body (empty = everything). `seq` purges below
/// that sequence, `keep` keeps the newest N.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamPurgeRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub filter: String,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub seq: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub keep: u64,
}

/// `$JS.API.STREAM.MSG.GET.<name>` body: `seq`, or `last_by_subj`, or `seq` +
/// `next_by_subj` (first message at or after seq on that subject). `{}` is
/// 10003 bad request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MsgGetRequest {
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub seq: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_by_subj: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub next_by_subj: String,
}

/// `$JS.API.STREAM.MSG.DELETE.<name>` body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MsgDeleteRequest {
    pub seq: u64,
    /// true: just mark deleted; false (default): also overwrite the bytes.
    #[serde(skip_serializing_if = "is_false")]
    pub no_erase: bool,
}

/// A message returned by message get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub subject: String,
    pub seq: u64,
    /// The whole header block (`NATS/1.0\r\n…\r\n\r\n`), base64 on the wire.
    #[serde(default, with = "base64_bytes", skip_serializing_if = "Vec::is_empty")]
    pub hdrs: Vec<u8>,
    #[serde(default, with = "base64_bytes", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    pub time: Timestamp,
}

// ---------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------

/// A consumer's config, in requests and in replies.
///
/// Deserialising gives the request as sent; `with_server_defaults` fills what
/// the reference fills. Pull vs push: a consumer with a `deliver_subject` is
/// push, otherwise pull.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerConfig {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub durable_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub deliver_policy: DeliverPolicy,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub opt_start_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opt_start_time: Option<Timestamp>,
    pub ack_policy: AckPolicy,
    #[serde(rename = "ack_wait", skip_serializing_if = "is_zero_i64")]
    pub ack_wait_ns: i64,
    /// -1 = unlimited.
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub max_deliver: i64,
    /// Redelivery delays; when set they replace ack_wait per attempt.
    #[serde(rename = "backoff", skip_serializing_if = "Vec::is_empty")]
    pub backoff_ns: Vec<i64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub filter_subject: String,
    pub replay_policy: ReplayPolicy,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub rate_limit_bps: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sample_freq: String,
    /// Pull only: how many pull requests may wait at once (409 "Exceeded MaxWaiting").
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub max_waiting: i64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub max_ack_pending: i64,
    #[serde(rename = "idle_heartbeat", skip_serializing_if = "is_zero_i64")]
    pub idle_heartbeat_ns: i64,
    #[serde(skip_serializing_if = "is_false")]
    pub flow_control: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub headers_only: bool,
    /// Pull only: the largest `batch` a request may ask for.
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub max_batch: i64,
    #[serde(rename = "max_expires", skip_serializing_if = "is_zero_i64")]
    pub max_expires_ns: i64,
    /// Pull only: the largest `max_bytes` a request may ask for.
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub max_bytes: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub deliver_subject: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub deliver_group: String,
    #[serde(rename = "inactive_threshold", skip_serializing_if = "is_zero_i64")]
    pub inactive_threshold_ns: i64,
    /// The reference writes 0 here ("inherit from the stream") and keeps it.
    pub num_replicas: i64,
    #[serde(skip_serializing_if = "is_false")]
    pub mem_storage: bool,
}

impl ConsumerConfig {
    pub fn is_pull(&self) -> bool {
        self.deliver_subject.is_empty()
    }

    pub fn is_durable(&self) -> bool {
        !self.durable_name.is_empty()
    }

    /// The config as the reference stores and echoes it: max_deliver -1; with
    /// acks, ack_wait 30 s and max_ack_pending 1000; pull consumers max_waiting
    /// 512; ephemeral consumers inactive_threshold 5 s. (`name` is the API
    /// layer's business: `CONSUMER.CREATE.<stream>.<name>` writes it into the
    /// config, `CONSUMER.DURABLE.CREATE` does not.)
    pub fn with_server_defaults(mut self) -> ConsumerConfig {
        if self.max_deliver == 0 {
            self.max_deliver = -1;
        }
        if self.ack_policy != AckPolicy::None {
            if self.ack_wait_ns == 0 {
                self.ack_wait_ns = ACK_WAIT_NS_DEFAULT;
            }
            if self.max_ack_pending == 0 {
                self.max_ack_pending = MAX_ACK_PENDING_DEFAULT;
            }
        }
        if self.is_pull() && self.max_waiting == 0 {
            self.max_waiting = MAX_WAITING_DEFAULT;
        }
        if !self.is_durable() && self.inactive_threshold_ns == 0 {
            self.inactive_threshold_ns = INACTIVE_THRESHOLD_NS_DEFAULT;
        }
        self
    }
}

/// `$JS.API.CONSUMER.CREATE.<stream>[.<name>[.<filter>]]` and
/// `$JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>` body.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConsumerCreateRequest {
    pub stream_name: String,
    pub config: ConsumerConfig,
}

/// `$JS.API.CONSUMER.NAMES|LIST.<stream>` body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerListRequest {
    pub offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceInfo {
    pub consumer_seq: u64,
    pub stream_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerInfo {
    pub stream_name: String,
    /// For an ephemeral consumer, the generated name (8 characters in 2.9).
    pub name: String,
    pub created: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConsumerConfig>,
    pub delivered: SequenceInfo,
    pub ack_floor: SequenceInfo,
    pub num_ack_pending: u64,
    pub num_redelivered: u64,
    pub num_waiting: u64,
    pub num_pending: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub push_bound: bool,
}

/// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NextRequest {
    pub batch: i64,
    /// 0 = the request waits until the batch is full.
    #[serde(rename = "expires", skip_serializing_if = "is_zero_i64")]
    pub expires_ns: i64,
    /// Answer 404 "No Messages" at once instead of waiting.
    #[serde(skip_serializing_if = "is_false")]
    pub no_wait: bool,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub max_bytes: i64,
    #[serde(rename = "idle_heartbeat", skip_serializing_if = "is_zero_i64")]
    pub idle_heartbeat_ns: i64,
}

impl NextRequest {
    /// Accepts the three body forms clients use: empty (one message), a bare
    /// decimal batch size (`2`), or the JSON object. A batch below 1 is read as 1.
    pub fn parse(body: &[u8]) -> Result<NextRequest, ParseError> {
        let trimmed = body.trim_ascii();
        let mut request = if trimmed.is_empty() {
            NextRequest::default()
        } else if trimmed.iter().all(u8::is_ascii_digit) {
            let text = std::str::from_utf8(trimmed).map_err(|_| ParseError::NextRequest)?;
            NextRequest {
                batch: text.parse().map_err(|_| ParseError::NextRequest)?,
                ..NextRequest::default()
            }
        } else {
            serde_json::from_slice(trimmed).map_err(|_| ParseError::NextRequest)?
        };
        request.batch = request.batch.max(1);
        Ok(request)
    }
}

// ---------------------------------------------------------------------------
// Account
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountLimits {
    pub max_memory: i64,
    pub max_storage: i64,
    pub max_streams: i64,
    pub max_consumers: i64,
    pub max_ack_pending: i64,
    pub memory_max_stream_bytes: i64,
    pub storage_max_stream_bytes: i64,
    pub max_bytes_required: bool,
}

impl AccountLimits {
    pub const UNLIMITED: AccountLimits = AccountLimits {
        max_memory: -1,
        max_storage: -1,
        max_streams: -1,
        max_consumers: -1,
        max_ack_pending: -1,
        memory_max_stream_bytes: -1,
        storage_max_stream_bytes: -1,
        max_bytes_required: false,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApiStats {
    pub total: u64,
    pub errors: u64,
}

/// `$JS.API.INFO` reply body (request body is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// Bytes held in memory streams.
    pub memory: u64,
    /// Bytes held in file streams.
    pub storage: u64,
    pub streams: u64,
    pub consumers: u64,
    pub limits: AccountLimits,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    pub api: ApiStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<serde_json::Value>,
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// Every API reply: `type`, then `error` on failure, then the body's fields.
/// On failure most bodies are absent (`Option` flattened to nothing); the list
/// and info replies still carry their paging fields, as the reference does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiResponse<Body> {
    #[serde(rename = "type")]
    pub response_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(flatten)]
    pub body: Body,
}

impl<Body> ApiResponse<Body> {
    pub fn ok(response_type: &str, body: Body) -> ApiResponse<Body> {
        ApiResponse {
            response_type: response_type.to_owned(),
            error: None,
            body,
        }
    }

    pub fn failed(response_type: &str, error: ApiError, body: Body) -> ApiResponse<Body> {
        ApiResponse {
            response_type: response_type.to_owned(),
            error: Some(error),
            body,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AccountInfoBody {
    #[serde(flatten)]
    pub info: Option<AccountInfo>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamCreateBody {
    #[serde(flatten)]
    pub info: Option<StreamInfo>,
    /// Also true when an identical config was "created" again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub did_create: bool,
}

/// Body of the stream update reply.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamUpdateBody {
    #[serde(flatten)]
    pub info: Option<StreamInfo>,
}

/// Body of the stream info reply: paging (of `state.subjects`) even on error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamInfoBody {
    #[serde(flatten)]
    pub paged: ApiPaged,
    #[serde(flatten)]
    pub info: Option<StreamInfo>,
}

/// `streams` is `null` (not `[]`) when there are none.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamNamesBody {
    #[serde(flatten)]
    pub paged: ApiPaged,
    pub streams: Option<Vec<String>>,
}

/// `streams` is `[]` when there are none.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StreamListBody {
    #[serde(flatten)]
    pub paged: ApiPaged,
    pub streams: Vec<StreamInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// Stream delete, consumer delete and message delete replies.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SuccessBody {
    #[serde(default, skip_serializing_if = "is_false")]
    pub success: bool,
}

/// `purged` is written even on error (as 0).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamPurgeBody {
    #[serde(default, skip_serializing_if = "is_false")]
    pub success: bool,
    pub purged: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MsgGetBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<StoredMessage>,
}

/// Consumer create and consumer info replies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConsumerInfoBody {
    #[serde(flatten)]
    pub info: Option<ConsumerInfo>,
}

/// `consumers` is `[]` (not `null`) when there are none, unlike stream names.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConsumerNamesBody {
    #[serde(flatten)]
    pub paged: ApiPaged,
    pub consumers: Option<Vec<String>>,
}

/// `consumers` is `[]` even on a 10059 error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConsumerListBody {
    #[serde(flatten)]
    pub paged: ApiPaged,
    pub consumers: Vec<ConsumerInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

pub type AccountInfoResponse = ApiResponse<AccountInfoBody>;
pub type StreamCreateResponse = ApiResponse<StreamCreateBody>;
pub type StreamUpdateResponse = ApiResponse<StreamUpdateBody>;
pub type StreamInfoResponse = ApiResponse<StreamInfoBody>;
pub type StreamNamesResponse = ApiResponse<StreamNamesBody>;
pub type StreamListResponse = ApiResponse<StreamListBody>;
pub type StreamDeleteResponse = ApiResponse<SuccessBody>;
pub type StreamPurgeResponse = ApiResponse<StreamPurgeBody>;
pub type MsgGetResponse = ApiResponse<MsgGetBody>;
pub type MsgDeleteResponse = ApiResponse<SuccessBody>;
pub type ConsumerCreateResponse = ApiResponse<ConsumerInfoBody>;
pub type ConsumerInfoResponse = ApiResponse<ConsumerInfoBody>;
pub type ConsumerDeleteResponse = ApiResponse<SuccessBody>;
pub type ConsumerNamesResponse = ApiResponse<ConsumerNamesBody>;
pub type ConsumerListResponse = ApiResponse<ConsumerListBody>;

// ---------------------------------------------------------------------------
// Publish acks
// ---------------------------------------------------------------------------

/// The reply to a publish that a stream stored (or recognised as a duplicate).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PubAck {
    pub stream: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// The message id was seen within the duplicate window; `seq` is the original's.
    #[serde(default, skip_serializing_if = "is_false")]
    pub duplicate: bool,
}

impl PubAck {
    /// The exact bytes the reference writes on success, which are not what a
    /// JSON encoder writes: `{"stream":"S", "seq":1}` and
    /// `{"stream":"S", "seq":2,"duplicate": true}` (note the spaces).
    pub fn encode(&self) -> String {
        let stream = serde_json::to_string(&self.stream).expect("a String always encodes");
        let mut text = format!("{{\"stream\":{stream}, \"seq\":{}", self.seq);
        if !self.domain.is_empty() {
            let domain = serde_json::to_string(&self.domain).expect("a String always encodes");
            text.push_str(&format!(",\"domain\":{domain}"));
        }
        if self.duplicate {
            text.push_str(",\"duplicate\": true");
        }
        text.push('}');
        text
    }
}

/// Any reply to a stream publish. A failure is
/// `{"error":{…},"stream":"S","seq":0}` (plain JSON encoding).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PubAckResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(flatten)]
    pub ack: PubAck,
}

impl PubAckResponse {
    pub fn failed(stream: &str, error: ApiError) -> PubAckResponse {
        PubAckResponse {
            error: Some(error),
            ack: PubAck {
                stream: stream.to_owned(),
                ..PubAck::default()
            },
        }
    }

    /// Bytes as the reference sends them (see `PubAck::encode`).
    pub fn encode(&self) -> String {
        match self.error {
            None => self.ack.encode(),
            Some(_) => serde_json::to_string(self).expect("a PubAckResponse always encodes"),
        }
    }
}

/// Publish headers a stream acts on.
pub mod headers {
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const EXPECTED_STREAM: &str = "Nats-Expected-Stream";
    pub const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    pub const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
    pub const ROLLUP: &str = "Nats-Rollup";
    /// On pull status replies.
    pub const PENDING_MESSAGES: &str = "Nats-Pending-Messages";
    pub const PENDING_BYTES: &str = "Nats-Pending-Bytes";
    /// On idle heartbeats.
    pub const LAST_CONSUMER: &str = "Nats-Last-Consumer";
    pub const LAST_STREAM: &str = "Nats-Last-Stream";
}

// ---------------------------------------------------------------------------
// Acks, ack subjects, pull status replies
// ---------------------------------------------------------------------------

/// Why peer bytes could not be read as an ack, ack subject or pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The ack body is none of the known verbs (or its JSON is malformed).
    AckBody,
    /// The subject is not a `$JS.ACK.` subject of 9, 11 or 12 tokens with numbers where numbers go.
    AckSubject,
    /// The pull request body is not empty, a number, or the JSON object.
    NextRequest,
}

impl fmt::Display for ParseError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ParseError::AckBody => "client sent an ack body that is not +ACK/-NAK/+WPI/+NXT/+TERM",
            ParseError::AckSubject => "subject is not a well-formed $JS.ACK reply subject",
            ParseError::NextRequest => "client sent a malformed pull request body",
        })
    }
}

impl std::error::Error for ParseError {}

/// What a client said by publishing to a `$JS.ACK.…` subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckKind {
    /// Empty body, `+ACK` or `+OK`.
    Ack,
    /// `-NAK`, optionally `-NAK {"delay": ns}`: redeliver (after the delay).
    Nak { delay_ns: Option<i64> },
    /// `+WPI`: still working, restart the ack_wait timer.
    InProgress,
    /// `+NXT` [batch | JSON]: ack and ask for more, reply subject gets them.
    Next { request: NextRequest },
    /// `+TERM` [reason]: never redeliver.
    Term { reason: Option<String> },
}

#[derive(Deserialize)]
struct NakDelay {
    #[serde(default)]
    delay: i64,
}

impl AckKind {
    pub fn parse(body: &[u8]) -> Result<AckKind, ParseError> {
        let body = body.trim_ascii();
        let (verb, rest) = match body.iter().position(u8::is_ascii_whitespace) {
            Some(split) => (&body[..split], body[split..].trim_ascii()),
            None => (body, &b""[..]),
        };
        match verb {
            b"" | b"+ACK" | b"+OK" if rest.is_empty() => Ok(AckKind::Ack),
            b"+WPI" if rest.is_empty() => Ok(AckKind::InProgress),
            b"-NAK" if rest.is_empty() => Ok(AckKind::Nak { delay_ns: None }),
            b"-NAK" => {
                let delay: NakDelay =
                    serde_json::from_slice(rest).map_err(|_| ParseError::AckBody)?;
                Ok(AckKind::Nak {
                    delay_ns: Some(delay.delay),
                })
            }
            b"+NXT" => Ok(AckKind::Next {
                request: NextRequest::parse(rest).map_err(|_| ParseError::AckBody)?,
            }),
            b"+TERM" => Ok(AckKind::Term {
                reason: (!rest.is_empty()).then(|| String::from_utf8_lossy(rest).into_owned()),
            }),
            _ => Err(ParseError::AckBody),
        }
    }

    /// The body a client sends (used by tests and by perch's own clients).
    pub fn encode(&self) -> String {
        match self {
            AckKind::Ack => "+ACK".to_owned(),
            AckKind::Nak { delay_ns: None } => "-NAK".to_owned(),
            AckKind::Nak {
                delay_ns: Some(delay),
            } => format!("-NAK {{\"delay\": {delay}}}"),
            AckKind::InProgress => "+WPI".to_owned(),
            AckKind::Next { request } => format!(
                "+NXT {}",
                serde_json::to_string(request).expect("a NextRequest always encodes")
            ),
            AckKind::Term { reason: None } => "+TERM".to_owned(),
            AckKind::Term {
                reason: Some(reason),
            } => format!("+TERM {reason}"),
        }
    }
}

/// The reply subject of a delivered message; its tokens are the delivery
/// metadata clients show (`msg.metadata`).
///
/// nats-server 2.9.10 sends the 9-token form
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp_ns>.<pending>`,
/// which `encode` writes. `parse` also reads the newer 11/12-token form
/// `$JS.ACK.<domain>.<account_hash>.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp_ns>.<pending>[.<random>]`
/// (domain `_` = none), so acks stay readable if perch ever writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckSubject {
    pub domain: Option<String>,
    pub account_hash: Option<String>,
    pub stream: String,
    pub consumer: String,
    /// How many times this message has been delivered (1 = first time).
    pub delivered: u64,
    pub stream_seq: u64,
    pub consumer_seq: u64,
    /// The message's stored time, unix nanoseconds.
    pub timestamp_ns: i64,
    /// Messages left for this consumer after this one.
    pub pending: u64,
}

impl AckSubject {
    pub fn encode(&self) -> String {
        format!(
            "{ACK_PREFIX}{}.{}.{}.{}.{}.{}.{}",
            self.stream,
            self.consumer,
            self.delivered,
            self.stream_seq,
            self.consumer_seq,
            self.timestamp_ns,
            self.pending
        )
    }

    pub fn parse(subject: &str) -> Result<AckSubject, ParseError> {
        let rest = subject
            .strip_prefix(ACK_PREFIX)
            .ok_or(ParseError::AckSubject)?;
        let tokens: Vec<&str> = rest.split('.').collect();
        if tokens.iter().any(|token| token.is_empty()) {
            return Err(ParseError::AckSubject);
        }
        let (domain, account_hash, fields) = match tokens.len() {
            7 => (None, None, &tokens[..]),
            9 | 10 => {
                let domain = (tokens[0] != "_").then(|| tokens[0].to_owned());
                (domain, Some(tokens[1].to_owned()), &tokens[2..9])
            }
            _ => return Err(ParseError::AckSubject),
        };
        let number = |token: &str| token.parse::<u64>().map_err(|_| ParseError::AckSubject);
        Ok(AckSubject {
            domain,
            account_hash,
            stream: fields[0].to_owned(),
            consumer: fields[1].to_owned(),
            delivered: number(fields[2])?,
            stream_seq: number(fields[3])?,
            consumer_seq: number(fields[4])?,
            timestamp_ns: fields[5].parse().map_err(|_| ParseError::AckSubject)?,
            pending: number(fields[6])?,
        })
    }
}

/// A status reply the server sends to a pull request's reply subject: an HMSG
/// with this header block and an empty payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullStatus {
    /// `no_wait` and nothing to deliver.
    NoMessages,
    /// `expires` passed; the counts are what the request still wanted.
    RequestTimeout {
        pending_messages: u64,
        pending_bytes: u64,
    },
    /// The next message is larger than the request's remaining `max_bytes`.
    MessageSizeExceedsMaxBytes {
        pending_messages: u64,
        pending_bytes: u64,
    },
    /// More pull requests waiting than the consumer's `max_waiting`.
    ExceededMaxWaiting,
    /// The consumer was deleted while the request waited.
    ConsumerDeleted,
    /// A pull request against a push consumer.
    ConsumerIsPushBased,
    /// Sent every `idle_heartbeat` while the request waits with nothing to deliver.
    IdleHeartbeat {
        last_consumer_seq: u64,
        last_stream_seq: u64,
    },
}

impl PullStatus {
    pub fn status_code(self) -> u16 {
        match self {
            PullStatus::NoMessages => 404,
            PullStatus::RequestTimeout { .. } => 408,
            PullStatus::MessageSizeExceedsMaxBytes { .. }
            | PullStatus::ExceededMaxWaiting
            | PullStatus::ConsumerDeleted
            | PullStatus::ConsumerIsPushBased => 409,
            PullStatus::IdleHeartbeat { .. } => 100,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            PullStatus::NoMessages => "No Messages",
            PullStatus::RequestTimeout { .. } => "Request Timeout",
            PullStatus::MessageSizeExceedsMaxBytes { .. } => "Message Size Exceeds MaxBytes",
            PullStatus::ExceededMaxWaiting => "Exceeded MaxWaiting",
            PullStatus::ConsumerDeleted => "Consumer Deleted",
            PullStatus::ConsumerIsPushBased => "Consumer is push based",
            PullStatus::IdleHeartbeat { .. } => "Idle Heartbeat",
        }
    }

    /// The header block, byte for byte as the reference writes it.
    pub fn header_block(self) -> String {
        let mut block = format!("NATS/1.0 {} {}\r\n", self.status_code(), self.description());
        let mut header = |name: &str, value: u64| block.push_str(&format!("{name}: {value}\r\n"));
        match self {
            PullStatus::RequestTimeout {
                pending_messages,
                pending_bytes,
            }
            | PullStatus::MessageSizeExceedsMaxBytes {
                pending_messages,
                pending_bytes,
            } => {
                header(headers::PENDING_MESSAGES, pending_messages);
                header(headers::PENDING_BYTES, pending_bytes);
            }
            PullStatus::IdleHeartbeat {
                last_consumer_seq,
                last_stream_seq,
            } => {
                header(headers::LAST_CONSUMER, last_consumer_seq);
                header(headers::LAST_STREAM, last_stream_seq);
            }
            PullStatus::NoMessages
            | PullStatus::ExceededMaxWaiting
            | PullStatus::ConsumerDeleted
            | PullStatus::ConsumerIsPushBased => {}
        }
        block.push_str("\r\n");
        block
    }

    /// Reads a status header block back (clients' view; used by tests and
    /// perch's own pull clients). `None` for anything that is not one of these.
    pub fn parse(block: &str) -> Option<PullStatus> {
        let block = block.strip_suffix("\r\n\r\n")?;
        let mut lines = block.split("\r\n");
        let status_line = lines.next()?.strip_prefix("NATS/1.0 ")?;
        let (code, description) = status_line.split_once(' ')?;
        let mut fields: BTreeMap<&str, u64> = BTreeMap::new();
        for line in lines {
            let (name, value) = line.split_once(": ")?;
            fields.insert(name, value.parse().ok()?);
        }
        let field = |name: &str| fields.get(name).copied();
        let status = match (code, description) {
            ("404", "No Messages") => PullStatus::NoMessages,
            ("408", "Request Timeout") => PullStatus::RequestTimeout {
                pending_messages: field(headers::PENDING_MESSAGES)?,
                pending_bytes: field(headers::PENDING_BYTES)?,
            },
            ("409", "Message Size Exceeds MaxBytes") => PullStatus::MessageSizeExceedsMaxBytes {
                pending_messages: field(headers::PENDING_MESSAGES)?,
                pending_bytes: field(headers::PENDING_BYTES)?,
            },
            ("409", "Exceeded MaxWaiting") => PullStatus::ExceededMaxWaiting,
            ("409", "Consumer Deleted") => PullStatus::ConsumerDeleted,
            ("409", "Consumer is push based") => PullStatus::ConsumerIsPushBased,
            ("100", "Idle Heartbeat") => PullStatus::IdleHeartbeat {
                last_consumer_seq: field(headers::LAST_CONSUMER)?,
                last_stream_seq: field(headers::LAST_STREAM)?,
            },
            _ => return None,
        };
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    //! Every captured exchange in tests/fixtures/jetstream goes through `check`:
    //! requests decode, replies decode and re-encode to the same JSON value (so
    //! volatile fields such as timestamps and generated names round-trip too),
    //! and the non-JSON parts (PubAck bytes, status headers, ack subjects and
    //! ack bodies) re-encode byte for byte.

    use super::*;
    use serde_json::Value;
    use std::path::{Path, PathBuf};

    #[derive(Deserialize)]
    struct Fixture {
        name: String,
        subject: String,
        request: String,
        replies: Vec<FixtureMessage>,
        #[serde(default)]
        acks: Vec<FixtureAck>,
    }

    #[derive(Deserialize)]
    struct FixtureMessage {
        reply: Option<String>,
        headers: Option<String>,
        body: String,
    }

    #[derive(Deserialize)]
    struct FixtureAck {
        body: String,
    }

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jetstream")
    }

    fn fixtures() -> Vec<Fixture> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
            .expect("fixture directory exists")
            .map(|entry| entry.expect("readable directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        paths.sort();
        assert!(paths.len() >= 90, "fixtures missing: {}", paths.len());
        paths
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).expect("readable fixture");
                serde_json::from_str(&text)
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
            })
            .collect()
    }

    /// Decodes `json` as `T`, re-encodes it, and demands the same JSON value.
    fn round_trip<T: Serialize + DeserializeOwned>(fixture: &str, json: &str) -> T {
        let typed: T = serde_json::from_str(json)
            .unwrap_or_else(|error| panic!("{fixture}: reply does not decode: {error}\n{json}"));
        let expected: Value = serde_json::from_str(json).expect("fixture reply is JSON");
        let actual = serde_json::to_value(&typed).expect("typed value encodes");
        assert_eq!(
            actual, expected,
            "{fixture}: reply does not re-encode equal"
        );
        typed
    }

    fn decodes<T: DeserializeOwned + Default>(fixture: &Fixture) -> serde_json::Result<T> {
        decode_request::<T>(fixture.request.as_bytes())
    }

    fn decodes_required<T: DeserializeOwned>(fixture: &Fixture) -> serde_json::Result<T> {
        decode_required_request::<T>(fixture.request.as_bytes())
    }

    fn reply_error(fixture: &Fixture) -> Option<u16> {
        let body: Value = serde_json::from_str(&fixture.replies.first()?.body).ok()?;
        Some(body.get("error")?.get("err_code")?.as_u64()? as u16)
    }

    /// Checks one exchange; returns the API call it exercised, for coverage.
    fn check(fixture: &Fixture) -> &'static str {
        let name = fixture.name.as_str();
        let tokens: Vec<&str> = fixture.subject.split('.').collect();
        // The API call is the longest known verb sequence after `$JS.API.`
        // (stream and consumer names are upper case too, so tokens alone cannot tell).
        const CALLS: [&str; 17] = [
            "CONSUMER.DURABLE.CREATE",
            "CONSUMER.MSG.NEXT",
            "STREAM.MSG.DELETE",
            "STREAM.MSG.GET",
            "CONSUMER.CREATE",
            "CONSUMER.DELETE",
            "CONSUMER.INFO",
            "CONSUMER.NAMES",
            "CONSUMER.LIST",
            "STREAM.CREATE",
            "STREAM.UPDATE",
            "STREAM.DELETE",
            "STREAM.PURGE",
            "STREAM.NAMES",
            "STREAM.LIST",
            "STREAM.INFO",
            "INFO",
        ];
        let after_prefix = fixture.subject.strip_prefix(API_PREFIX).unwrap_or("");
        let call = CALLS
            .iter()
            .find(|call| after_prefix == **call || after_prefix.starts_with(&format!("{call}.")))
            .copied()
            .unwrap_or("");
        let replies: Vec<&str> = fixture.replies.iter().map(|r| r.body.as_str()).collect();
        let only_reply = || {
            assert_eq!(replies.len(), 1, "{name}: expected one reply");
            replies[0]
        };
        // Requests the reference refused as unparseable must not parse here either.
        let expect_request_ok = reply_error(fixture) != Some(errors::INVALID_JSON.err_code);
        let request_result = |ok: bool| {
            assert_eq!(
                ok, expect_request_ok,
                "{name}: request decode disagrees with the reference"
            );
        };
        match call {
            _ if name.starts_with("no_jetstream") => {
                assert_eq!(fixture.replies.len(), 1);
                assert_eq!(
                    fixture.replies[0].headers.as_deref(),
                    Some(NO_RESPONDERS_HEADER)
                );
                return "no_jetstream";
            }
            "INFO" => {
                let reply: AccountInfoResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::ACCOUNT_INFO);
                let info = reply.body.info.expect("account info present");
                assert_eq!(info.limits, AccountLimits::UNLIMITED);
            }
            "STREAM.CREATE" | "STREAM.UPDATE" => {
                let request = decodes_required::<StreamConfig>(fixture);
                request_result(request.is_ok());
                let info = if call == "STREAM.CREATE" {
                    let reply: StreamCreateResponse = round_trip(name, only_reply());
                    assert_eq!(reply.response_type, response_type::STREAM_CREATE);
                    assert_eq!(reply.body.did_create, reply.error.is_none());
                    reply.body.info
                } else {
                    let reply: StreamUpdateResponse = round_trip(name, only_reply());
                    assert_eq!(reply.response_type, response_type::STREAM_UPDATE);
                    reply.body.info
                };
                if let (Ok(request), Some(info)) = (request, info) {
                    // What the reference stored is the request with its defaults.
                    assert_eq!(
                        request.with_server_defaults(),
                        info.config,
                        "{name}: defaults"
                    );
                }
            }
            "STREAM.INFO" => {
                request_result(decodes::<StreamInfoRequest>(fixture).is_ok());
                let reply: StreamInfoResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::STREAM_INFO);
                assert_eq!(reply.body.info.is_some(), reply.error.is_none());
            }
            "STREAM.NAMES" => {
                request_result(decodes::<StreamListRequest>(fixture).is_ok());
                let reply: StreamNamesResponse = round_trip(name, only_reply());
                assert_eq!(reply.body.paged.limit, NAMES_PAGE_LIMIT);
            }
            "STREAM.LIST" => {
                request_result(decodes::<StreamListRequest>(fixture).is_ok());
                let reply: StreamListResponse = round_trip(name, only_reply());
                assert_eq!(reply.body.paged.limit, LIST_PAGE_LIMIT);
            }
            "STREAM.DELETE" => {
                assert!(fixture.request.is_empty());
                let reply: StreamDeleteResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::STREAM_DELETE);
            }
            "STREAM.PURGE" => {
                request_result(decodes::<StreamPurgeRequest>(fixture).is_ok());
                let reply: StreamPurgeResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::STREAM_PURGE);
            }
            "STREAM.MSG.GET" => {
                request_result(decodes_required::<MsgGetRequest>(fixture).is_ok());
                let reply: MsgGetResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::STREAM_MSG_GET);
            }
            "STREAM.MSG.DELETE" => {
                request_result(decodes_required::<MsgDeleteRequest>(fixture).is_ok());
                let reply: MsgDeleteResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::STREAM_MSG_DELETE);
            }
            "CONSUMER.CREATE" | "CONSUMER.DURABLE.CREATE" => {
                let request = decodes_required::<ConsumerCreateRequest>(fixture);
                request_result(request.is_ok());
                let reply: ConsumerCreateResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::CONSUMER_CREATE);
                if let (Ok(request), Some(info)) = (request, reply.body.info) {
                    let mut expected = request.config.with_server_defaults();
                    // CONSUMER.CREATE.<stream>.<name> writes the name into the config.
                    if call == "CONSUMER.CREATE" && tokens.len() > 5 {
                        expected.name = tokens[5].to_owned();
                    }
                    assert_eq!(Some(expected), info.config, "{name}: defaults");
                }
            }
            "CONSUMER.INFO" => {
                let reply: ConsumerInfoResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::CONSUMER_INFO);
            }
            "CONSUMER.DELETE" => {
                let reply: ConsumerDeleteResponse = round_trip(name, only_reply());
                assert_eq!(reply.response_type, response_type::CONSUMER_DELETE);
            }
            "CONSUMER.NAMES" => {
                request_result(decodes::<ConsumerListRequest>(fixture).is_ok());
                let reply: ConsumerNamesResponse = round_trip(name, only_reply());
                assert!(
                    reply.body.consumers.is_some(),
                    "consumer names are [] not null"
                );
            }
            "CONSUMER.LIST" => {
                request_result(decodes::<ConsumerListRequest>(fixture).is_ok());
                let _: ConsumerListResponse = round_trip(name, only_reply());
            }
            "CONSUMER.MSG.NEXT" => {
                let request = NextRequest::parse(fixture.request.as_bytes()).expect(name);
                assert!(request.batch >= 1);
                for reply in &fixture.replies {
                    let headers = reply.headers.as_deref().unwrap_or("");
                    if let Some(status) = headers
                        .strip_prefix("NATS/1.0 ")
                        .filter(|s| !s.starts_with('\r'))
                    {
                        let parsed = PullStatus::parse(headers)
                            .unwrap_or_else(|| panic!("{name}: unknown status {status:?}"));
                        assert_eq!(parsed.header_block(), headers, "{name}");
                        assert!(reply.body.is_empty());
                    } else {
                        let subject = reply.reply.as_deref().expect("a delivery has a reply");
                        let ack = AckSubject::parse(subject).expect(name);
                        assert_eq!(ack.encode(), subject, "{name}: ack subject");
                        assert_eq!(
                            (ack.stream.as_str(), ack.consumer.as_str()),
                            (tokens[5], tokens[6])
                        );
                    }
                }
                for ack in &fixture.acks {
                    AckKind::parse(ack.body.as_bytes()).expect(name);
                }
                return "CONSUMER.MSG.NEXT";
            }
            "" if fixture.subject.starts_with(API_PREFIX) => {
                assert!(
                    replies.is_empty(),
                    "{name}: unknown API subjects get no reply"
                );
                return "unknown";
            }
            "" => {
                // A stream publish.
                let body = only_reply();
                let reply: PubAckResponse = round_trip(name, body);
                assert_eq!(reply.encode(), body, "{name}: PubAck bytes");
                return "publish";
            }
            other => panic!("{name}: no check for {other}"),
        }
        call
    }

    #[test]
    fn every_fixture_checks() {
        let mut seen = std::collections::BTreeSet::new();
        for fixture in fixtures() {
            seen.insert(check(&fixture));
        }
        for call in [
            "INFO",
            "STREAM.CREATE",
            "STREAM.UPDATE",
            "STREAM.INFO",
            "STREAM.NAMES",
            "STREAM.LIST",
            "STREAM.DELETE",
            "STREAM.PURGE",
            "STREAM.MSG.GET",
            "STREAM.MSG.DELETE",
            "CONSUMER.CREATE",
            "CONSUMER.DURABLE.CREATE",
            "CONSUMER.INFO",
            "CONSUMER.DELETE",
            "CONSUMER.NAMES",
            "CONSUMER.LIST",
            "CONSUMER.MSG.NEXT",
            "publish",
            "unknown",
            "no_jetstream",
        ] {
            assert!(seen.contains(call), "no fixture exercises {call}");
        }
    }

    #[test]
    fn observed_errors_match_fixtures() {
        let known = [
            errors::BAD_REQUEST,
            errors::CONSUMER_NOT_FOUND,
            errors::CONSUMER_NAME_MISMATCH,
            errors::INVALID_JSON,
            errors::NO_MESSAGE_FOUND,
            errors::MESSAGE_SIZE_EXCEEDS_MAXIMUM,
            errors::STREAM_NAME_MISMATCH,
            errors::STREAM_NAME_IN_USE,
            errors::STREAM_NOT_FOUND,
            errors::EXPECTED_STREAM_MISMATCH,
            errors::SUBJECTS_OVERLAP,
            errors::CONSUMER_START_SEQ_REQUIRED,
            errors::STREAM_PURGE_NOT_PERMITTED,
        ];
        let built = [
            ApiError::stream_invalid_config(errors::INVALID_STREAM_NAME_REASON),
            ApiError::stream_invalid_config(errors::NEGATIVE_DUPLICATE_WINDOW_REASON),
            ApiError::stream_invalid_config(errors::ROLLUP_NEEDS_PURGE_REASON),
            ApiError::consumer_create_failed(errors::ACK_POLICY_UPDATE_REASON),
            ApiError::stream_msg_delete_failed(errors::MSG_DELETE_NOT_PERMITTED_REASON),
            ApiError::stream_msg_delete_failed(errors::MSG_DELETE_PAST_END_REASON),
            ApiError::wrong_last_sequence(4),
            ApiError::wrong_last_msg_id(""),
        ];
        let ours: Vec<ApiError> = known
            .iter()
            .map(|k| k.to_api_error())
            .chain(built)
            .collect();
        let mut observed = Vec::new();
        for fixture in fixtures() {
            for reply in &fixture.replies {
                let Ok(body) = serde_json::from_str::<Value>(&reply.body) else {
                    continue;
                };
                if let Some(error) = body.get("error") {
                    observed.push(serde_json::from_value::<ApiError>(error.clone()).unwrap());
                }
            }
        }
        for error in &observed {
            assert!(ours.contains(error), "no constant for observed {error:?}");
        }
        for error in &ours {
            assert!(
                observed.contains(error),
                "constant never observed: {error:?}"
            );
        }
    }

    #[test]
    fn timestamps_round_trip_go_format() {
        for text in [
            "0001-01-01T00:00:00Z",
            "2026-11-22T01:33:47.33225161Z",
            "2020-01-02T03:04:05.123456789Z",
            "1970-01-01T00:00:00.000000001Z",
            "2000-02-29T23:59:59.5Z",
        ] {
            let parsed = Timestamp::parse_rfc3339(text).expect(text);
            assert_eq!(parsed.to_rfc3339(), text);
        }
        assert!(Timestamp::parse_rfc3339("0001-01-01T00:00:00Z")
            .unwrap()
            .is_go_zero());
        assert_eq!(
            Timestamp::parse_rfc3339("2020-01-02T04:04:05+01:00"),
            Timestamp::parse_rfc3339("2020-01-02T03:04:05Z")
        );
        // The ack subject's timestamp token and the message's `time` agree.
        let time = Timestamp::parse_rfc3339("2026-11-22T01:33:47.328660373Z").unwrap();
        assert_eq!(time.unix_nanos(), Some(1_795_311_227_328_660_373));
        assert_eq!(Timestamp::from_unix_nanos(1_795_311_227_328_660_373), time);
        assert_eq!(Timestamp::GO_ZERO.unix_nanos(), None);
        for bad in [
            "",
            "2020-13-01T00:00:00Z",
            "2020-01-01 00:00:00Z",
            "2020-01-01T00:00:00.Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn base64_matches_go() {
        for (plain, encoded) in [
            (&b""[..], ""),
            (b"hello", "aGVsbG8="),
            (b"again", "YWdhaW4="),
            (b"bee", "YmVl"),
            (
                b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n",
                "TkFUUy8xLjANCk5hdHMtTXNnLUlkOiBtMQ0KDQo=",
            ),
        ] {
            assert_eq!(base64_encode(plain), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain));
        }
        for bad in ["a", "a===", "a=bc", "ab!d"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn ack_bodies() {
        let check = |body: &str, expected: Result<AckKind, ParseError>| {
            assert_eq!(AckKind::parse(body.as_bytes()), expected, "{body:?}");
        };
        check("", Ok(AckKind::Ack));
        check("+ACK", Ok(AckKind::Ack));
        check("+OK", Ok(AckKind::Ack));
        check("+WPI", Ok(AckKind::InProgress));
        check("-NAK", Ok(AckKind::Nak { delay_ns: None }));
        check(
            "-NAK {\"delay\": 500000000}",
            Ok(AckKind::Nak {
                delay_ns: Some(500_000_000),
            }),
        );
        check("+TERM", Ok(AckKind::Term { reason: None }));
        check(
            "+TERM bad input",
            Ok(AckKind::Term {
                reason: Some("bad input".into()),
            }),
        );
        let next = |batch| {
            Ok(AckKind::Next {
                request: NextRequest {
                    batch,
                    ..NextRequest::default()
                },
            })
        };
        check("+NXT", next(1));
        check("+NXT 5", next(5));
        check("+NXT {\"batch\":3}", next(3));
        check("-NAK {", Err(ParseError::AckBody));
        check("+ACKX", Err(ParseError::AckBody));
        check("+ACK extra", Err(ParseError::AckBody));
        check("hello", Err(ParseError::AckBody));
        for kind in [
            AckKind::Ack,
            AckKind::InProgress,
            AckKind::Nak { delay_ns: None },
            AckKind::Nak { delay_ns: Some(7) },
            AckKind::Term {
                reason: Some("why".into()),
            },
            AckKind::Next {
                request: NextRequest {
                    batch: 2,
                    no_wait: true,
                    ..NextRequest::default()
                },
            },
        ] {
            assert_eq!(AckKind::parse(kind.encode().as_bytes()), Ok(kind));
        }
    }

    #[test]
    fn ack_subjects() {
        let v1 = "$JS.ACK.S.pd.1.2.2.1795311227329165344.0";
        let parsed = AckSubject::parse(v1).unwrap();
        assert_eq!(
            parsed,
            AckSubject {
                domain: None,
                account_hash: None,
                stream: "S".into(),
                consumer: "pd".into(),
                delivered: 1,
                stream_seq: 2,
                consumer_seq: 2,
                timestamp_ns: 1_795_311_227_329_165_344,
                pending: 0,
            }
        );
        let v2 = AckSubject::parse("$JS.ACK._.ACCHASH.S.pd.3.4.5.6.7.rnd").unwrap();
        assert_eq!(
            (v2.domain, v2.account_hash.as_deref()),
            (None, Some("ACCHASH"))
        );
        assert_eq!(
            (v2.delivered, v2.stream_seq, v2.consumer_seq, v2.pending),
            (3, 4, 5, 7)
        );
        let v2_no_token = AckSubject::parse("$JS.ACK.hub.ACCHASH.S.pd.3.4.5.6.7").unwrap();
        assert_eq!(v2_no_token.domain.as_deref(), Some("hub"));
        for bad in [
            "$JS.ACK.S.pd.1.2.2.3",
            "$JS.ACK.S.pd.x.2.2.3.4",
            "$JS.ACK.S..1.2.2.3.4",
            "$JS.API.S.pd.1.2.2.3.4",
            "$JS.ACK.S.pd.1.2.2.3.4.5.6.7.8",
        ] {
            assert_eq!(AckSubject::parse(bad), Err(ParseError::AckSubject), "{bad}");
        }
    }

    #[test]
    fn next_request_bodies() {
        let parse = |body: &str| NextRequest::parse(body.as_bytes());
        assert_eq!(parse("").unwrap().batch, 1);
        assert_eq!(parse(" 7 ").unwrap().batch, 7);
        let full = parse(r#"{"batch":5,"expires":300000000,"no_wait":true,"max_bytes":10,"idle_heartbeat":500000000}"#).unwrap();
        assert_eq!(
            full,
            NextRequest {
                batch: 5,
                expires_ns: 300_000_000,
                no_wait: true,
                max_bytes: 10,
                idle_heartbeat_ns: 500_000_000
            }
        );
        assert_eq!(parse("{").unwrap_err(), ParseError::NextRequest);
        assert_eq!(
            parse("99999999999999999999999").unwrap_err(),
            ParseError::NextRequest
        );
    }

    #[test]
    fn pub_ack_bytes() {
        let ack = PubAck {
            stream: "S".into(),
            seq: 2,
            domain: String::new(),
            duplicate: true,
        };
        assert_eq!(ack.encode(), r#"{"stream":"S", "seq":2,"duplicate": true}"#);
        let failed = PubAckResponse::failed("S", errors::EXPECTED_STREAM_MISMATCH.into());
        assert_eq!(
            failed.encode(),
            r#"{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"},"stream":"S","seq":0}"#
        );
    }
}
