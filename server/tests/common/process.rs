//! `arbiter serve` as a separate process, as operators run it, and a Prometheus text reader.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;

/// A running `arbiter serve` process; killed on drop if still running.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub log: tempfile::NamedTempFile,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl ServerProcess {
    /// Starts `arbiter serve --demo` on free loopback ports with `extra` flags.
    pub fn spawn(extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .args(["serve", "--demo", "--listen", &addr.to_string(), "--metrics-listen", &metrics.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("arbiter serve starts");
        ServerProcess { child, addr, metrics, log }
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(t.elapsed() < limit, "server did not exit within {limit:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The health status of `service` ("" for the whole server), or None if unreachable.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_millis(200))
            .connect()
            .await
            .ok()?;
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let r = h.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.ok()?;
        ServingStatus::try_from(r.into_inner().status).ok()
    }

    /// Polls health every 10 ms until SERVING; returns every distinct status seen on the way.
    pub async fn wait_serving(&self) -> Vec<ServingStatus> {
        let t = Instant::now();
        let mut seen = Vec::new();
        loop {
            if let Some(s) = self.health("arbiter.v1.RewardService").await {
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
                if s == ServingStatus::Serving {
                    return seen;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(120), "not SERVING in time; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// GET /metrics.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.expect("metrics port answers");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (0.0.4) strictly: every line must be a comment, blank, or
/// a well-formed sample; HELP/TYPE lines must name valid metric names and types.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let mut samples = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", no + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(n), _) if valid_name(n) => {}
                (Some("TYPE"), Some(n), Some(t))
                    if valid_name(n) && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) => {}
                _ => return Err(err("bad comment line")),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(err("no value")),
        };
        if !valid_name(name) {
            return Err(err("bad metric name"));
        }
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| err("unclosed labels"))?;
            let mut chars = body[..end].chars().peekable();
            while chars.peek().is_some() {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                if !valid_name(&key) || chars.next() != Some('"') {
                    return Err(err("bad label"));
                }
                let mut val = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => val.push(chars.next().ok_or_else(|| err("bad escape"))?),
                        Some('"') => break,
                        Some(c) => val.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                }
                labels.insert(key, val);
                if chars.peek() == Some(&',') {
                    chars.next();
                }
            }
            &body[end + 1..]
        } else {
            rest
        };
        let value = rest.split_whitespace().next().ok_or_else(|| err("no value"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| err("bad value"))?,
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

/// The value of the sample `name` whose labels include all of `labels` (0 if absent).
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}
