//! Reading the Prometheus text that every admin `/metrics` serves: the CLI
//! and the topology runner read proxies', gateways' and mirrors' numbers
//! through it.

use std::collections::BTreeMap;

/// `GET path` on an admin endpoint: the status code and the body. Blocking,
/// with `timeout` for connecting and for the whole answer.
pub fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::other(format!("{addr}{path}: not an HTTP answer")))
}

/// The status and body of a whole HTTP/1 answer (as read until close).
pub fn parse_response(raw: &str) -> Option<(u16, String)> {
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or `""`.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample in `text`; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_owned(),
            labels: BTreeMap::new(),
            value,
        });
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // Values escape `"` and `\` with a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Cumulative histogram buckets: (upper bound, count at or below it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
}

impl Histogram {
    /// Adds the `_bucket` samples of `samples` named `<name>_bucket` that
    /// `keep` accepts (several series add up).
    pub fn collect(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> Self {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == bucket && keep(s)) {
            let le: f64 = match s.label("le") {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or(f64::INFINITY),
            };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let count = buckets.last().map_or(0.0, |b| b.1);
        Histogram { buckets, count }
    }

    /// What happened between `earlier` and `self` (same buckets).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |b| b.1);
                (*le, (n - before).max(0.0))
            })
            .collect();
        Histogram {
            buckets,
            count: (self.count - earlier.count).max(0.0),
        }
    }

    /// The upper bound of the bucket the `q` quantile falls in (seconds);
    /// `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want)
            .map(|(le, _)| *le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_escaped_labels_and_histograms() {
        let text = "# HELP x y\n\
            a_total 3\n\
            b_total{authority=\"api.shop:80\",tls=\"mtls\",odd=\"a\\\"b\"} 7\n\
            h_bucket{target=\"x\",le=\"0.001\"} 1\n\
            h_bucket{target=\"x\",le=\"0.01\"} 9\n\
            h_bucket{target=\"x\",le=\"+Inf\"} 10\n\
            h_bucket{target=\"y\",le=\"0.001\"} 5\n\
            h_bucket{target=\"y\",le=\"0.01\"} 5\n\
            h_bucket{target=\"y\",le=\"+Inf\"} 5\n\
            garbage\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 8);
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[1].label("authority"), "api.shop:80");
        assert_eq!(samples[1].label("odd"), "a\"b");
        assert_eq!(samples[1].label("missing"), "");
        let x = Histogram::collect(&samples, "h", |s| s.label("target") == "x");
        assert_eq!(x.count, 10.0);
        assert_eq!(x.quantile(0.5), Some(0.01));
        assert_eq!(x.quantile(0.99), Some(f64::INFINITY));
        let both = Histogram::collect(&samples, "h", |_| true);
        assert_eq!(both.count, 15.0);
        assert_eq!(both.quantile(0.4), Some(0.001));
        let delta = both.since(&x);
        assert_eq!(delta.count, 5.0);
        assert_eq!(delta.quantile(0.99), Some(0.001));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
