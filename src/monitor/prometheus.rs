//! The Prometheus text exposition format (version 0.0.4): families with one
//! `# HELP` and one `# TYPE` line each, then their samples, label values
//! escaped. The runtime decides what to expose; this module only writes it
//! correctly (`promtool check metrics` is run on its output in the tests).

use std::fmt::Write;

use super::histogram::HistogramSnapshot;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// An exposition being written. Each family is written whole by one call,
/// so no family can be split or announced twice.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// A family of samples, each `(labels, value)`; labels are `(name, value)`.
    /// A family without samples is still announced (with HELP and TYPE), so a
    /// dashboard finds it before the first stream or device exists.
    pub fn family<'a>(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        samples: impl IntoIterator<Item = (&'a [(&'a str, &'a str)], f64)>,
    ) {
        assert!(kind != Kind::Histogram, "histograms go through `histogram`");
        self.header(name, help, kind);
        for (labels, value) in samples {
            self.sample(name, "", labels, None, value);
        }
    }

    /// One sample without labels.
    pub fn single(&mut self, name: &str, help: &str, kind: Kind, value: f64) {
        self.family(name, help, kind, [(&[][..], value)]);
    }

    /// A histogram whose bucket bounds are in microseconds, exposed in
    /// seconds (Prometheus's base unit).
    pub fn histogram_us(&mut self, name: &str, help: &str, snapshot: &HistogramSnapshot) {
        self.header(name, help, Kind::Histogram);
        for &(bound_us, count) in &snapshot.cumulative {
            let le = format_float(bound_us as f64 / 1e6);
            self.sample(name, "_bucket", &[], Some(&le), count as f64);
        }
        self.sample(name, "_bucket", &[], Some("+Inf"), snapshot.count as f64);
        self.sample(name, "_sum", &[], None, snapshot.sum_ns as f64 / 1e9);
        self.sample(name, "_count", &[], None, snapshot.count as f64);
    }

    pub fn finish(self) -> String {
        self.text
    }

    fn header(&mut self, name: &str, help: &str, kind: Kind) {
        assert!(is_metric_name(name), "metric name {name:?}");
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: f64,
    ) {
        self.text.push_str(name);
        self.text.push_str(suffix);
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        let mut first = true;
        for (label, value) in all {
            assert!(is_metric_name(label), "label name {label:?}");
            self.text.push(if first { '{' } else { ',' });
            first = false;
            self.text.push_str(label);
            self.text.push_str("=\"");
            escape_label_value(&mut self.text, value);
            self.text.push('"');
        }
        if !first {
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(&format_float(value));
        self.text.push('\n');
    }
}

/// Label values escape `\`, `"` and newlines; everything else is literal UTF-8.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Integers without a fraction, others as Rust's shortest round-trip form,
/// and Prometheus's spellings of the non-finite values.
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` (label names additionally may not use `:`,
/// which perch never does).
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escapes() {
        let mut out = Exposition::default();
        out.single(
            "perch_connections",
            "Open client connections.",
            Kind::Gauge,
            3.0,
        );
        out.family(
            "perch_stream_messages",
            "Messages in a stream.",
            Kind::Gauge,
            [
                (&[("stream", "A\"b\\c\nd")][..], 2.0),
                (&[("stream", "E")][..], 0.5),
            ],
        );
        out.family("perch_empty", "Nothing yet.", Kind::Counter, []);
        assert_eq!(
            out.finish(),
            "# HELP perch_connections Open client connections.\n\
             # TYPE perch_connections gauge\n\
             perch_connections 3\n\
             # HELP perch_stream_messages Messages in a stream.\n\
             # TYPE perch_stream_messages gauge\n\
             perch_stream_messages{stream=\"A\\\"b\\\\c\\nd\"} 2\n\
             perch_stream_messages{stream=\"E\"} 0.5\n\
             # HELP perch_empty Nothing yet.\n\
             # TYPE perch_empty counter\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_in_seconds() {
        let snapshot = HistogramSnapshot {
            cumulative: vec![(500, 1), (1_000, 3)],
            count: 4,
            sum_ns: 4_500_000,
        };
        let mut out = Exposition::default();
        out.histogram_us("perch_fsync_seconds", "Sync time.", &snapshot);
        assert_eq!(
            out.finish(),
            "# HELP perch_fsync_seconds Sync time.\n\
             # TYPE perch_fsync_seconds histogram\n\
             perch_fsync_seconds_bucket{le=\"0.0005\"} 1\n\
             perch_fsync_seconds_bucket{le=\"0.001\"} 3\n\
             perch_fsync_seconds_bucket{le=\"+Inf\"} 4\n\
             perch_fsync_seconds_sum 0.0045\n\
             perch_fsync_seconds_count 4\n"
        );
    }

    #[test]
    fn floats_use_prometheus_spellings() {
        assert_eq!(format_float(1.0), "1");
        assert_eq!(format_float(0.25), "0.25");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
    }
}
