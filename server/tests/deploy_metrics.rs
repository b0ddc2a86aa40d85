//! deploy/'s alert rules and Grafana dashboards against a live server: every metric name their
//! PromQL expressions use appears in a real `/metrics` scrape after real requests. The names come
//! from parsing the files (rule files' `expr:` values, dashboards' query targets and variable
//! queries), never from a list kept here.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbiter_proto::v1 as pb;
use common::process::{parse_prometheus, ServerProcess};
use common::*;
use tonic::Code;

/// Series Prometheus writes itself for every target, so no scrape contains them.
const PER_TARGET_SERIES: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_series_added",
    "scrape_samples_post_metric_relabeling",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Files in `dir` whose name ends with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `expr:` values of a Prometheus rules file. Reads the YAML that rule files are written in:
/// block scalars (`|`, `>`, with chomping indicators) and one-line plain, single- or double-quoted
/// scalars; anything else (a plain scalar continued on the next line) is an error, so an
/// expression can never be read short.
fn rule_exprs(text: &str) -> Result<Vec<String>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start().trim_start_matches("- ");
        let Some(value) = body.strip_prefix("expr:") else { continue };
        let key_indent = line.len() - body.len();
        let value = value.trim();
        let continued: Vec<&str> =
            lines[i + 1..].iter().take_while(|l| l.trim().is_empty() || indent(l) > key_indent).copied().collect();
        let expr = if value.starts_with('|') || value.starts_with('>') {
            continued.iter().map(|l| l.trim()).collect::<Vec<_>>().join("\n")
        } else if continued.iter().any(|l| !l.trim().is_empty()) {
            return Err(format!(
                "line {}: a multi-line plain scalar; write the expression as a block (expr: |)",
                i + 1
            ));
        } else if value.starts_with('"') {
            serde_json::from_str::<String>(value).map_err(|e| format!("line {}: {e}", i + 1))?
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.replace("''", "'")
        } else {
            value.to_string()
        };
        if expr.trim().is_empty() {
            return Err(format!("line {}: empty expression", i + 1));
        }
        out.push(expr);
    }
    Ok(out)
}

/// Every PromQL expression of a Grafana dashboard: panel targets (rows' nested panels too) and
/// the selector of `label_values(selector, label)` variable queries.
fn dashboard_exprs(dash: &serde_json::Value) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .ok_or_else(|| format!("variable {}: not a label_values(selector, label) query: {q}", v["name"]))?;
        out.push((format!("variable {}", v["name"]), inner.0.to_string()));
    }
    let mut panels: Vec<&serde_json::Value> = dash["panels"].as_array().into_iter().flatten().collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().ok_or_else(|| format!("panel {}: a target without expr", p["title"]))?;
            out.push((format!("panel {} {}", p["title"], t["refId"]), expr.to_string()));
        }
    }
    Ok(out)
}

/// PromQL words that are never metric names: aggregation operators, binary set operators and
/// modifiers (functions are recognised by the parenthesis that follows them).
const NOT_METRICS: [&str; 22] = [
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
];
/// Modifiers followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Skips a quoted string starting at `i` (the quote); returns the index after its closing quote.
fn skip_string(s: &[char], i: usize) -> Result<usize, String> {
    let q = s[i];
    let mut j = i + 1;
    while j < s.len() && s[j] != q {
        j += if s[j] == '\\' && q != '`' { 2 } else { 1 };
    }
    if j >= s.len() {
        return Err("unterminated string".into());
    }
    Ok(j + 1)
}

/// The index of the bracket closing the one at `i`, skipping strings inside.
fn closing(s: &[char], i: usize) -> Result<usize, String> {
    let (open, close) = (
        s[i],
        match s[i] {
            '(' => ')',
            '[' => ']',
            _ => '}',
        },
    );
    let mut depth = 0;
    let mut j = i;
    while j < s.len() {
        match s[j] {
            '"' | '\'' | '`' => {
                j = skip_string(s, j)?;
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j);
                }
            }
            _ => {}
        }
        j += 1;
    }
    Err(format!("unclosed {open}"))
}

/// Metric names an expression reads: bare selectors (`name` or `name{...}`), and `__name__="..."`
/// matchers. Label names (in braces and in by/on/... lists), functions, keywords, numbers,
/// durations and strings are skipped. Unbalanced brackets are an error rather than a guess.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let s: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let (mut i, mut depth) = (0, 0i32);
    let next_non_space = |mut j: usize| {
        while j < s.len() && s[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < s.len() {
        let c = s[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&s, i)?;
        } else if c == '#' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '[' {
            i = closing(&s, i)? + 1;
        } else if c == '{' {
            let end = closing(&s, i)?;
            let body: String = s[i + 1..end].iter().collect();
            if let Some(rest) = body.split_once("__name__").map(|(_, r)| r.trim_start()) {
                let value = rest.strip_prefix('=').map(str::trim_start).and_then(|r| r.strip_prefix('"'));
                let name = value.and_then(|v| v.split_once('"')).map(|(n, _)| n.to_string());
                out.insert(name.ok_or_else(|| format!("only __name__=\"...\" matchers are read: {body}"))?);
            }
            i = end + 1;
        } else if c.is_ascii_digit() || c == '.' {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let after = next_non_space(i);
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if after < s.len() && s[after] == '(' {
                    i = closing(&s, after)? + 1;
                }
            } else if NOT_METRICS.contains(&lower.as_str()) || (after < s.len() && s[after] == '(') {
                // An operator, a keyword or a function call.
            } else {
                out.insert(word);
            }
        } else {
            depth += match c {
                '(' => 1,
                ')' => -1,
                _ => 0,
            };
            if depth < 0 {
                return Err("unbalanced )".into());
            }
            i += 1;
        }
    }
    if depth != 0 {
        return Err("unclosed (".into());
    }
    Ok(out)
}

/// Metric name -> where deploy/ uses it, from every rules file and dashboard.
fn used_metrics() -> BTreeMap<String, Vec<String>> {
    let mut exprs = Vec::new();
    for f in files(&deploy_dir().join("prometheus"), ".yml") {
        let text = std::fs::read_to_string(&f).unwrap();
        if !text.lines().any(|l| l.starts_with("groups:")) {
            continue; // the scrape config and the rules' unit tests
        }
        let found = rule_exprs(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let rules = text
            .lines()
            .map(|l| l.trim_start().trim_start_matches("- "))
            .filter(|l| l.starts_with("alert:") || l.starts_with("record:"))
            .count();
        assert_eq!(found.len(), rules, "{}: one expr per rule", f.display());
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        exprs.extend(found.into_iter().enumerate().map(|(i, e)| (format!("{name} rule {i}"), e)));
    }
    for f in files(&deploy_dir().join("grafana"), ".json") {
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let found = dashboard_exprs(&dash).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!found.is_empty(), "{name} has queries");
        exprs.extend(found.into_iter().map(|(w, e)| (format!("{name} {w}"), e)));
    }
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (where_, e) in exprs {
        let names = metric_names(&e).unwrap_or_else(|err| panic!("{where_}: {err}: {e}"));
        assert!(!names.is_empty(), "{where_} reads no metric: {e}");
        for n in names {
            used.entry(n).or_default().push(where_.clone());
        }
    }
    used
}

#[test]
fn metric_names_skip_labels_functions_keywords_and_strings() {
    let names = |e: &str| metric_names(e).unwrap().into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, rpc) (rate(arbiter_request_seconds_bucket{job="arbiter", rpc!~"A|B"}[$__rate_interval])))"#
        ),
        ["arbiter_request_seconds_bucket"]
    );
    assert_eq!(
        names("count by (namespace) (up{role!=\"worker\"})\nunless on (namespace)\ncount by (namespace) (arbiter_ready == 1)"),
        ["arbiter_ready", "up"]
    );
    assert_eq!(names(r#"absent(up{job="a {b}"}) or vector(0) > bool 1"#), ["up"]);
    assert_eq!(names("a_total offset 5m / ignoring(code) group_left(version) b_info"), ["a_total", "b_info"]);
    assert_eq!(names(r#"sum without (pod) (rate({__name__="x_total", a="1"}[5m])) * 1e3"#), ["x_total"]);
    assert_eq!(names("max(x) by (pod)"), ["x"], "a trailing by list");
    assert!(metric_names("sum(rate(x[5m])").is_err(), "an unclosed parenthesis is not silently accepted");
}

#[test]
fn rule_exprs_read_every_scalar_style_or_refuse() {
    let text = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          sum(a)\n          > 1\n        for: 5m\n      - record: b:c\n        expr: \"rate(b[5m])\"\n      - alert: C\n        expr: 'c{x=''y''} == 0'\n      - alert: D\n        expr: d > 1\n";
    assert_eq!(rule_exprs(text).unwrap(), ["sum(a)\n> 1", "rate(b[5m])", "c{x='y'} == 0", "d > 1"]);
    let continued = "groups:\n  - rules:\n      - alert: A\n        expr: sum(a)\n          > 1\n";
    assert!(rule_exprs(continued).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_dashboards_use_is_in_a_live_scrape() {
    let used = used_metrics();
    assert!(used.keys().filter(|n| n.starts_with("arbiter_")).count() >= 10, "the files were read: {used:?}");

    let server = ServerProcess::spawn(&["--max-batch-tokens", "1024"]);
    server.wait_serving().await;
    let mut c = client(server.addr).await;
    let item = || conv_item(&[("user", "What is 2+2?"), ("assistant", "4")]);
    for n in 1..=3 {
        assert_eq!(c.score(score_req(vec![item(); n])).await.unwrap().into_inner().results.len(), n);
    }
    let rank = pb::RankRequest {
        prompt: Some(conv(&[("user", "Name a colour.")])),
        candidates: vec!["Blue.".into(), "Seven.".into()],
        ..Default::default()
    };
    assert_eq!(c.rank(rank).await.unwrap().into_inner().results.len(), 2);
    let stream: Vec<pb::ScoreStreamRequest> = (0..2)
        .map(|i| pb::ScoreStreamRequest { request_id: i.to_string(), request: Some(score_req(vec![item()])) })
        .collect();
    let mut s = c.score_stream(tokio_stream::iter(stream)).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
    c.tokenize(pb::TokenizeRequest { item: Some(item()), truncation: 0 }).await.unwrap();
    c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap();
    assert_eq!(c.score(score_req(vec![])).await.unwrap_err().code(), Code::InvalidArgument);

    // The batcher records its histograms right after the reply is sent: poll briefly.
    let t = Instant::now();
    let missing = loop {
        let text = server.scrape().await;
        let samples = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let scraped: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        let missing: Vec<(&String, &Vec<String>)> = used
            .iter()
            .filter(|(n, _)| !scraped.contains(n.as_str()) && !PER_TARGET_SERIES.contains(&n.as_str()))
            .collect();
        if missing.is_empty() || t.elapsed() > Duration::from_secs(5) {
            break missing.into_iter().map(|(n, w)| format!("{n} (used by {})", w.join(", "))).collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(missing.is_empty(), "metrics used in deploy/ but absent from the scrape:\n{}", missing.join("\n"));
}
