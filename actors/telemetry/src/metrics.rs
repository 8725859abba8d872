//! The `fsb_*` metric families: one process-wide set ([`metrics`]), rendered in the
//! Prometheus text format (0.0.4) by [`Metrics::render`].
//!
//! Label values are `&'static str` from fixed lists wherever possible (stages, modes,
//! runtimes, paths, results, phases), so they cannot grow with traffic. The only
//! labels taken from data are agent ids, pool names and warm images, each bounded by
//! the cluster's configuration and, in addition, capped here ([`MAX_AGENT_SERIES`],
//! [`MAX_WARM_SERIES`]): what is over the cap is summed under `_other`. Never a
//! sandbox id or name.
//!
//! Families that count something with a fixed set of outcomes start at zero for every
//! outcome, so rates and dashboards have a series to show before the first event.

use std::{
    collections::BTreeMap,
    sync::{OnceLock, atomic::Ordering},
    time::Duration,
};

use fsb_core::{error::ErrorCode, spec::Runtime};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the create latency buckets: 0.5 ms .. 10 s, finer where
/// warm (milliseconds) and cold (tens to hundreds of milliseconds) creates fall.
pub const CREATE_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
    10.0,
];

/// The create stages observed in `fsb_create_stage_seconds` (the gateway's top-level
/// timeline stages, plus `total`); the agent's detailed `runtime.*` stages are not.
pub const STAGES: [&str; 6] = [
    "validate", "allocate", "record", "agent", "runtime", "total",
];

/// Consistency modes.
pub const MODES: [&str; 2] = ["fast", "strong"];

/// Create paths: a warm instance took the process, or a container was created.
pub const PATHS: [&str; 2] = ["warm", "cold"];

/// Agents exported with their own `agent` label; the rest are summed as `_other`.
pub const MAX_AGENT_SERIES: usize = 1000;

/// (pool, image, runtime) warm levels exported; the rest are summed as image `_other`.
pub const MAX_WARM_SERIES: usize = 200;

/// Label value for what is over a cap.
pub const OTHER: &str = "_other";

/// Loops run under the controller's supervisor.
pub const LOOPS: [&str; 2] = ["sandboxes", "pools"];

/// The stage label for a timeline stage name, if it is one of [`STAGES`].
pub fn stage_label(name: &str) -> Option<&'static str> {
    STAGES.iter().find(|s| **s == name).copied()
}

/// The path label for a timeline's path (`warm`, anything else `cold`).
pub fn path_label(path: &str) -> &'static str {
    if path == "warm" { "warm" } else { "cold" }
}

/// The mode label.
pub fn mode_label(strong: bool) -> &'static str {
    if strong { "strong" } else { "fast" }
}

type Static<const N: usize> = [(&'static str, &'static str); N];
type Dynamic<const N: usize> = [(&'static str, String); N];

/// Counters with one label whose values come from a fixed list.
#[derive(Clone, Debug)]
pub struct CounterVec {
    key: &'static str,
    family: Family<Static<1>, Counter>,
}

impl CounterVec {
    fn new(key: &'static str, values: &[&'static str]) -> Self {
        let v = Self {
            key,
            family: Family::default(),
        };
        for value in values {
            // Start every known outcome at zero, so its series exists.
            v.family.get_or_create(&[(key, *value)]).inc_by(0);
        }
        v
    }

    /// Add one for `value`.
    pub fn inc(&self, value: &'static str) {
        self.family.get_or_create(&[(self.key, value)]).inc();
    }

    /// Add `n` for `value`.
    pub fn inc_by(&self, value: &'static str, n: u64) {
        self.family.get_or_create(&[(self.key, value)]).inc_by(n);
    }

    /// Set the total for `value` (a count kept elsewhere, read at scrape time; it
    /// only goes down when its owner restarts, which Prometheus reads as a reset).
    pub fn set(&self, value: &'static str, total: u64) {
        self.family
            .get_or_create(&[(self.key, value)])
            .inner()
            .store(total, Ordering::Relaxed);
    }

    /// The current total for `value`.
    pub fn get(&self, value: &'static str) -> u64 {
        self.family.get(&[(self.key, value)]).map_or(0, |c| c.get())
    }
}

/// One agent's slots, for [`Metrics::set_agent_slots`].
#[derive(Clone, Copy, Debug)]
pub struct AgentSlots<'a> {
    /// The agent's id.
    pub agent: &'a str,
    /// Its pool.
    pub pool: &'a str,
    /// Slots taken.
    pub used: u64,
    /// Slots it has.
    pub capacity: u64,
}

/// Ready warm instances of one (pool, image, runtime), for [`Metrics::set_warm_ready`].
#[derive(Clone, Copy, Debug)]
pub struct WarmLevel<'a> {
    /// The pool.
    pub pool: &'a str,
    /// The image.
    pub image: &'a str,
    /// The runtime.
    pub runtime: Runtime,
    /// Instances ready.
    pub ready: u64,
}

/// Every `fsb_*` family. Use the process-wide set, [`metrics`]; tests may build their
/// own with [`Metrics::new`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `fsb_create_stage_seconds{stage,mode,runtime,path}`: successful creates.
    create_stage: Family<Static<4>, Histogram, fn() -> Histogram>,
    /// `fsb_creates_total{mode,result}`: `ok` or an error code.
    creates: Family<Static<2>, Counter>,
    /// `fsb_registry_allocations_total{result}`.
    pub registry_allocations: CounterVec,
    /// `fsb_registry_releases_total{result}`.
    pub registry_releases: CounterVec,
    /// `fsb_registry_warm_total{result="hit"|"miss"}`.
    pub registry_warm: CounterVec,
    /// `fsb_registry_events_total{event}`: what agent reports changed.
    pub registry_events: CounterVec,
    agent_slots: Family<Dynamic<3>, Gauge>,
    warm_ready: Family<Dynamic<3>, Gauge>,
    sandboxes: Family<Static<1>, Gauge>,
    /// `fsb_janitor_scans_total{result="ok"|"error"}`.
    pub janitor_scans: CounterVec,
    /// `fsb_janitor_containers_total{outcome="scanned"|"removed"|"failed"|"unknown"}`.
    pub janitor_containers: CounterVec,
    /// `fsb_image_pulls_total{result="ok"|"error"}`: registry pulls by the agents.
    pub image_pulls: CounterVec,
    /// `fsb_reconcile_errors_total{loop}`: failed passes of the controller's loops.
    pub reconcile_errors: CounterVec,
    /// `fsb_supervisor_restarts_total{loop}`.
    pub supervisor_restarts: CounterVec,
}

fn create_histogram() -> Histogram {
    Histogram::new(CREATE_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered under the `fsb` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fsb");
        let create_stage: Family<Static<4>, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(create_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "create_stage",
            "Create latency by stage (validate, allocate, record, agent, runtime, total), consistency mode, runtime and path (warm or cold); successful creates only",
            Unit::Seconds,
            create_stage.clone(),
        );
        let creates: Family<Static<2>, Counter> = Family::default();
        for mode in MODES {
            creates
                .get_or_create(&[("mode", mode), ("result", "ok")])
                .inc_by(0);
            for code in ErrorCode::ALL {
                creates
                    .get_or_create(&[("mode", mode), ("result", code.as_str())])
                    .inc_by(0);
            }
        }
        registry.register(
            "creates",
            "Creates answered by the gateway, by mode and result (ok or the error code)",
            creates.clone(),
        );
        let mut counters = |name: &str, help: &str, v: CounterVec| {
            registry.register(name, help, v.family.clone());
            v
        };
        let registry_allocations = counters(
            "registry_allocations",
            "Allocation decisions of the registry",
            CounterVec::new(
                "result",
                &["allocated", "already_yours", "exhausted", "conflict"],
            ),
        );
        let registry_releases = counters(
            "registry_releases",
            "Slot releases by the registry",
            CounterVec::new("result", &["released", "unknown", "not_owner"]),
        );
        let registry_warm = counters(
            "registry_warm",
            "Claimable creates that took a warm instance (hit) or found none (miss)",
            CounterVec::new("result", &["hit", "miss"]),
        );
        let registry_events = counters(
            "registry_events",
            "Registry changes from agent reports and losses",
            CounterVec::new(
                "event",
                &["adopted", "finished", "evicted", "moved", "agent_lost"],
            ),
        );
        let janitor_scans = counters(
            "janitor_scans",
            "Janitor scans by result",
            CounterVec::new("result", &["ok", "error"]),
        );
        let janitor_containers = counters(
            "janitor_containers",
            "Containers the janitor looked at (scanned) and what it did: removed, failed to remove, kept because an answer was unknown",
            CounterVec::new("outcome", &["scanned", "removed", "failed", "unknown"]),
        );
        let image_pulls = counters(
            "image_pulls",
            "Image pulls from a registry by the agent",
            CounterVec::new("result", &["ok", "error"]),
        );
        let reconcile_errors = counters(
            "reconcile_errors",
            "Failed passes of the controller's loops (retried)",
            CounterVec::new("loop", &LOOPS),
        );
        let supervisor_restarts = counters(
            "supervisor_restarts",
            "Restarts of supervised loops",
            CounterVec::new("loop", &LOOPS),
        );
        let agent_slots: Family<Dynamic<3>, Gauge> = Family::default();
        registry.register(
            "agent_slots",
            "Sandbox slots per agent, used or free, as the registry sees them",
            agent_slots.clone(),
        );
        let warm_ready: Family<Dynamic<3>, Gauge> = Family::default();
        registry.register(
            "warm_instances_ready",
            "Warm instances ready to be claimed, per pool, image and runtime, as the registry sees them",
            warm_ready.clone(),
        );
        let sandboxes: Family<Static<1>, Gauge> = Family::default();
        registry.register(
            "sandboxes",
            "Sandboxes by phase, as the gateway sees them",
            sandboxes.clone(),
        );
        Self {
            registry,
            create_stage,
            creates,
            registry_allocations,
            registry_releases,
            registry_warm,
            registry_events,
            agent_slots,
            warm_ready,
            sandboxes,
            janitor_scans,
            janitor_containers,
            image_pulls,
            reconcile_errors,
            supervisor_restarts,
        }
    }

    /// Observe a successful create: each stage of `stages` that is one of [`STAGES`]
    /// (others are skipped), and `total`.
    pub fn observe_create<'a>(
        &self,
        mode: &'static str,
        runtime: Runtime,
        path: &'static str,
        stages: impl IntoIterator<Item = (&'a str, Duration)>,
        total: Duration,
    ) {
        let labels = |stage| {
            [
                ("stage", stage),
                ("mode", mode),
                ("runtime", runtime.as_str()),
                ("path", path),
            ]
        };
        for (name, took) in stages {
            if let Some(stage) = stage_label(name).filter(|s| *s != "total") {
                self.create_stage
                    .get_or_create(&labels(stage))
                    .observe(took.as_secs_f64());
            }
        }
        self.create_stage
            .get_or_create(&labels("total"))
            .observe(total.as_secs_f64());
    }

    /// Count one create answer: `ok`, or the error's code.
    pub fn count_create(&self, mode: &'static str, result: Result<(), ErrorCode>) {
        let result = match result {
            Ok(()) => "ok",
            Err(code) => code.as_str(),
        };
        self.creates
            .get_or_create(&[("mode", mode), ("result", result)])
            .inc();
    }

    /// Creates counted for `mode` and `result` (`ok` or an error code's name).
    pub fn creates(&self, mode: &'static str, result: &'static str) -> u64 {
        self.creates
            .get(&[("mode", mode), ("result", result)])
            .map_or(0, |c| c.get())
    }

    /// Replace the per-agent slot gauges (agents beyond [`MAX_AGENT_SERIES`], in the
    /// given order, are summed under agent `_other`).
    pub fn set_agent_slots<'a>(&self, agents: impl IntoIterator<Item = AgentSlots<'a>>) {
        let mut rows: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        let mut own = 0;
        for a in agents {
            let agent = if own < MAX_AGENT_SERIES {
                own += 1;
                a.agent.to_owned()
            } else {
                OTHER.to_owned()
            };
            let row = rows.entry((agent, a.pool.to_owned())).or_default();
            row.0 += a.used;
            row.1 += a.capacity.saturating_sub(a.used);
        }
        self.agent_slots.clear();
        for ((agent, pool), (used, free)) in rows {
            for (state, n) in [("used", used), ("free", free)] {
                self.agent_slots
                    .get_or_create(&[
                        ("agent", agent.clone()),
                        ("pool", pool.clone()),
                        ("state", state.to_owned()),
                    ])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Replace the warm-level gauges (levels beyond [`MAX_WARM_SERIES`] distinct
    /// (pool, image, runtime), in the given order, are summed under image `_other`).
    pub fn set_warm_ready<'a>(&self, levels: impl IntoIterator<Item = WarmLevel<'a>>) {
        let mut rows: BTreeMap<(String, String, &'static str), u64> = BTreeMap::new();
        for l in levels {
            let mut key = (l.pool.to_owned(), l.image.to_owned(), l.runtime.as_str());
            if !rows.contains_key(&key) && rows.len() >= MAX_WARM_SERIES {
                key.1 = OTHER.to_owned();
            }
            *rows.entry(key).or_default() += l.ready;
        }
        self.warm_ready.clear();
        for ((pool, image, runtime), ready) in rows {
            self.warm_ready
                .get_or_create(&[
                    ("pool", pool),
                    ("image", image),
                    ("runtime", runtime.to_owned()),
                ])
                .set(i64::try_from(ready).unwrap_or(i64::MAX));
        }
    }

    /// Set the sandboxes-by-phase gauges; give every phase (zeros included).
    pub fn set_sandboxes(&self, phases: impl IntoIterator<Item = (&'static str, u64)>) {
        for (phase, n) in phases {
            self.sandboxes
                .get_or_create(&[("phase", phase)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Everything, in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The value of the sample line that starts with `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn renders_help_type_and_zeroed_outcomes_before_any_event() {
        let m = Metrics::new();
        let text = m.render();
        assert!(text.contains("# TYPE fsb_creates_total counter"), "{text}");
        // Families without a series yet are left out (no create, no snapshot).
        assert!(!text.contains("fsb_create_stage_seconds"), "{text}");
        assert!(!text.contains("fsb_agent_slots"), "{text}");
        assert_eq!(
            sample(&text, r#"fsb_creates_total{mode="fast",result="ok"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"fsb_creates_total{mode="strong",result="resource_exhausted"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"fsb_janitor_containers_total{outcome="removed"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"fsb_supervisor_restarts_total{loop="pools"}"#),
            Some(0.0)
        );
    }

    #[test]
    fn create_stages_are_observed_with_bounded_labels() {
        let m = Metrics::new();
        m.observe_create(
            "fast",
            Runtime::Crun,
            path_label("warm"),
            [
                ("validate", Duration::from_micros(30)),
                ("allocate", Duration::from_micros(300)),
                ("agent", Duration::from_millis(1)),
                ("runtime", Duration::from_millis(2)),
                // Detailed agent stages and unknown names are not labels.
                ("runtime.handover", Duration::from_millis(2)),
                ("something-new", Duration::from_millis(2)),
                // `total` comes from the argument, not from a stage of that name.
                ("total", Duration::from_secs(100)),
            ],
            Duration::from_micros(3400),
        );
        m.count_create("fast", Ok(()));
        m.count_create("fast", Err(ErrorCode::ResourceExhausted));
        let text = m.render();
        assert!(
            text.contains("# TYPE fsb_create_stage_seconds histogram"),
            "{text}"
        );
        let series = |stage: &str, suffix: &str| {
            format!(
                r#"fsb_create_stage_seconds_{suffix}{{stage="{stage}",mode="fast",runtime="crun",path="warm"}}"#
            )
        };
        for stage in ["validate", "allocate", "agent", "runtime", "total"] {
            assert_eq!(
                sample(&text, &series(stage, "count")),
                Some(1.0),
                "{stage}: {text}"
            );
        }
        let total = sample(&text, &series("total", "sum")).unwrap();
        assert!((total - 0.0034).abs() < 1e-9, "total sum {total}");
        // 3.4 ms falls in the 5 ms bucket, not the 3 ms one.
        let bucket = |le: &str| {
            sample(
                &text,
                &format!(
                    r#"fsb_create_stage_seconds_bucket{{stage="total",mode="fast",runtime="crun",path="warm",le="{le}"}}"#
                ),
            )
        };
        assert_eq!(bucket("0.003"), Some(0.0), "{text}");
        assert_eq!(bucket("0.005"), Some(1.0), "{text}");
        assert_eq!(bucket("+Inf"), Some(1.0), "{text}");
        assert!(!text.contains("runtime.handover"), "{text}");
        assert!(!text.contains("something-new"), "{text}");
        assert_eq!(m.creates("fast", "ok"), 1);
        assert_eq!(m.creates("fast", "resource_exhausted"), 1);
        assert_eq!(m.creates("strong", "ok"), 0);
    }

    #[test]
    fn agent_series_are_capped_and_replaced() {
        let m = Metrics::new();
        let ids: Vec<String> = (0..MAX_AGENT_SERIES + 5)
            .map(|i| format!("a{i:05}"))
            .collect();
        m.set_agent_slots(ids.iter().map(|id| AgentSlots {
            agent: id,
            pool: "p",
            used: 1,
            capacity: 4,
        }));
        let text = m.render();
        let used_lines = text
            .lines()
            .filter(|l| l.starts_with("fsb_agent_slots{") && l.contains(r#"state="used""#))
            .count();
        assert_eq!(used_lines, MAX_AGENT_SERIES + 1, "capped, plus _other");
        assert_eq!(
            sample(
                &text,
                r#"fsb_agent_slots{agent="_other",pool="p",state="used"}"#
            ),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"fsb_agent_slots{agent="a00000",pool="p",state="free"}"#
            ),
            Some(3.0)
        );
        // A later snapshot replaces the set: gone agents disappear.
        m.set_agent_slots([AgentSlots {
            agent: "b",
            pool: "p",
            used: 2,
            capacity: 2,
        }]);
        let text = m.render();
        assert!(!text.contains(r#"agent="a00000""#), "{text}");
        assert_eq!(
            sample(&text, r#"fsb_agent_slots{agent="b",pool="p",state="free"}"#),
            Some(0.0)
        );
    }

    #[test]
    fn warm_levels_are_capped_and_counters_can_be_set_from_a_snapshot() {
        let m = Metrics::new();
        let images: Vec<String> = (0..MAX_WARM_SERIES + 3)
            .map(|i| format!("img{i}"))
            .collect();
        m.set_warm_ready(images.iter().map(|image| WarmLevel {
            pool: "p",
            image,
            runtime: Runtime::Runc,
            ready: 2,
        }));
        let text = m.render();
        let lines = text
            .lines()
            .filter(|l| l.starts_with("fsb_warm_instances_ready{"))
            .count();
        assert_eq!(lines, MAX_WARM_SERIES + 1);
        assert_eq!(
            sample(
                &text,
                r#"fsb_warm_instances_ready{pool="p",image="_other",runtime="runc"}"#
            ),
            Some(6.0)
        );
        m.registry_allocations.set("allocated", 42);
        m.registry_allocations.set("allocated", 40);
        assert_eq!(m.registry_allocations.get("allocated"), 40);
        m.set_sandboxes([("Running", 3), ("Failed", 0)]);
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"fsb_registry_allocations_total{result="allocated"}"#
            ),
            Some(40.0)
        );
        assert_eq!(
            sample(&text, r#"fsb_sandboxes{phase="Running"}"#),
            Some(3.0)
        );
        assert_eq!(sample(&text, r#"fsb_sandboxes{phase="Failed"}"#), Some(0.0));
    }

    #[test]
    fn labels_map_to_fixed_values() {
        assert_eq!(stage_label("allocate"), Some("allocate"));
        assert_eq!(stage_label("runtime.task"), None);
        assert_eq!(path_label("warm"), "warm");
        assert_eq!(path_label(""), "cold");
        assert_eq!(path_label("anything"), "cold");
        assert_eq!(mode_label(true), "strong");
    }
}
