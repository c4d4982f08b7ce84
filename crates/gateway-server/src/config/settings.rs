//! Turning validated user options into one cluster's resolved settings.

use super::option_target::OptionTarget;
use super::ClusterConfig;
use gateway_backend::ClusterSettings;
use gateway_model::{parse_memory, OptionField};
use serde_json::{Map, Value};

fn number(field: &str, v: &Value) -> Result<f64, String> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| format!("{field} must be a number"))
}

fn memory(field: &str, v: &Value) -> Result<u64, String> {
    match v {
        // Numbers given through options are GiB.
        Value::Number(_) => {
            let gib = number(field, v)?;
            if gib <= 0.0 {
                return Err(format!("{field} must be positive"));
            }
            Ok((gib * (1u64 << 30) as f64).round() as u64)
        }
        Value::String(s) => parse_memory(s).map_err(|e| format!("{field}: {e}")),
        _ => Err(format!(
            "{field} must be a number of GiB or a size such as '2G'"
        )),
    }
}

/// Checks at start-up that every value an option can give its target is usable: each
/// valued `select` choice, and the default of every other targeted option
/// ([`GatewayConfig::check`](super::GatewayConfig::check) runs it on every section).
pub fn check_targets(base: &ClusterConfig) -> Result<(), String> {
    let fields = &base.options;
    let defaults = gateway_model::validate_options(fields, None).map_err(|e| e.0)?;
    resolve(base, fields, &defaults).map_err(|e| format!("with the option defaults: {e}"))?;
    for f in fields.iter().filter(|f| f.target.is_some()) {
        if let gateway_model::OptionKind::Select { options, .. } = &f.kind {
            for choice in options {
                let mut opts = defaults.clone();
                opts.insert(f.field.clone(), Value::String(choice.key().to_string()));
                resolve(base, fields, &opts)
                    .map_err(|e| format!("option {} choice {}: {e}", f.field, choice.key()))?;
            }
        }
    }
    Ok(())
}

fn text(field: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() && !s.contains(['\0', '\n']) => Ok(s.clone()),
        _ => Err(format!("{field} must give a non-empty single-line string")),
    }
}

/// Environment variables an option may set.
const MAX_ENV_VARS: usize = 256;

/// The longest `NAME=value` an option may set (the kernel's limit per variable is 128 KiB).
const MAX_ENV_VAR_BYTES: usize = 32 * 1024;

/// Applies the validated `options` to the operator's defaults and checks the result against
/// the cluster limits. Errors are user-facing (422).
pub fn resolve(
    base: &ClusterConfig,
    fields: &[OptionField],
    options: &Map<String, Value>,
) -> Result<ClusterSettings, String> {
    let mut cfg = base.clone();
    let mut env = base.environment.clone();
    let mut threads_set = false;
    for field in fields {
        let (Some(target), Some(value)) = (&field.target, options.get(&field.field)) else {
            continue;
        };
        let Some(v) = field.target_value(value) else {
            continue;
        };
        let name = &field.field;
        let target: OptionTarget = target.parse()?;
        match target {
            OptionTarget::WorkerCores => cfg.worker_cores = number(name, &v)?,
            OptionTarget::SchedulerCores => cfg.scheduler_cores = number(name, &v)?,
            OptionTarget::WorkerMemory => cfg.worker_memory = memory(name, &v)?,
            OptionTarget::SchedulerMemory => cfg.scheduler_memory = memory(name, &v)?,
            OptionTarget::WorkerCoresLimit => cfg.worker_cores_limit = Some(number(name, &v)?),
            OptionTarget::SchedulerCoresLimit => {
                cfg.scheduler_cores_limit = Some(number(name, &v)?)
            }
            OptionTarget::WorkerMemoryLimit => cfg.worker_memory_limit = Some(memory(name, &v)?),
            OptionTarget::SchedulerMemoryLimit => {
                cfg.scheduler_memory_limit = Some(memory(name, &v)?)
            }
            OptionTarget::IdleTimeout => cfg.idle_timeout = number(name, &v)?,
            OptionTarget::Image => cfg.image = Some(text(name, &v)?),
            OptionTarget::Profile => cfg.profile = Some(text(name, &v)?),
            OptionTarget::PythonEnv => cfg.python_env = Some(text(name, &v)?),
            OptionTarget::WorkerThreads => {
                let t = v
                    .as_u64()
                    .filter(|t| (1..=1024).contains(t))
                    .ok_or_else(|| format!("{name} must give 1 to 1024 threads"))?;
                cfg.worker_threads = Some(t as u32);
                threads_set = true;
            }
            OptionTarget::Environment => {
                let Value::Object(map) = &v else {
                    return Err(format!("{name} must be a mapping"));
                };
                if map.len() > MAX_ENV_VARS {
                    return Err(format!(
                        "{name}: at most {MAX_ENV_VARS} environment variables, got {}",
                        map.len()
                    ));
                }
                for (k, val) in map {
                    let valid_key = !k.is_empty() && !k.contains(['=', '\0']);
                    let text = match val {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => {
                            if *b {
                                "True".into()
                            } else {
                                "False".into()
                            }
                        }
                        _ => return Err(format!("{name}: value of {k} must be a string")),
                    };
                    if !valid_key || text.contains('\0') {
                        return Err(format!("{name}: invalid environment variable {k:?}"));
                    }
                    // The kernel refuses to start a process with a longer variable.
                    if k.len() + 1 + text.len() > MAX_ENV_VAR_BYTES {
                        return Err(format!(
                            "{name}: {k} is longer than {MAX_ENV_VAR_BYTES} bytes (name=value)"
                        ));
                    }
                    if k.starts_with("DASK_GATEWAY_") {
                        return Err(format!(
                            "{name}: {k} is set by the gateway and cannot be overridden"
                        ));
                    }
                    env.insert(k.clone(), text);
                }
            }
        }
    }
    if !(cfg.worker_cores > 0.0 && cfg.scheduler_cores > 0.0) {
        return Err("cores must be positive".into());
    }
    for (what, limit, request) in [
        ("worker cores", cfg.worker_cores_limit, cfg.worker_cores),
        (
            "scheduler cores",
            cfg.scheduler_cores_limit,
            cfg.scheduler_cores,
        ),
    ] {
        if limit.is_some_and(|l| !(l.is_finite() && l >= request)) {
            return Err(format!(
                "the {what} limit must be at least the {what} request"
            ));
        }
    }
    for (what, limit, request) in [
        ("worker memory", cfg.worker_memory_limit, cfg.worker_memory),
        (
            "scheduler memory",
            cfg.scheduler_memory_limit,
            cfg.scheduler_memory,
        ),
    ] {
        if limit.is_some_and(|l| l < request) {
            return Err(format!(
                "the {what} limit must be at least the {what} request"
            ));
        }
    }
    if cfg.idle_timeout.is_nan() || cfg.idle_timeout < 0.0 {
        return Err("idle_timeout must not be negative".into());
    }
    if !threads_set && base.worker_threads.is_none() {
        cfg.worker_threads = None;
    }
    let settings = ClusterSettings {
        resources: cfg.resources(),
        container_limits: cfg.container_limits(),
        worker_threads: cfg.threads(),
        limits: cfg.limits(),
        idle_timeout: cfg.idle_timeout,
        max_lifetime: cfg.max_lifetime,
        no_client_timeout: cfg.no_client_timeout,
        policy: None,
        environment: env,
        image: cfg.image.clone(),
        profile: cfg.profile.clone(),
        python_env: cfg.python_env.clone(),
    };
    settings.limits.check_scheduler(&settings.resources)?;
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_model::validate_options;
    use serde_json::json;

    fn setup() -> (ClusterConfig, Vec<OptionField>) {
        let cfg: ClusterConfig = serde_yaml::from_str(
            r#"
max_memory: 3G
environment: {A: "1"}
options:
  - {field: worker_cores, type: int, default: 1, min: 1, max: 4, target: worker_cores}
  - {field: worker_memory, type: float, default: 0.5, min: 0.25, max: 8, target: worker_memory}
  - {field: profile, type: select, default: small, options: [small, {key: large, value: 3}], target: worker_threads}
  - {field: env, type: mapping, target: environment}
  - {field: note, type: string, default: ""}
"#,
        )
        .unwrap();
        let fields = cfg.options.clone();
        (cfg, fields)
    }

    #[test]
    fn options_reach_their_targets() {
        let (cfg, fields) = setup();
        let opts = validate_options(
            &fields,
            Some(&json!({"worker_cores": 2, "profile": "large", "env": {"B": "x", "N": 3}})),
        )
        .unwrap();
        let s = resolve(&cfg, &fields, &opts).unwrap();
        assert_eq!(s.resources.worker_cores, 2.0);
        assert_eq!(s.resources.worker_memory, 512 << 20);
        assert_eq!(s.worker_threads, 3);
        assert_eq!(s.environment.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.environment.get("B").map(String::as_str), Some("x"));
        assert_eq!(s.environment.get("N").map(String::as_str), Some("3"));
        let opts = validate_options(&fields, Some(&json!({"worker_cores": 2}))).unwrap();
        assert_eq!(resolve(&cfg, &fields, &opts).unwrap().worker_threads, 2);
    }

    #[test]
    fn refuses_gateway_variables_and_nested_values() {
        let (cfg, fields) = setup();
        for env in [
            json!({"DASK_GATEWAY_API_TOKEN": "x"}),
            json!({"X": {"y": 1}}),
            json!({"": "v"}),
        ] {
            let opts = validate_options(&fields, Some(&json!({ "env": env }))).unwrap();
            assert!(resolve(&cfg, &fields, &opts).is_err());
        }
    }

    #[test]
    fn refuses_environments_no_process_could_start_with() {
        let (cfg, fields) = setup();
        let resolved = |env: Value| {
            let opts = validate_options(&fields, Some(&json!({ "env": env }))).unwrap();
            resolve(&cfg, &fields, &opts)
        };
        let long = "v".repeat(MAX_ENV_VAR_BYTES);
        let err = resolved(json!({ "PYTHONBIG": long })).unwrap_err();
        assert!(
            err.contains("PYTHONBIG is longer than 32768 bytes"),
            "{err}"
        );
        let fits = "v".repeat(MAX_ENV_VAR_BYTES - "FITS=".len());
        assert!(resolved(json!({ "FITS": fits })).is_ok());
        let many: serde_json::Map<String, Value> = (0..=MAX_ENV_VARS)
            .map(|i| (format!("V{i}"), json!("1")))
            .collect();
        let err = resolved(Value::Object(many)).unwrap_err();
        assert!(err.contains("at most 256 environment variables"), "{err}");
    }

    #[test]
    fn scheduler_must_fit_in_limits() {
        let (mut cfg, fields) = setup();
        cfg.scheduler_memory = 4 << 30;
        let opts = validate_options(&fields, None).unwrap();
        let e = resolve(&cfg, &fields, &opts).unwrap_err();
        assert!(
            e.contains(
                "Scheduler memory request of 4.00 GiB exceeds cluster memory limit of 3.00 GiB"
            ),
            "{e}"
        );
    }

    #[test]
    fn pod_targets_reach_the_settings() {
        let cfg: ClusterConfig = serde_yaml::from_str(
            r#"
image: base:1
worker_memory: 1G
options:
  - {field: image, type: string, default: "user:2", target: image}
  - {field: gpu, type: select, default: none, options: [none, {key: one, value: gpu}], target: profile}
  - {field: mem_limit, type: float, default: 2, target: worker_memory_limit}
"#,
        )
        .unwrap();
        let fields = cfg.options.clone();
        let opts = validate_options(&fields, Some(&json!({"gpu": "one"}))).unwrap();
        let s = resolve(&cfg, &fields, &opts).unwrap();
        assert_eq!(s.image.as_deref(), Some("user:2"));
        assert_eq!(s.profile.as_deref(), Some("gpu"));
        assert_eq!(s.container_limits.worker_memory, Some(2 << 30));
        let opts = validate_options(&fields, Some(&json!({"mem_limit": 0.5}))).unwrap();
        let e = resolve(&cfg, &fields, &opts).unwrap_err();
        assert!(e.contains("limit must be at least"), "{e}");
        let opts = validate_options(&fields, Some(&json!({"image": " "}))).unwrap();
        assert!(resolve(&cfg, &fields, &opts).is_err());
    }

    #[test]
    fn targets_have_names() {
        for t in OptionTarget::ALL {
            assert_eq!(t.as_str().parse::<OptionTarget>(), Ok(t));
        }
        assert!("nope"
            .parse::<OptionTarget>()
            .unwrap_err()
            .contains("worker_cores"));
    }

    #[test]
    fn start_up_checks_every_choice_of_every_section() {
        let check = |yaml: &str| {
            let c: crate::config::GatewayConfig = serde_yaml::from_str(yaml).unwrap();
            c.check().map(drop).map_err(|e| e.to_string())
        };
        let select = "{options: [{field: m, type: select, default: a, options: [a, {key: b, value: lots}], target: worker_memory}]}";
        let e = check(&format!("cluster: {select}")).unwrap_err();
        assert!(e.contains("cluster: option m choice b"), "{e}");
        let e = check(&format!("groups: [{{group: big, cluster: {select}}}]")).unwrap_err();
        assert!(e.contains("groups[big].cluster: option m choice b"), "{e}");
        check("groups: [{group: big, cluster: {worker_cores: 2}}]").unwrap();
    }
}
