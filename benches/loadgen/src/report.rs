//! Results of a run and how they are shown: per-scenario markdown tables of
//! medians, spreads and ratios, and JSON lines that BENCHMARKS.md quotes.

use serde_json::{json, Map, Value};

use crate::scenarios::{Better, Goal, Measurement, MetricDef, Scenario};

pub const PERCH: &str = "perch";
pub const NATS_SERVER: &str = "nats-server";

/// One scenario run against one server in one round.
pub struct RunRecord {
    pub scenario: Scenario,
    pub server: &'static str,
    /// 1-based.
    pub round: usize,
    pub outcome: Result<Measurement, String>,
}

impl RunRecord {
    pub fn to_json(&self) -> Value {
        let mut line = json!({
            "type": "run",
            "scenario": self.scenario.name(),
            "server": self.server,
            "round": self.round,
        });
        match &self.outcome {
            Ok(measurement) => {
                let metrics: Map<String, Value> = measurement
                    .iter()
                    .map(|(key, value)| (key.to_string(), json!(value)))
                    .collect();
                line["ok"] = json!(true);
                line["metrics"] = Value::Object(metrics);
            }
            Err(error) => {
                line["ok"] = json!(false);
                line["error"] = json!(error);
            }
        }
        line
    }

    fn value(&self, key: &str) -> Option<f64> {
        let measurement = self.outcome.as_ref().ok()?;
        measurement
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| *value)
    }
}

/// One server's values for one metric across rounds.
#[derive(Default)]
pub struct ServerStats {
    pub values: Vec<f64>,
    pub failures: usize,
    pub runs: usize,
}

impl ServerStats {
    pub fn median(&self) -> Option<f64> {
        median(&self.values)
    }
}

/// The median: middle value, or the mean of the two middle values.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

pub struct MetricSummary {
    pub metric: MetricDef,
    pub perch: ServerStats,
    pub nats: ServerStats,
}

impl MetricSummary {
    /// perch median / nats-server median.
    pub fn ratio(&self) -> Option<f64> {
        let perch = self.perch.median()?;
        let nats = self.nats.median()?;
        (nats != 0.0).then(|| perch / nats)
    }

    /// "met", "missed" or "pending" (no data yet); None without a goal.
    pub fn goal_status(&self) -> Option<&'static str> {
        let goal = self.metric.goal?;
        let met = match goal {
            Goal::RatioAtLeast(target) => self.ratio().map(|ratio| ratio >= target),
            Goal::RatioAtMost(target) => self.ratio().map(|ratio| ratio <= target),
            Goal::PerchAtMost(target) => self.perch.median().map(|perch| perch <= target),
        };
        Some(match met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "pending",
        })
    }

    pub fn to_json(&self, scenario: Scenario) -> Value {
        json!({
            "type": "summary",
            "scenario": scenario.name(),
            "metric": self.metric.key,
            "perch_median": self.perch.median(),
            "nats_server_median": self.nats.median(),
            "ratio_perch_over_nats_server": self.ratio(),
            "perch_values": self.perch.values,
            "nats_server_values": self.nats.values,
            "perch_failures": self.perch.failures,
            "nats_server_failures": self.nats.failures,
            "goal": self.metric.goal.map(goal_text),
            "goal_status": self.goal_status(),
        })
    }
}

pub fn summarize(records: &[RunRecord], scenario: Scenario) -> Vec<MetricSummary> {
    scenario
        .metrics()
        .iter()
        .map(|metric| {
            let mut summary = MetricSummary {
                metric: *metric,
                perch: ServerStats::default(),
                nats: ServerStats::default(),
            };
            for record in records.iter().filter(|record| record.scenario == scenario) {
                let stats = if record.server == PERCH {
                    &mut summary.perch
                } else {
                    &mut summary.nats
                };
                stats.runs += 1;
                match record.value(metric.key) {
                    Some(value) => stats.values.push(value),
                    None if record.outcome.is_err() => stats.failures += 1,
                    None => {}
                }
            }
            summary
        })
        .collect()
}

fn goal_text(goal: Goal) -> String {
    match goal {
        Goal::RatioAtLeast(target) => format!("≥ {target:.2}×"),
        Goal::RatioAtMost(target) => format!("≤ {target:.2}×"),
        Goal::PerchAtMost(target) => format!("perch ≤ {target:.2}"),
    }
}

fn format_value(metric: &MetricDef, value: f64) -> String {
    format!("{:.*}", metric.decimals, value / metric.display_divisor)
}

fn format_cell(metric: &MetricDef, stats: &ServerStats) -> String {
    if stats.runs == 0 {
        return "—".to_string();
    }
    let mut cell = match stats.median() {
        None => String::new(),
        Some(median) if stats.values.len() == 1 => format_value(metric, median),
        Some(median) => {
            let min = stats.values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = stats
                .values
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            format!(
                "{} ({}–{})",
                format_value(metric, median),
                format_value(metric, min),
                format_value(metric, max)
            )
        }
    };
    if stats.failures > 0 {
        if !cell.is_empty() {
            cell.push(' ');
        }
        cell.push_str(&format!("FAILED {}/{}", stats.failures, stats.runs));
    }
    cell
}

/// A markdown table for one scenario.
pub fn scenario_table(
    scenario: Scenario,
    description: &str,
    summaries: &[MetricSummary],
) -> String {
    let (perch_label, nats_label) = scenario.column_labels();
    let mut table = format!(
        "### {} — {description}\n\n| metric | {perch_label} | {nats_label} | perch/nats-server | better | goal |\n|---|--:|--:|--:|---|---|\n",
        scenario.name()
    );
    // nats-server has no equivalent of a perch-only scenario.
    let not_applicable = scenario.perch_only();
    for summary in summaries {
        let metric = &summary.metric;
        let ratio = match summary.ratio() {
            _ if not_applicable => "n/a".to_string(),
            Some(ratio) => format!("{ratio:.2}×"),
            None => "—".to_string(),
        };
        let nats_cell = if not_applicable {
            "n/a".to_string()
        } else {
            format_cell(metric, &summary.nats)
        };
        let better = match metric.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Neither => "",
        };
        let goal = match (metric.goal, summary.goal_status()) {
            (Some(goal), Some(status)) => format!("{}: {status}", goal_text(goal)),
            _ => String::new(),
        };
        table.push_str(&format!(
            "| {} | {} | {} | {ratio} | {better} | {goal} |\n",
            metric.label,
            format_cell(metric, &summary.perch),
            nats_cell,
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn goals_use_the_ratio_of_medians() {
        let records = vec![
            RunRecord {
                scenario: Scenario::PubSub,
                server: PERCH,
                round: 1,
                outcome: Ok(vec![("delivered_msgs_per_s", 3.0e6)]),
            },
            RunRecord {
                scenario: Scenario::PubSub,
                server: NATS_SERVER,
                round: 1,
                outcome: Ok(vec![("delivered_msgs_per_s", 2.0e6)]),
            },
            RunRecord {
                scenario: Scenario::PubSub,
                server: NATS_SERVER,
                round: 2,
                outcome: Err("boom".to_string()),
            },
        ];
        let summaries = summarize(&records, Scenario::PubSub);
        assert_eq!(summaries[0].ratio(), Some(1.5));
        assert_eq!(summaries[0].goal_status(), Some("met"));
        assert_eq!(summaries[0].nats.failures, 1);
        let table = scenario_table(Scenario::PubSub, "test", &summaries);
        assert!(table.contains("| delivered (M msg/s) | 3.000 | 2.000 FAILED 1/2 | 1.50× |"));
    }

    #[test]
    fn server_cpu_per_message_has_a_ratio_and_a_goal() {
        let run = |server, round, cpu_s_per_m| RunRecord {
            scenario: Scenario::NatsGoFanIn,
            server,
            round,
            outcome: Ok(vec![
                ("delivered_msgs_per_s", 1.0e6),
                ("server_cpu_s_per_m_delivered", cpu_s_per_m),
                ("server_peak_rss_kib", 65536.0),
            ]),
        };
        let records = vec![
            run(PERCH, 1, 0.30),
            run(NATS_SERVER, 1, 1.00),
            run(NATS_SERVER, 2, 1.20),
            run(PERCH, 2, 0.40),
        ];
        let summaries = summarize(&records, Scenario::NatsGoFanIn);
        let cpu = summaries
            .iter()
            .find(|summary| summary.metric.key == "server_cpu_s_per_m_delivered")
            .unwrap();
        assert!((cpu.ratio().unwrap() - 0.35 / 1.10).abs() < 1e-9);
        assert_eq!(cpu.goal_status(), Some("met"));
        let json = cpu.to_json(Scenario::NatsGoFanIn);
        assert_eq!(json["goal"], "≤ 0.50×");
        assert_eq!(json["perch_values"], serde_json::json!([0.30, 0.40]));
        let table = scenario_table(Scenario::NatsGoFanIn, "test", &summaries);
        assert!(
            table.contains("| server CPU per M delivered (s) | 0.350 (0.300–0.400) | 1.100 (1.000–1.200) | 0.32× | lower | ≤ 0.50×: met |"),
            "{table}"
        );
        assert!(
            table.contains("| server peak RSS (MiB) | 64.0 (64.0–64.0) | 64.0 (64.0–64.0) | 1.00× | lower | ≤ 0.25×: missed |"),
            "{table}"
        );
        // A metric these records lack is still a row, empty.
        assert!(
            table.contains("| client CPU (cores) |  |  | — |  |  |"),
            "{table}"
        );
    }

    #[test]
    fn device_tables_label_their_columns() {
        let run = |scenario, server, per_session| RunRecord {
            scenario,
            server,
            round: 1,
            outcome: Ok(vec![
                ("rss_per_idle_session_b", per_session),
                ("delivered_msgs_per_s", 2.0e6),
            ]),
        };
        // device-idle runs on perch only: nats-server's cells are n/a.
        let records = vec![run(Scenario::DeviceIdle, PERCH, 300.0)];
        let summaries = summarize(&records, Scenario::DeviceIdle);
        let table = scenario_table(Scenario::DeviceIdle, "test", &summaries);
        assert!(
            table.contains(
                "| RSS per idle session, CONNECT + REGISTER (B) | 300 | n/a | n/a | lower | perch ≤ 256.00: missed |"
            ),
            "{table}"
        );
        // device-fan-in compares different fleets: the headings say which.
        let records = vec![
            run(Scenario::DeviceFanIn, PERCH, 0.0),
            run(Scenario::DeviceFanIn, NATS_SERVER, 0.0),
        ];
        let summaries = summarize(&records, Scenario::DeviceFanIn);
        let table = scenario_table(Scenario::DeviceFanIn, "test", &summaries);
        assert!(
            table.contains("| metric | perch + UDP devices | nats-server + TCP devices |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| delivered (M msg/s) | 2.000 | 2.000 | 1.00× | higher | ≥ 2.00×: missed |"
            ),
            "{table}"
        );
    }
}
