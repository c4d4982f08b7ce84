//! Prometheus text exposition helpers, shared by the server and the backends' `metrics()`.

use std::fmt::Write;

/// Appends one counter `dask_gateway_<name>_total` with its `# HELP` and `# TYPE` lines.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP dask_gateway_{name}_total {help}");
    let _ = writeln!(out, "# TYPE dask_gateway_{name}_total counter");
    let _ = writeln!(out, "dask_gateway_{name}_total {value}");
}

/// Appends one gauge `dask_gateway_<name>` with one sample per `(labels, value)`; `labels` is
/// the inside of the braces (`state="running"`) or empty.
pub fn gauge<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP dask_gateway_{name} {help}");
    let _ = writeln!(out, "# TYPE dask_gateway_{name} gauge");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "dask_gateway_{name} {value}");
        } else {
            let _ = writeln!(out, "dask_gateway_{name}{{{labels}}} {value}");
        }
    }
}

/// A label value escaped for the text format: backslash, double quote and newline.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_format() {
        let mut out = String::new();
        super::counter(&mut out, "things", "Things done.", 3);
        super::gauge(&mut out, "state", "States.", [("s=\"a\"", 1), ("", 2)]);
        assert_eq!(
            out,
            "# HELP dask_gateway_things_total Things done.\n# TYPE dask_gateway_things_total counter\n\
             dask_gateway_things_total 3\n# HELP dask_gateway_state States.\n# TYPE dask_gateway_state gauge\n\
             dask_gateway_state{s=\"a\"} 1\ndask_gateway_state 2\n"
        );
    }
}
