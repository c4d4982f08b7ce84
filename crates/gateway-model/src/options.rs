//! Typed cluster options: how operators declare them, how they go on the wire
//! (`GET /api/v1/options`), and how user input is validated (wire-protocol section 6).

use crate::api::py_repr;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// One exposed option, as declared in the server configuration.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct OptionField {
    /// Option key; must be a Python identifier (it becomes a keyword argument in the client).
    pub field: String,
    /// Display label; defaults to the field name.
    #[serde(default)]
    pub label: Option<String>,
    /// The cluster setting this option controls (e.g. `worker_cores`), if any.
    #[serde(default)]
    pub target: Option<String>,
    /// Type, default and bounds.
    #[serde(flatten)]
    pub kind: OptionKind,
}

/// The six option types of the protocol, each with its default and constraints.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OptionKind {
    /// Integer with optional inclusive bounds.
    Int {
        /// Default value.
        default: i64,
        /// Lower bound.
        #[serde(default)]
        min: Option<i64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<i64>,
    },
    /// Number with optional inclusive bounds.
    Float {
        /// Default value.
        default: f64,
        /// Lower bound.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<f64>,
    },
    /// Free text.
    String {
        /// Default value.
        default: String,
    },
    /// True or false.
    Bool {
        /// Default value.
        default: bool,
    },
    /// One of a list of keys; each key may carry a server-side value for its target.
    Select {
        /// Default key.
        default: String,
        /// The choices, in display order.
        options: Vec<SelectChoice>,
    },
    /// A string-keyed object (e.g. environment variables).
    Mapping {
        /// Default value.
        #[serde(default)]
        default: Map<String, Value>,
    },
}

/// A choice of a `select` option: a bare key, or a key with a server-side value.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SelectChoice {
    /// Key only; choosing it leaves the target at its default.
    Key(String),
    /// Key shown to users and the value applied to the target.
    Valued {
        /// Key shown to users.
        key: String,
        /// Value applied to the option's target.
        value: Value,
    },
}

impl SelectChoice {
    /// The key shown to users.
    pub fn key(&self) -> &str {
        match self {
            SelectChoice::Key(k) | SelectChoice::Valued { key: k, .. } => k,
        }
    }
}

/// Why a set of options (or an option declaration) was refused. The message is what the user sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionsError(pub String);

impl OptionField {
    /// The label sent to clients.
    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.field)
    }

    /// The field spec of `GET /api/v1/options`, typed.
    pub fn to_spec(&self) -> crate::api::OptionSpec {
        let Value::Object(mut wire) = self.to_wire() else {
            unreachable!("to_wire builds an object")
        };
        let take = |w: &mut Map<String, Value>, k: &str| w.remove(k).unwrap_or(Value::Null);
        crate::api::OptionSpec {
            field: self.field.clone(),
            label: self.label().to_string(),
            default: take(&mut wire, "default"),
            spec: match take(&mut wire, "spec") {
                Value::Object(spec) => spec,
                _ => Map::new(),
            },
        }
    }

    /// The field spec in the exact wire form of `GET /api/v1/options`.
    pub fn to_wire(&self) -> Value {
        let (default, spec) = match &self.kind {
            OptionKind::Int { default, min, max } => (
                json!(default),
                json!({"type": "int", "min": min, "max": max}),
            ),
            OptionKind::Float { default, min, max } => (
                json!(default),
                json!({"type": "float", "min": min, "max": max}),
            ),
            OptionKind::String { default } => (json!(default), json!({"type": "string"})),
            OptionKind::Bool { default } => (json!(default), json!({"type": "bool"})),
            OptionKind::Select { default, options } => (
                json!(default),
                json!({"type": "select", "options": options.iter().map(|o| o.key()).collect::<Vec<_>>()}),
            ),
            OptionKind::Mapping { default } => {
                (Value::Object(default.clone()), json!({"type": "mapping"}))
            }
        };
        json!({"field": self.field, "label": self.label(), "default": default, "spec": spec})
    }

    /// Checks the declaration itself: identifier name, default within bounds, select keys.
    pub fn check_declaration(&self) -> Result<(), OptionsError> {
        let f = &self.field;
        let ident = !f.is_empty()
            && !f.starts_with(|c: char| c.is_ascii_digit())
            && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            return Err(OptionsError(format!(
                "option field {f:?} is not a valid identifier"
            )));
        }
        if let OptionKind::Select { options, .. } = &self.kind {
            if options.is_empty() {
                return Err(OptionsError(format!(
                    "select option {f} needs at least one choice"
                )));
            }
        }
        if let OptionKind::Float { default, .. } = &self.kind {
            if !default.is_finite() {
                return Err(OptionsError(format!("default of {f} must be finite")));
            }
        }
        self.validate(&self.default_value())
            .map(|_| ())
            .map_err(|e| OptionsError(format!("invalid default for option {f}: {e}")))
    }

    /// The default as JSON.
    pub fn default_value(&self) -> Value {
        self.to_wire()["default"].clone()
    }

    /// Validates one user value; returns it normalised (integers given for floats become floats).
    pub fn validate(&self, value: &Value) -> Result<Value, OptionsError> {
        let f = &self.field;
        let err = |m: String| Err(OptionsError(m));
        match &self.kind {
            OptionKind::Int { min, max, .. } => {
                let Some(v) = value.as_i64().filter(|_| value.is_i64() || value.is_u64()) else {
                    return err(format!("{f} must be an integer, got {}", py_repr(value)));
                };
                if let Some(lo) = min.filter(|lo| v < *lo) {
                    return err(format!("{f} must be >= {lo}, got {v}"));
                }
                if let Some(hi) = max.filter(|hi| v > *hi) {
                    return err(format!("{f} must be <= {hi}, got {v}"));
                }
                Ok(json!(v))
            }
            OptionKind::Float { min, max, .. } => {
                let Some(v) = value.as_f64().filter(|v| v.is_finite()) else {
                    return err(format!("{f} must be a number, got {}", py_repr(value)));
                };
                if let Some(lo) = min.filter(|lo| v < *lo) {
                    return err(format!("{f} must be >= {lo:.6}, got {}", py_repr(value)));
                }
                if let Some(hi) = max.filter(|hi| v > *hi) {
                    return err(format!("{f} must be <= {hi:.6}, got {}", py_repr(value)));
                }
                Ok(json!(v))
            }
            OptionKind::String { .. } => match value {
                Value::String(_) => Ok(value.clone()),
                _ => err(format!("{f} must be a string, got {}", py_repr(value))),
            },
            OptionKind::Bool { .. } => match value {
                Value::Bool(_) => Ok(value.clone()),
                _ => err(format!("{f} must be a bool, got {}", py_repr(value))),
            },
            OptionKind::Select { options, .. } => match value {
                Value::String(s) if options.iter().any(|o| o.key() == s) => Ok(value.clone()),
                _ => err(format!("{} is not a valid option for {f}", py_repr(value))),
            },
            OptionKind::Mapping { .. } => match value {
                Value::Object(_) => Ok(value.clone()),
                _ => err(format!("{f} must be a mapping, got {}", py_repr(value))),
            },
        }
    }

    /// The value this option applies to its target for a validated user value: the chosen
    /// choice's value for `select` (`None` for a bare key: the target keeps its default),
    /// the value itself otherwise.
    pub fn target_value(&self, validated: &Value) -> Option<Value> {
        match &self.kind {
            OptionKind::Select { options, .. } => {
                match options.iter().find(|o| Some(o.key()) == validated.as_str()) {
                    Some(SelectChoice::Valued { value, .. }) => Some(value.clone()),
                    _ => None,
                }
            }
            _ => Some(validated.clone()),
        }
    }
}

/// Validates a request's `cluster_options` against the exposed fields (wire-protocol 6.3):
/// unknown keys are refused, missing ones take their defaults, every value is type- and
/// bounds-checked. Returns the full validated set, in declaration order.
pub fn validate_options(
    fields: &[OptionField],
    input: Option<&Value>,
) -> Result<Map<String, Value>, OptionsError> {
    let empty = Map::new();
    let given = match input {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => {
            let kind = match other {
                Value::Array(_) => "list",
                Value::String(_) => "str",
                Value::Bool(_) => "bool",
                Value::Number(n) if n.is_f64() => "float",
                _ => "int",
            };
            return Err(OptionsError(format!(
                "options must be a dict, got '{kind}'"
            )));
        }
    };
    let mut unknown: Vec<&str> = given
        .keys()
        .filter(|k| !fields.iter().any(|f| &f.field == *k))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        let list = unknown
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(OptionsError(format!("Unknown fields [{list}]")));
    }
    let mut out = Map::new();
    for field in fields {
        let value = match given.get(&field.field) {
            Some(v) => field.validate(v)?,
            None => field.default_value(),
        };
        out.insert(field.field.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<OptionField> {
        serde_yaml_like(
            r#"[
            {"field": "worker_cores", "label": "Worker Cores", "type": "int", "default": 1, "min": 1, "max": 4, "target": "worker_cores"},
            {"field": "worker_memory", "type": "float", "default": 1, "min": 0.5, "max": 8},
            {"field": "image", "type": "string", "default": "img"},
            {"field": "size", "type": "select", "default": "small", "options": ["small", {"key": "large", "value": 4}]},
            {"field": "gpu", "type": "bool", "default": false},
            {"field": "env", "type": "mapping"}
        ]"#,
        )
    }

    fn serde_yaml_like(s: &str) -> Vec<OptionField> {
        let f: Vec<OptionField> = serde_json::from_str(s).unwrap();
        f.iter().for_each(|x| x.check_declaration().unwrap());
        f
    }

    #[test]
    fn wire_form_matches_protocol() {
        let f = fields();
        assert_eq!(
            f[0].to_wire(),
            json!({"field": "worker_cores", "label": "Worker Cores", "default": 1, "spec": {"type": "int", "min": 1, "max": 4}})
        );
        assert_eq!(f[1].to_wire()["default"], json!(1.0));
        assert_eq!(f[1].to_wire()["label"], json!("worker_memory"));
        assert_eq!(f[2].to_wire()["spec"], json!({"type": "string"}));
        assert_eq!(
            f[3].to_wire()["spec"],
            json!({"type": "select", "options": ["small", "large"]})
        );
        assert_eq!(f[5].to_wire()["default"], json!({}));
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let v = validate_options(&fields(), None).unwrap();
        assert_eq!(
            Value::Object(v),
            json!({"worker_cores": 1, "worker_memory": 1.0, "image": "img", "size": "small", "gpu": false, "env": {}})
        );
    }

    #[test]
    fn rejects_bad_values_with_named_messages() {
        let f = fields();
        let check = |input: Value, msg: &str| {
            let e = validate_options(&f, Some(&input)).unwrap_err();
            assert!(e.0.contains(msg), "{} does not contain {}", e.0, msg);
        };
        check(json!({"foo": 1, "bar": 2}), "Unknown fields ['bar', 'foo']");
        check(
            json!({"worker_cores": "2"}),
            "worker_cores must be an integer, got '2'",
        );
        check(
            json!({"worker_cores": 2.5}),
            "worker_cores must be an integer",
        );
        check(
            json!({"worker_cores": true}),
            "worker_cores must be an integer",
        );
        check(
            json!({"worker_cores": 0}),
            "worker_cores must be >= 1, got 0",
        );
        check(
            json!({"worker_cores": 8}),
            "worker_cores must be <= 4, got 8",
        );
        check(json!({"worker_memory": 9}), "worker_memory must be <= 8");
        check(
            json!({"worker_memory": 1e308}),
            "worker_memory must be <= 8.000000, got 1e+308",
        );
        check(json!({"image": 3}), "image must be a string, got 3");
        check(json!({"gpu": 1}), "gpu must be a bool");
        check(json!({"size": "xl"}), "'xl' is not a valid option for size");
        check(json!({"env": 3}), "env must be a mapping, got 3");
        let e = validate_options(&f, Some(&json!([1]))).unwrap_err();
        assert_eq!(e.0, "options must be a dict, got 'list'");
    }

    #[test]
    fn float_accepts_integers_and_select_maps_values() {
        let f = fields();
        let v = validate_options(&f, Some(&json!({"worker_memory": 2, "size": "large"}))).unwrap();
        assert_eq!(v["worker_memory"], json!(2.0));
        assert_eq!(f[3].target_value(&v["size"]), Some(json!(4)));
        assert_eq!(f[3].target_value(&json!("small")), None);
    }

    #[test]
    fn bad_declarations_are_refused() {
        let bad: Vec<OptionField> =
            serde_json::from_str(r#"[{"field": "x", "type": "int", "default": 9, "max": 4}, {"field": "1a", "type": "bool", "default": true}, {"field": "s", "type": "select", "default": "a", "options": []}]"#).unwrap();
        assert!(bad.iter().all(|f| f.check_declaration().is_err()));
    }
}
