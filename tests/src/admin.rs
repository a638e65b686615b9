//! Talking to a proxy's local HTTP ports from inside its node namespace: a raw HTTP/1.1 client
//! (run with the in-namespace runner, no HTTP crate needed) for readiness, `/config_dump`,
//! `/logging` and `/metrics`, and a parser for the Prometheus text format.

use crate::apps::parse_http_response;
use crate::netns::Netns;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one HTTP/1.1 request (`Connection: close`) from inside `ns` and returns (status, body).
pub async fn http_request(
    ns: &Netns,
    method: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String)> {
    let r = http_exchange(ns, method, addr, path).await?;
    Ok((r.status, r.body))
}

/// A whole HTTP/1.x response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Like [`http_request`], returning the headers too.
pub async fn http_exchange(
    ns: &Netns,
    method: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<HttpResponse> {
    let what = format!("HTTP {method} http://{addr}{path} in netns {}", ns.name());
    let method = method.to_string();
    let path = path.to_string();
    let task = ns.spawn(move || async move {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await?;
            let mut resp = Vec::new();
            s.read_to_end(&mut resp).await?;
            let (status, body) = parse_http_response(&resp)?;
            let text = String::from_utf8_lossy(&resp);
            let head = text.split_once("\r\n\r\n").map_or("", |(h, _)| h);
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            anyhow::Ok(HttpResponse {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .context("timed out")?
    })?;
    task.join().await?.context(what)
}

/// `GET http://127.0.0.1:<port><path>` inside `ns`, failing on a non-200 status.
pub async fn get_ok(ns: &Netns, port: u16, path: &str) -> Result<String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (status, body) = http_request(ns, "GET", addr, path).await?;
    anyhow::ensure!(status == 200, "GET {addr}{path} → {status}: {body}");
    Ok(body)
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus/OpenMetrics text format (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => {
            let mut it = line.split_whitespace();
            let name = it.next()?;
            let value = it.next()?.parse().ok()?;
            return Some(Sample {
                name: name.to_string(),
                labels: BTreeMap::new(),
                value,
            });
        }
    };
    // Labels: key="value" pairs, values may contain escaped quotes and commas.
    let mut labels = BTreeMap::new();
    let bytes = rest.as_bytes();
    let mut i = 1;
    loop {
        while i < bytes.len() && (bytes[i] == b',' || bytes[i] == b' ') {
            i += 1;
        }
        if i >= bytes.len() {
            return None;
        }
        if bytes[i] == b'}' {
            i += 1;
            break;
        }
        let eq = i + rest[i..].find('=')?;
        let key = rest[i..eq].trim().to_string();
        i = eq + 1;
        if bytes.get(i) != Some(&b'"') {
            return None;
        }
        i += 1;
        let mut value = String::new();
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' && i + 1 < bytes.len() {
                i += 1;
                value.push(match bytes[i] {
                    b'n' => '\n',
                    c => c as char,
                });
            } else {
                value.push(bytes[i] as char);
            }
            i += 1;
        }
        i += 1;
        labels.insert(key, value);
    }
    let value = rest[i..].split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

/// Sum of the samples named `name` whose labels include every `(key, value)` in `filter`.
pub fn sum_metric(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            filter
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parses_labels_and_values() {
        let text = "# TYPE x counter\nistio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"a\",x=\"q\\\"t,\"} 7\nplain_total 3\n# EOF\n";
        let s = parse_metrics(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["source_workload"], "a");
        assert_eq!(s[0].labels["x"], "q\"t,");
        assert_eq!(s[0].value, 7.0);
        assert_eq!(
            sum_metric(
                &s,
                "istio_tcp_connections_opened_total",
                &[("reporter", "source")]
            ),
            7.0
        );
        assert_eq!(sum_metric(&s, "plain_total", &[]), 3.0);
    }
}
