//! Printing results as a table (for people), JSON or YAML (for scripts).

use clap::ValueEnum;
use serde_json::Value;

/// `--output` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns (one record: `key  value` lines).
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Prints records in the chosen format on stdout.
pub struct Printer {
    format: Format,
}

impl Printer {
    pub fn new(format: Format) -> Self {
        Printer { format }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    fn structured(&self, value: &Value) -> bool {
        match self.format {
            Format::Json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(value).unwrap_or_default()
                );
                true
            }
            Format::Yaml => {
                print!("{}", serde_yaml::to_string(value).unwrap_or_default());
                true
            }
            Format::Table => false,
        }
    }

    /// One object: `key  value` lines in table form (nested values as compact JSON).
    pub fn record(&self, value: &Value) {
        if self.structured(value) {
            return;
        }
        let Some(map) = value.as_object() else {
            println!("{}", cell(value));
            return;
        };
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in map {
            if k == "worker_details" {
                continue;
            }
            println!("{k:<width$}  {}", cell(v));
        }
    }

    /// Several objects: the given columns in table form, everything in JSON/YAML.
    pub fn table(&self, rows: &[Value], columns: &[&str]) {
        if self.structured(&Value::Array(rows.to_vec())) {
            return;
        }
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
            .collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([c.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |values: Vec<String>| {
            let parts: Vec<String> = values
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect();
            println!("{}", parts.join("  ").trim_end());
        };
        line(columns.iter().map(|c| c.to_uppercase()).collect());
        for row in cells {
            line(row);
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A usage report row for printing: the API's fields plus core-hours and GiB-hours.
pub fn usage_row(row: &gateway_client::UsageRow) -> Value {
    let mut v = serde_json::to_value(row).unwrap_or_default();
    v["core_hours"] = serde_json::json!(round2(row.core_seconds / 3600.0));
    v["memory_gib_hours"] = serde_json::json!(round2(
        row.memory_byte_seconds / 3600.0 / (1u64 << 30) as f64
    ));
    if row.group.is_none() && row.user.is_none() {
        v["group"] = Value::String("(default)".into());
    }
    v
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// How long ago a millisecond timestamp was, e.g. `42s`, `5m`, `3h`, `2d`.
/// A cluster event as a row: its time in UTC to the second.
pub fn event_row(event: &gateway_client::ClusterEvent) -> Value {
    let time = jiff::Timestamp::from_millisecond(event.time)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| event.time.to_string());
    serde_json::json!({
        "time": time,
        "type": match event.kind {
            gateway_client::EventType::Normal => "Normal",
            gateway_client::EventType::Warning => "Warning",
        },
        "reason": event.reason,
        "source": event.source,
        "message": event.message,
    })
}

/// One followed event as it arrives: a line of JSON for scripts, else tab-separated columns.
pub fn event_line(format: Format, event: &gateway_client::ClusterEvent) {
    let row = event_row(event);
    if format == Format::Table {
        let col = |k: &str| row[k].as_str().unwrap_or_default().to_string();
        println!(
            "{}  {:<7}  {:<16}  {:<8}  {}",
            col("time"),
            col("type"),
            col("reason"),
            col("source"),
            col("message")
        );
    } else {
        println!("{}", serde_json::to_string(event).unwrap_or_default());
    }
}

pub fn age(start_ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(start_ms);
    let s = ((now - start_ms) / 1000).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!(age(now - 5_000), "5s");
        assert_eq!(age(now - 600_000), "10m");
        assert_eq!(age(now + 5_000), "0s");
    }
}
