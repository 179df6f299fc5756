//! A small metrics registry rendered in the Prometheus text exposition
//! format 0.0.4: counters, gauges and histograms (fixed buckets, seconds),
//! each with optional labels.
//!
//! Updates are cheap from any task: a metric is a few atomics, and a
//! labelled family keeps its children in a sorted vector behind one mutex
//! (looked up without allocating; hot paths may keep the `Arc` of a child).
//! Values that already live elsewhere (sessions in memory, a watch cache)
//! are read at scrape time by [`Registry::gauge_fn`] instead of being copied.
//!
//! No IO here: [`crate::runtime::serve_metrics`] serves [`Registry::render`].

use std::cmp::Ordering as CmpOrdering;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The `Content-Type` of [`Registry::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets (seconds) for network round trips and etcd requests.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets (seconds) for converge runs: from a no-op run to a slow install.
pub const RUN_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain numbers behind these locks; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations (seconds) counted into fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, ascending; `+Inf` is implicit.
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is `+Inf`'s overflow.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "buckets ascend");
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observes `secs` (negative and NaN count as zero).
    pub fn observe_secs(&self, secs: f64) {
        let secs = if secs.is_nan() { 0.0 } else { secs.max(0.0) };
        self.observe(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Sum of the observations, seconds.
    pub fn sum(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// What a family can hold.
pub trait Metric: Send + Sync + 'static {
    const TYPE: &'static str;
    fn new(buckets: &'static [f64]) -> Self;
    /// Writes the sample lines; `labels` is `k="v",...` (escaped) or empty.
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    fn new(_: &'static [f64]) -> Self {
        Self::default()
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        sample_line(out, name, "", labels, "", SampleValue::U(self.get()));
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    fn new(_: &'static [f64]) -> Self {
        Self::default()
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        sample_line(out, name, "", labels, "", SampleValue::I(self.get()));
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    fn new(buckets: &'static [f64]) -> Self {
        Histogram::new(buckets)
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        // One pass over the buckets, so `_count` always equals `+Inf`.
        let mut cumulative = 0u64;
        let mut le = String::new();
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            le.clear();
            le.push_str("le=\"");
            match self.bounds.get(i) {
                Some(b) => push_f64(&mut le, *b),
                None => le.push_str("+Inf"),
            }
            le.push('"');
            sample_line(
                out,
                name,
                "_bucket",
                labels,
                &le,
                SampleValue::U(cumulative),
            );
        }
        sample_line(out, name, "_sum", labels, "", SampleValue::F(self.sum()));
        sample_line(out, name, "_count", labels, "", SampleValue::U(cumulative));
    }
}

enum SampleValue {
    U(u64),
    I(i64),
    F(f64),
}

fn push_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        // Display never uses exponents; Prometheus parses plain decimals.
        let _ = write!(out, "{v}");
    }
}

fn sample_line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &str,
    extra: &str,
    v: SampleValue,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || !extra.is_empty() {
        out.push('{');
        out.push_str(labels);
        if !labels.is_empty() && !extra.is_empty() {
            out.push(',');
        }
        out.push_str(extra);
        out.push('}');
    }
    out.push(' ');
    // Writing to a String cannot fail.
    let _ = match v {
        SampleValue::U(n) => write!(out, "{n}"),
        SampleValue::I(n) => write!(out, "{n}"),
        SampleValue::F(f) => {
            push_f64(out, f);
            Ok(())
        }
    };
    out.push('\n');
}

/// Appends `value` escaped as a label value: `\`, `"` and newline.
fn push_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn push_labels<S: AsRef<str>>(out: &mut String, names: &[&str], values: &[S]) {
    for (i, (n, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(n);
        out.push_str("=\"");
        push_label_value(out, v.as_ref());
        out.push('"');
    }
}

fn push_header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn cmp_labels(stored: &[String], wanted: &[&str]) -> CmpOrdering {
    stored
        .iter()
        .map(String::as_str)
        .cmp(wanted.iter().copied())
}

/// A family's children: label values and the metric, sorted by the values.
type Children<M> = Vec<(Box<[String]>, Arc<M>)>;

/// A metric with labels: one child per distinct label values.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    buckets: &'static [f64],
    /// Sorted by label values.
    children: Mutex<Children<M>>,
}

impl<M: Metric> Family<M> {
    fn new(
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        debug_assert!(valid_name(name), "metric name {name:?}");
        debug_assert!(
            label_names.iter().all(|l| valid_name(l) && *l != "le"),
            "label names of {name}"
        );
        Self {
            name,
            help,
            label_names,
            buckets,
            children: Mutex::new(Vec::new()),
        }
    }

    /// The child for `values` (one per label name, in order), created at
    /// zero on first use. Looks up without allocating.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        debug_assert_eq!(
            values.len(),
            self.label_names.len(),
            "labels of {}",
            self.name
        );
        let mut children = lock(&self.children);
        match children.binary_search_by(|(k, _)| cmp_labels(k, values)) {
            Ok(i) => children[i].1.clone(),
            Err(i) => {
                let child = Arc::new(M::new(self.buckets));
                let key = values.iter().map(|v| (*v).to_owned()).collect();
                children.insert(i, (key, child.clone()));
                child
            }
        }
    }

    /// The child for `values` if it exists.
    pub fn get(&self, values: &[&str]) -> Option<Arc<M>> {
        let children = lock(&self.children);
        children
            .binary_search_by(|(k, _)| cmp_labels(k, values))
            .ok()
            .map(|i| children[i].1.clone())
    }

    /// Drops the child for `values` (its series disappears).
    pub fn remove(&self, values: &[&str]) -> bool {
        let mut children = lock(&self.children);
        match children.binary_search_by(|(k, _)| cmp_labels(k, values)) {
            Ok(i) => {
                children.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps only the children whose label values `keep` accepts.
    pub fn retain(&self, mut keep: impl FnMut(&[String]) -> bool) {
        lock(&self.children).retain(|(k, _)| keep(k));
    }

    pub fn clear(&self) {
        lock(&self.children).clear();
    }
}

/// Something the registry renders.
trait Collect: Send + Sync {
    fn name(&self) -> &str;
    fn collect(&self, out: &mut String);
}

impl<M: Metric> Collect for Family<M> {
    fn name(&self) -> &str {
        self.name
    }
    fn collect(&self, out: &mut String) {
        push_header(out, self.name, self.help, M::TYPE);
        // Render from a snapshot: updates never wait for a scrape's writes.
        let children: Children<M> = lock(&self.children).clone();
        let mut labels = String::new();
        for (values, metric) in &children {
            labels.clear();
            push_labels(&mut labels, self.label_names, values);
            metric.render(self.name, &labels, out);
        }
    }
}

type SampleFn = dyn Fn(&mut Samples<'_>) + Send + Sync;

/// Gauge samples produced at scrape time by [`Registry::gauge_fn`].
pub struct Samples<'a> {
    name: &'a str,
    label_names: &'static [&'static str],
    out: &'a mut String,
}

impl Samples<'_> {
    /// One sample; `values` are the label values, in order.
    pub fn add(&mut self, values: &[&str], value: f64) {
        debug_assert_eq!(
            values.len(),
            self.label_names.len(),
            "labels of {}",
            self.name
        );
        let mut labels = String::new();
        push_labels(&mut labels, self.label_names, values);
        sample_line(self.out, self.name, "", &labels, "", SampleValue::F(value));
    }
}

struct GaugeFn {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    sample: Box<SampleFn>,
}

impl Collect for GaugeFn {
    fn name(&self) -> &str {
        self.name
    }
    fn collect(&self, out: &mut String) {
        push_header(out, self.name, self.help, "gauge");
        (self.sample)(&mut Samples {
            name: self.name,
            label_names: self.label_names,
            out,
        });
    }
}

/// The metrics of one process, rendered in registration order.
#[derive(Default)]
pub struct Registry {
    collectors: Mutex<Vec<Arc<dyn Collect>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = lock(&self.collectors)
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        f.debug_struct("Registry").field("metrics", &names).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `c`, replacing a metric of the same name (in its place).
    fn register(&self, c: Arc<dyn Collect>) {
        let mut collectors = lock(&self.collectors);
        match collectors.iter().position(|x| x.name() == c.name()) {
            Some(i) => collectors[i] = c,
            None => collectors.push(c),
        }
    }

    fn family<M: Metric>(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Arc<Family<M>> {
        let family = Arc::new(Family::new(name, help, labels, buckets));
        self.register(family.clone());
        family
    }

    pub fn counter(&self, name: &'static str, help: &'static str) -> Arc<Counter> {
        self.family::<Counter>(name, help, &[], &[]).with(&[])
    }

    pub fn counter_vec(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Arc<Family<Counter>> {
        self.family(name, help, labels, &[])
    }

    pub fn gauge(&self, name: &'static str, help: &'static str) -> Arc<Gauge> {
        self.family::<Gauge>(name, help, &[], &[]).with(&[])
    }

    pub fn gauge_vec(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Arc<Family<Gauge>> {
        self.family(name, help, labels, &[])
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        buckets: &'static [f64],
    ) -> Arc<Histogram> {
        self.family::<Histogram>(name, help, &[], buckets).with(&[])
    }

    pub fn histogram_vec(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Arc<Family<Histogram>> {
        self.family(name, help, labels, buckets)
    }

    /// A gauge read at scrape time: `sample` adds one sample per label
    /// values. Registering the same name again replaces it.
    pub fn gauge_fn(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        sample: impl Fn(&mut Samples<'_>) + Send + Sync + 'static,
    ) {
        debug_assert!(valid_name(name), "metric name {name:?}");
        self.register(Arc::new(GaugeFn {
            name,
            help,
            label_names: labels,
            sample: Box::new(sample),
        }));
    }

    /// `steward_build_info{component, version} 1`.
    pub fn build_info(&self, component: &str, version: &str) {
        self.gauge_vec(
            "steward_build_info",
            "Always 1; the labels say which Steward daemon and version this is.",
            &["component", "version"],
        )
        .with(&[component, version])
        .set(1);
    }

    /// Everything, in the text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let collectors: Vec<Arc<dyn Collect>> = lock(&self.collectors).clone();
        let mut out = String::with_capacity(4096);
        for c in collectors {
            c.collect(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_with_help_and_type() {
        let r = Registry::new();
        let c = r.counter("steward_things_total", "Things seen.");
        let g = r.gauge("steward_level", "A level.");
        c.inc();
        c.add(2);
        g.set(7);
        g.dec();
        assert_eq!(
            r.render(),
            "# HELP steward_things_total Things seen.\n\
             # TYPE steward_things_total counter\n\
             steward_things_total 3\n\
             # HELP steward_level A level.\n\
             # TYPE steward_level gauge\n\
             steward_level 6\n"
        );
    }

    #[test]
    fn labelled_children_render_sorted_and_escaped() {
        let r = Registry::new();
        let f = r.counter_vec(
            "steward_x_total",
            "Help with \\ and\nnewline.",
            &["vip", "node"],
        );
        f.with(&["b", "n1"]).inc();
        f.with(&["a", "say \"hi\"\\\n"]).add(5);
        f.with(&["b", "n1"]).inc();
        assert_eq!(
            r.render(),
            "# HELP steward_x_total Help with \\\\ and\\nnewline.\n\
             # TYPE steward_x_total counter\n\
             steward_x_total{vip=\"a\",node=\"say \\\"hi\\\"\\\\\\n\"} 5\n\
             steward_x_total{vip=\"b\",node=\"n1\"} 2\n"
        );
        assert!(f.remove(&["a", "say \"hi\"\\\n"]));
        assert!(!f.remove(&["a", "nope"]));
        assert_eq!(f.get(&["b", "n1"]).map(|c| c.get()), Some(2));
        f.retain(|v| v[0] != "b");
        assert!(f.get(&["b", "n1"]).is_none());
    }

    #[test]
    fn histograms_are_cumulative_and_count_equals_inf() {
        const B: &[f64] = &[0.01, 0.1, 1.0];
        let r = Registry::new();
        let h = r.histogram_vec("steward_op_seconds", "Op time.", &["op"], B);
        let get = h.with(&["get"]);
        get.observe(Duration::from_millis(5));
        get.observe(Duration::from_millis(10)); // on the bound: in that bucket
        get.observe(Duration::from_millis(50));
        get.observe(Duration::from_secs(3));
        assert_eq!(get.count(), 4);
        assert!((get.sum() - 3.065).abs() < 1e-9);
        assert_eq!(
            r.render(),
            "# HELP steward_op_seconds Op time.\n\
             # TYPE steward_op_seconds histogram\n\
             steward_op_seconds_bucket{op=\"get\",le=\"0.01\"} 2\n\
             steward_op_seconds_bucket{op=\"get\",le=\"0.1\"} 3\n\
             steward_op_seconds_bucket{op=\"get\",le=\"1\"} 3\n\
             steward_op_seconds_bucket{op=\"get\",le=\"+Inf\"} 4\n\
             steward_op_seconds_sum{op=\"get\"} 3.065\n\
             steward_op_seconds_count{op=\"get\"} 4\n"
        );
    }

    #[test]
    fn unlabelled_histogram_and_odd_observations() {
        let r = Registry::new();
        let h = r.histogram("steward_rtt_seconds", "RTT.", &[0.5]);
        h.observe_secs(-1.0);
        h.observe_secs(f64::NAN);
        h.observe_secs(f64::INFINITY);
        let text = r.render();
        assert!(
            text.contains("steward_rtt_seconds_bucket{le=\"0.5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("steward_rtt_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("steward_rtt_seconds_count 3\n"), "{text}");
    }

    #[test]
    fn gauge_fns_sample_at_scrape_time_and_replace_by_name() {
        let r = Registry::new();
        let level = Arc::new(AtomicI64::new(1));
        let l = level.clone();
        r.gauge_fn("steward_owner", "Owner.", &["vip", "node"], move |s| {
            s.add(&["front", "n1"], l.load(Ordering::Relaxed) as f64);
            s.add(&["back", "n\"2"], f64::NAN);
        });
        level.store(4, Ordering::Relaxed);
        assert_eq!(
            r.render(),
            "# HELP steward_owner Owner.\n\
             # TYPE steward_owner gauge\n\
             steward_owner{vip=\"front\",node=\"n1\"} 4\n\
             steward_owner{vip=\"back\",node=\"n\\\"2\"} NaN\n"
        );
        r.gauge_fn("steward_owner", "Owner.", &[], |s| s.add(&[], 0.5));
        assert_eq!(
            r.render(),
            "# HELP steward_owner Owner.\n# TYPE steward_owner gauge\nsteward_owner 0.5\n"
        );
    }

    #[test]
    fn an_empty_family_renders_its_header_only() {
        let r = Registry::new();
        r.histogram_vec(
            "steward_empty_seconds",
            "Nothing yet.",
            &["op"],
            LATENCY_BUCKETS,
        );
        r.build_info("agent", "1.2.3");
        assert_eq!(
            r.render(),
            "# HELP steward_empty_seconds Nothing yet.\n\
             # TYPE steward_empty_seconds histogram\n\
             # HELP steward_build_info Always 1; the labels say which Steward daemon and version this is.\n\
             # TYPE steward_build_info gauge\n\
             steward_build_info{component=\"agent\",version=\"1.2.3\"} 1\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("steward_a:b_1"));
        assert!(!valid_name("1abc"));
        assert!(!valid_name("a-b"));
        assert!(!valid_name(""));
    }
}
