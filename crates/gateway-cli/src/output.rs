//! Printing results as a table (for people), JSON or YAML (for scripts).

use clap::ValueEnum;
use serde_json::Value;
use std::borrow::Cow;

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
            println!("{:<width$}  {}", printable(k), cell(v));
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

/// A value as a table cell: text as it reads ([`printable`]), whole numbers without `.0`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => printable(s).into_owned(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() && x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
            _ => n.to_string(),
        },
        other => printable(&other.to_string()).into_owned(),
    }
}

/// Text from the gateway as it may go to a terminal: control characters (which could move
/// the cursor, retitle the window or clear the screen) and invisible formatting characters
/// (which make one name read as another) are written as `\u{..}` escapes; everything else
/// is kept.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// [`printable`] for multi-line output such as CSV: line ends are kept.
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

fn escape(text: &str, keep_lines: bool) -> Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && !(keep_lines && matches!(c, '\n' | '\r')))
            || gateway_client::model::text::is_invisible_format(c)
    };
    if !text.chars().any(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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

/// A cluster event as a row: for a table, its time in UTC to the second; for JSON and YAML
/// (`structured`), the API's own event object (`time` in milliseconds since 1970), with or
/// without `--follow`.
pub fn event_row(event: &gateway_client::ClusterEvent, structured: bool) -> Value {
    if structured {
        return serde_json::to_value(event).unwrap_or_default();
    }
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

/// One followed event as it arrives: columns for a table, a line of JSON for each event, or a
/// YAML document each (the same fields as `events` without `--follow`).
pub fn event_line(format: Format, event: &gateway_client::ClusterEvent) {
    let row = event_row(event, format != Format::Table);
    match format {
        Format::Table => {
            let col = |k: &str| cell(&row[k]);
            println!(
                "{}  {:<7}  {:<16}  {:<8}  {}",
                col("time"),
                col("type"),
                col("reason"),
                col("source"),
                col("message")
            );
        }
        Format::Json => println!("{}", serde_json::to_string(&row).unwrap_or_default()),
        Format::Yaml => print!("---\n{}", serde_yaml::to_string(&row).unwrap_or_default()),
    }
}

/// How long ago a millisecond timestamp was, e.g. `42s`, `5m`, `3h`, `2d`.
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

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        assert_eq!(printable("plain é 日本"), "plain é 日本");
        assert_eq!(
            printable("Im\u{1b}[31mage\u{1b}]0;PWNED\u{7}"),
            "Im\\u{1b}[31mage\\u{1b}]0;PWNED\\u{7}"
        );
        assert_eq!(printable("mal\u{202e}yrollam"), "mal\\u{202e}yrollam");
        assert_eq!(printable("a\nb\u{9b}c"), "a\\u{a}b\\u{9b}c");
        assert_eq!(printable_lines("a,b\r\n\u{1b}c\n"), "a,b\r\n\\u{1b}c\n");
        assert_eq!(cell(&serde_json::json!("x\u{1b}")), "x\\u{1b}");
        assert_eq!(cell(&serde_json::json!(2.0)), "2");
        assert_eq!(cell(&serde_json::json!(0.25)), "0.25");
        assert_eq!(cell(&serde_json::json!(7)), "7");
    }
}
