//! Scraping a daemon's `/metrics` over a real TCP connection and parsing
//! the Prometheus text format (0.0.4) strictly enough to catch a broken
//! rendering: every sample must belong to a family declared by `# TYPE`,
//! label values must be quoted and escaped properly, values must parse.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One raw HTTP exchange: sends `request`, returns everything the server
/// answered until it closed the connection.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The status line's code of a raw HTTP response.
pub fn status_code(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

/// `GET /metrics`, checked (200, the 0.0.4 content type) and parsed.
pub fn scrape(addr: SocketAddr) -> Result<Exposition, String> {
    let response = http_exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP head in {response:?}"))?;
    if status_code(head) != Some(200) {
        return Err(format!("{addr}: {head}"));
    }
    if !head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8"))
    {
        return Err(format!("{addr}: wrong content type in {head}"));
    }
    Exposition::parse(body).map_err(|e| format!("{addr}: {e}"))
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Family name → type.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let fail = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| fail("bad TYPE"))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(fail("unknown type"));
                }
                if e.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(fail("family declared twice"));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line).map_err(|w| fail(&w))?;
            let family = family_of(&sample.name, &e.types).ok_or_else(|| fail("no # TYPE"))?;
            if e.types[family] == "histogram" && sample.name == family {
                return Err(fail("bare histogram sample"));
            }
            e.samples.push(sample);
        }
        Ok(e)
    }

    /// Samples called `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Sum of the samples `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// The declared family a sample belongs to (histograms: `_bucket`,
/// `_sum`, `_count`).
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| types.get(*base).is_some_and(|t| t == "histogram"))
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("bad metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = body.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = body.find('=').ok_or("label without =")?;
            let key = &body[..eq];
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {key:?}"));
            }
            body = body[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = body.char_indices();
            let close = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, c) => value.push(c),
                }
            };
            body = &body[close + 1..];
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            if let Some(after) = body.strip_prefix(',') {
                body = after;
            } else if !body.starts_with('}') {
                return Err("unexpected text after a label".into());
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// What the daemons export, read from their registries in this process
/// (the scrape-time views registered once, on empty state): the metric
/// families, and every series name a query can use (a histogram's
/// `_bucket`, `_sum` and `_count`). For checking that the packaged
/// dashboard and alert rules query nothing that does not exist.
pub struct Exported {
    pub families: std::collections::BTreeSet<String>,
    pub series: std::collections::BTreeSet<String>,
}

pub fn exported() -> Exported {
    use std::sync::{Arc, Once};
    static VIEWS: Once = Once::new();
    VIEWS.call_once(|| {
        let (_vips_tx, vips) =
            tokio::sync::watch::channel(Arc::new(steward_coordinator::vip::VipSnapshot::default()));
        steward_coordinator::metrics::register_views(
            steward_coordinator::sessions::Sessions::default(),
            vips,
            steward_coordinator::vip::lease_api::LeaseHub::new(
                "r".into(),
                steward_lease::LeaseParams::DEFAULT,
            ),
        );
    });
    let mut out = Exported {
        families: Default::default(),
        series: Default::default(),
    };
    for text in [
        steward_coordinator::metrics::metrics().registry.render(),
        steward_agent::metrics::metrics().registry.render(),
    ] {
        let e = Exposition::parse(&text).expect("the registries render valid text");
        for (name, kind) in e.types {
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.series.insert(format!("{name}{suffix}"));
                }
            } else {
                out.series.insert(name.clone());
            }
            out.families.insert(name);
        }
    }
    out
}

/// The `steward_*` series names `text` (a query, a rules file) mentions.
pub fn steward_series_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("steward_") {
        // Part of a longer identifier (e.g. `my_steward_x`): not ours.
        let glued = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if !glued {
            found.push(name);
        }
    }
    found
}

/// etcd's own `/metrics` text (HTTP/1.0: etcd closes when it is done).
pub fn etcd_metrics(addr: SocketAddr) -> String {
    http_exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n").expect("etcd metrics")
}

/// The value of an unlabelled series in a metrics `text`.
pub fn unlabelled(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no series {name}"));
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no number in {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_registry_renders_and_rejects_nonsense() {
        let text =
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\",y=\"\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let e = Exposition::parse(text).expect("parses");
        assert_eq!(e.get("a_total", &[("x", "q\"\\\n"), ("y", "")]), Some(3.0));
        assert_eq!(e.get("h_count", &[]), Some(2.0));
        assert_eq!(e.sum("h_bucket", &[("le", "+Inf")]), 2.0);
        for bad in [
            "b 1\n",
            "# TYPE b gauge\nb{x=1} 1\n",
            "# TYPE b gauge\nb{x=\"1\"}1\n",
            "# TYPE b gauge\nb one\n",
            "# TYPE h histogram\nh 1\n",
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn steward_series_are_found_whole_and_alone() {
        assert_eq!(
            steward_series_in(
                "sum(rate(steward_a_total[5m])) / my_steward_b + steward_c_bucket{le=\"1\"}"
            ),
            ["steward_a_total", "steward_c_bucket"]
        );
        assert!(steward_series_in("StewardNoLeader up == 0").is_empty());
    }
}
