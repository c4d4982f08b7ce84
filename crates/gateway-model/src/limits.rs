//! Per-cluster resource limits (wire-protocol section 8) and memory-size parsing.

use serde::{Deserialize, Serialize};

/// What one cluster's scheduler and each of its workers ask for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClusterResources {
    /// Scheduler cores.
    pub scheduler_cores: f64,
    /// Scheduler memory in bytes.
    pub scheduler_memory: u64,
    /// Cores per worker.
    pub worker_cores: f64,
    /// Memory per worker in bytes.
    pub worker_memory: u64,
}

/// Hard caps on one cluster (scheduler plus all workers). `None` = no cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResourceLimits {
    /// Maximum number of workers.
    pub max_workers: Option<u64>,
    /// Maximum cores of scheduler plus workers.
    pub max_cores: Option<f64>,
    /// Maximum memory (bytes) of scheduler plus workers.
    pub max_memory: Option<u64>,
    /// The maximum of an `adapt()` that names none (none: as many as the caps allow).
    #[serde(default)]
    pub adapt_maximum_default: Option<u64>,
    /// The largest maximum an `adapt()` may name; a larger one is clipped with a message.
    #[serde(default)]
    pub adapt_maximum_max: Option<u64>,
}

impl ResourceLimits {
    /// The effective worker cap: the minimum of the explicit cap and what the core and memory
    /// caps leave after the scheduler, clamped at zero. `None` when nothing caps workers.
    pub fn worker_cap(&self, r: &ClusterResources) -> Option<u64> {
        let mut cap = self.max_workers;
        let mut tighten = |c: u64| cap = Some(cap.map_or(c, |old| old.min(c)));
        if let Some(max_cores) = self.max_cores {
            if r.worker_cores > 0.0 {
                tighten(
                    ((max_cores - r.scheduler_cores) / r.worker_cores)
                        .floor()
                        .max(0.0) as u64,
                );
            }
        }
        if let Some(max_mem) = self.max_memory {
            if let Some(n) = max_mem
                .saturating_sub(r.scheduler_memory)
                .checked_div(r.worker_memory)
            {
                tighten(n);
            }
        }
        cap
    }

    /// Refuses a cluster whose scheduler alone exceeds a cap (message as the protocol gives it).
    pub fn check_scheduler(&self, r: &ClusterResources) -> Result<(), String> {
        if let Some(max_mem) = self.max_memory {
            if r.scheduler_memory > max_mem {
                return Err(format!(
                    "Scheduler memory request of {} exceeds cluster memory limit of {}",
                    format_memory(r.scheduler_memory),
                    format_memory(max_mem)
                ));
            }
        }
        if let Some(max_cores) = self.max_cores {
            if r.scheduler_cores > max_cores {
                return Err(format!(
                    "Scheduler cores request of {} exceeds cluster cores limit of {}",
                    r.scheduler_cores, max_cores
                ));
            }
        }
        Ok(())
    }

    /// Clips a scale request; returns the count to use and the message when clipped.
    pub fn clip_scale(&self, r: &ClusterResources, count: u64) -> (u64, Option<String>) {
        match self.worker_cap(r) {
            Some(cap) if count > cap => (
                cap,
                Some(format!(
                    "Scale request of {count} workers would exceed resource limit of {cap} workers. Scaling to {cap} instead."
                )),
            ),
            _ => (count, None),
        }
    }

    /// Clips adaptive bounds; returns `(minimum, maximum, message)`. An adapt without a
    /// maximum gets [`Self::adapt_maximum_default`]; bounds above [`Self::adapt_maximum_max`]
    /// or the worker cap are clipped to it, with a message.
    pub fn clip_adapt(
        &self,
        r: &ClusterResources,
        minimum: Option<u64>,
        maximum: Option<u64>,
    ) -> (Option<u64>, Option<u64>, Option<String>) {
        let (mut minimum, mut maximum) = (minimum, maximum.or(self.adapt_maximum_default));
        let mut message = None;
        if let Some(top) = self.adapt_maximum_max {
            let (min, max) = (minimum.unwrap_or(0), maximum.unwrap_or(top));
            if min > top || max > top {
                let (new_min, new_max) = (min.min(top), max.min(top));
                message = Some(format!(
                    "Adapt with `maximum={max}, minimum={min}` workers would exceed the adaptive maximum of {top} workers. Using `maximum={new_max}, minimum={new_min}` instead."
                ));
                minimum = Some(new_min);
            }
            maximum = Some(max.min(top));
        }
        let Some(cap) = self.worker_cap(r) else {
            return (minimum, maximum, message);
        };
        let (min, max) = (minimum.unwrap_or(0), maximum.unwrap_or(cap));
        if min > cap || max > cap {
            let (new_min, new_max) = (min.min(cap), max.min(cap));
            let msg = format!(
                "Adapt with `maximum={max}, minimum={min}` workers would exceed resource limit of {cap} workers. Using `maximum={new_max}, minimum={new_min}` instead."
            );
            (Some(new_min), Some(new_max), Some(msg))
        } else {
            (Some(min), Some(max), message)
        }
    }
}

/// Why a memory size could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid memory size {0:?}: use bytes or a number with K, M, G or T (powers of 1024)")]
pub struct BadMemory(pub String);

/// Parses `2G`, `512 MiB`, `1.5g`, `1073741824` into bytes (suffixes are powers of 1024).
pub fn parse_memory(s: &str) -> Result<u64, BadMemory> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| BadMemory(s.into()))?;
    let unit = unit.trim().to_ascii_uppercase();
    let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(BadMemory(s.into())),
    };
    let bytes = num * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(BadMemory(s.into()));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes in human units as the protocol's messages do, e.g. `2.00 GiB`.
pub fn format_memory(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn res() -> ClusterResources {
        ClusterResources {
            scheduler_cores: 1.0,
            scheduler_memory: 2 * GIB,
            worker_cores: 1.0,
            worker_memory: 2 * GIB,
        }
    }

    #[test]
    fn cap_is_the_tightest_limit() {
        let r = res();
        assert_eq!(ResourceLimits::default().worker_cap(&r), None);
        assert_eq!(
            ResourceLimits {
                max_workers: Some(5),
                ..Default::default()
            }
            .worker_cap(&r),
            Some(5)
        );
        assert_eq!(
            ResourceLimits {
                max_workers: Some(5),
                max_cores: Some(3.5),
                ..Default::default()
            }
            .worker_cap(&r),
            Some(2)
        );
        assert_eq!(
            ResourceLimits {
                max_memory: Some(7 * GIB),
                ..Default::default()
            }
            .worker_cap(&r),
            Some(2)
        );
        assert_eq!(
            ResourceLimits {
                max_memory: Some(GIB),
                ..Default::default()
            }
            .worker_cap(&r),
            Some(0)
        );
        assert_eq!(
            ResourceLimits {
                max_cores: Some(0.5),
                ..Default::default()
            }
            .worker_cap(&r),
            Some(0)
        );
    }

    #[test]
    fn scale_clipping_message() {
        let l = ResourceLimits {
            max_workers: Some(2),
            ..Default::default()
        };
        assert_eq!(l.clip_scale(&res(), 2), (2, None));
        let (n, msg) = l.clip_scale(&res(), 3);
        assert_eq!(n, 2);
        assert_eq!(
            msg.unwrap(),
            "Scale request of 3 workers would exceed resource limit of 2 workers. Scaling to 2 instead."
        );
    }

    #[test]
    fn adapt_gets_a_default_maximum_and_is_capped() {
        let l = ResourceLimits {
            adapt_maximum_default: Some(10),
            adapt_maximum_max: Some(50),
            ..Default::default()
        };
        // No maximum: the default, silently.
        assert_eq!(l.clip_adapt(&res(), None, None), (None, Some(10), None));
        assert_eq!(
            l.clip_adapt(&res(), Some(2), None),
            (Some(2), Some(10), None)
        );
        // Within the largest maximum: as asked.
        assert_eq!(
            l.clip_adapt(&res(), Some(1), Some(50)),
            (Some(1), Some(50), None)
        );
        // Above it: clipped, with the message the client shows as a warning.
        let (min, max, msg) = l.clip_adapt(&res(), Some(60), Some(8766));
        assert_eq!((min, max), (Some(50), Some(50)));
        assert_eq!(
            msg.unwrap(),
            "Adapt with `maximum=8766, minimum=60` workers would exceed the adaptive maximum of 50 workers. Using `maximum=50, minimum=50` instead."
        );
        // Only a largest maximum: an unbounded adapt stops there.
        let only_max = ResourceLimits {
            adapt_maximum_max: Some(20),
            ..Default::default()
        };
        assert_eq!(
            only_max.clip_adapt(&res(), None, None),
            (None, Some(20), None)
        );
        // The worker cap still applies below it.
        let capped = ResourceLimits {
            max_workers: Some(5),
            adapt_maximum_default: Some(10),
            ..Default::default()
        };
        let (_, max, msg) = capped.clip_adapt(&res(), None, None);
        assert_eq!(max, Some(5));
        assert!(msg.unwrap().contains("resource limit of 5 workers"));
    }

    #[test]
    fn adapt_clipping_message() {
        let l = ResourceLimits {
            max_workers: Some(2),
            ..Default::default()
        };
        assert_eq!(l.clip_adapt(&res(), None, None), (Some(0), Some(2), None));
        let (min, max, msg) = l.clip_adapt(&res(), None, Some(3));
        assert_eq!((min, max), (Some(0), Some(2)));
        assert!(msg
            .unwrap()
            .contains("Using `maximum=2, minimum=0` instead"));
        assert_eq!(
            ResourceLimits::default().clip_adapt(&res(), None, Some(9)),
            (None, Some(9), None)
        );
    }

    #[test]
    fn scheduler_must_fit() {
        let l = ResourceLimits {
            max_memory: Some(GIB * 3 / 2),
            ..Default::default()
        };
        assert_eq!(
            l.check_scheduler(&res()).unwrap_err(),
            "Scheduler memory request of 2.00 GiB exceeds cluster memory limit of 1.50 GiB"
        );
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("2G").unwrap(), 2 * GIB);
        assert_eq!(parse_memory("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1G").is_err());
        assert!(parse_memory("2X").is_err());
        assert_eq!(format_memory(2 * GIB), "2.00 GiB");
    }
}
