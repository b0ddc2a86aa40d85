//! arbiter-eval end to end: readers on files written by pyarrow and by hand, and a real server on
//! loopback with the demo model, including a run killed halfway and resumed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arbiter_eval::dataset::{read, Version};
use arbiter_server::serve::Running;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/rewardbench").join(name)
}

#[test]
fn json_jsonl_and_parquet_read_the_same_rows() {
    for v in ["tiny-v1", "tiny-v2"] {
        let (va, a) = read(&fixture(&format!("{v}.json"))).unwrap();
        let (vb, b) = read(&fixture(&format!("{v}.jsonl"))).unwrap();
        let (vc, c) = read(&fixture(&format!("{v}.parquet"))).unwrap();
        assert_eq!((va, &a), (vb, &b));
        assert_eq!((va, &a), (vc, &c), "{v}: parquet");
    }
    let (v, rows) = read(&fixture("tiny-v2.parquet")).unwrap();
    assert_eq!(v, Version::V2);
    let tied = rows.iter().find(|e| e.id == "tied:0").unwrap();
    assert_eq!((tied.num_correct, tied.candidates.len()), (3, 5));
    let (v, rows) = read(&fixture("tiny-v1.jsonl")).unwrap();
    assert_eq!((v, rows[0].id.as_str(), rows[0].candidates.len()), (Version::V1, "1000", 2));
}

#[test]
fn bad_files_name_the_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "a.jsonl",
            "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\", \"subset\": \"s\"}\n",
            "rows[0].id: missing",
        ),
        ("b.jsonl", "{\"prompt\": \"p\", \"chosen\": 3}\n", "rows[0].chosen: must be a string"),
        (
            "b2.jsonl",
            "{\"prompt\": \"p\", \"chosen\": [\"a\"], \"rejected\": [\"b\"], \"subset\": \"s\", \"id\": \"1\"}\n\
             {\"prompt\": \"p\", \"chosen\": [\"a\", 3], \"rejected\": [\"b\"], \"subset\": \"s\", \"id\": \"2\"}\n",
            "rows[1].chosen[1]: must be a string",
        ),
        (
            "g.jsonl",
            "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"subset\": \"s\", \"id\": 7}\n\
             {\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\", \"subset\": \"s\", \"id\": \"7\"}\n",
            "rows[1].id: \"7\" of subset \"s\" is also the id of rows[0]",
        ),
        ("c.json", "{\"rows\": []}", "array of rows"),
        ("d.csv", "x", "unknown extension"),
        ("e.parquet", "not parquet", "not a Parquet file"),
        (
            "f.jsonl",
            "{\"prompt\": \"p\", \"chosen\": [\"a\"], \"rejected\": [], \"subset\": \"s\", \"id\": \"1\"}\n",
            "rows[0]: needs at least one chosen and one rejected",
        ),
    ];
    for (name, body, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
    }
}

async fn serve() -> Running {
    serve_with(&[]).await
}

async fn serve_with(extra: &[&str]) -> Running {
    arbiter_testkit::serve_demo(extra).await.unwrap()
}

/// A v1 file of `n` examples whose prompts repeat a sentence `repeats(i)` times.
fn many(dir: &Path, n: usize, repeats: impl Fn(usize) -> usize) -> PathBuf {
    let data = dir.join(format!("many-{n}.jsonl"));
    let mut text = String::new();
    for i in 0..n {
        let subset = ["alpacaeval-easy", "hep-go", "donotanswer"][i % 3];
        let row = serde_json::json!({"prompt": format!("Question {i}: explain it. ").repeat(repeats(i)),
            "chosen": format!("Answer {i}, carefully."), "rejected": "No.", "subset": subset, "id": i});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(&data, text).unwrap();
    data
}

/// The report of a run, without the run's own folder in it.
fn report_of(out: &Path) -> String {
    std::fs::read_to_string(out.join("report.json")).unwrap().replace(out.to_str().unwrap(), "")
}

/// Checks a finished run's scores file: whole lines only, every one readable, one per example.
fn assert_one_whole_line_per_example(out: &Path, n: usize) {
    let text = std::fs::read_to_string(out.join("scores.jsonl")).unwrap();
    assert!(text.ends_with('\n'), "the file ends with a whole line");
    let mut keys = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {} unreadable ({e}): {line}", i + 1));
        keys.insert((v["subset"].as_str().unwrap().to_string(), v["id"].as_str().unwrap().to_string()));
    }
    assert_eq!((text.lines().count(), keys.len()), (n, n), "one line per example, none twice");
}

fn eval(server: &str, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_arbiter-eval"));
    c.args(["--server", server, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(extra);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_for_v1_and_v2_and_a_resumed_run_matches_an_uninterrupted_one() {
    let running = serve().await;
    let server = format!("http://{}", running.addr);
    let tmp = tempfile::tempdir().unwrap();

    // v1 from Parquet, with the published numbers side by side.
    let out = tmp.path().join("v1");
    let o =
        eval(&server, &fixture("tiny-v1.parquet"), &out, &["--compare", "nemotron-4-340b-reward"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["benchmark"], "RewardBench");
    assert_eq!(report["model_fingerprint"].as_str().unwrap().len(), 32);
    assert_eq!(report["subsets"].as_object().unwrap().len(), 6);
    assert_eq!(report["unknown_subsets"], serde_json::json!(["my-extra-set"]));
    assert_eq!(report["published"]["Overall"], 92.0);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| Chat Hard |") && md.contains("| 87.1 |") && md.contains("meaningless"), "{md}");
    // The report is what the scoring code computes from the saved scores.
    let saved: Vec<serde_json::Value> = std::fs::read_to_string(out.join("scores.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(saved.len(), 12);
    let items: Vec<arbiter_eval::scoring::Scored> = saved
        .iter()
        .map(|v| arbiter_eval::scoring::Scored {
            id: v["id"].as_str().unwrap().into(),
            subset: v["subset"].as_str().unwrap().into(),
            scores: v["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
            num_correct: 1,
        })
        .collect();
    let r = arbiter_eval::scoring::score_v1(&items);
    assert_eq!(report["overall"].as_f64().unwrap(), (r.overall * 1000.0).round() / 10.0);

    // v2 with a Ties subset.
    let out2 = tmp.path().join("v2");
    let o = eval(&server, &fixture("tiny-v2.jsonl"), &out2, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("report.json")).unwrap()).unwrap();
    assert_eq!(report2["benchmark"], "RewardBench 2");
    assert!(report2["subsets"]["Ties"]["examples"] == 4);

    // Resume: a 150-example file, one at a time; kill after a few are saved, run again.
    let data = many(tmp.path(), 150, |_| 8);
    let whole = tmp.path().join("whole");
    assert!(eval(&server, &data, &whole, &["--concurrency", "4"]).output().unwrap().status.success());
    let resumed = tmp.path().join("resumed");
    let mut child = eval(&server, &data, &resumed, &["--concurrency", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let n = std::fs::read_to_string(resumed.join("scores.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if n >= 5 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(child.try_wait().unwrap().is_none(), "killed while still running");
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read_to_string(resumed.join("scores.jsonl")).unwrap().lines().count();
    assert!(before < 150, "stopped halfway ({before} saved)");
    let o = eval(&server, &data, &resumed, &["--concurrency", "4"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("{before} already scored")));
    assert_eq!(report_of(&whole), report_of(&resumed), "a resumed run gives the same report");
    assert_one_whole_line_per_example(&resumed, 150);

    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_rescored_on_resume() {
    let running = serve().await;
    let server = format!("http://{}", running.addr);
    let tmp = tempfile::tempdir().unwrap();
    let data = many(tmp.path(), 10, |_| 1);
    let whole = tmp.path().join("whole");
    let o = eval(&server, &data, &whole, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(whole.join("scores.jsonl")).unwrap();
    let last_start = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    // What a kill between the JSON and its newline left (before each line was one write), and
    // what a kill in the middle of a write leaves.
    let cases =
        [("complete-json-no-newline", text.len() - 1), ("half-a-line", last_start + (text.len() - last_start) / 2)];
    for (name, keep) in cases {
        let out = tmp.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("scores.jsonl"), &text[..keep]).unwrap();
        let o = eval(&server, &data, &out, &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {stderr}");
        assert!(stderr.contains(&format!("{} bytes without a newline", keep - last_start)), "{name}: {stderr}");
        assert!(stderr.contains("9 already scored"), "{name}: {stderr}");
        assert_one_whole_line_per_example(&out, 10);
        assert_eq!(report_of(&whole), report_of(&out), "{name}");
    }
    running.stop();
    running.wait().await.unwrap();
}

/// A small xorshift generator: the kill moments differ from run to run (the seed is printed to
/// replay a failure) without a dependency for it.
fn next_unit(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_at_random_moments_lose_no_example_and_score_none_twice() {
    let running = serve().await;
    let server = format!("http://{}", running.addr);
    let tmp = tempfile::tempdir().unwrap();
    // Small enough for a whole run to take a second or two: the kills land at random moments
    // within one, so the test takes about ten runs' time.
    let n = 8;
    let data = many(tmp.path(), n, |_| 1);
    let whole = tmp.path().join("whole");
    let t = Instant::now();
    assert!(eval(&server, &data, &whole, &["--concurrency", "4"]).output().unwrap().status.success());
    let full_run = t.elapsed();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill moments seeded with {seed}; one uninterrupted run takes {full_run:?}");
    let mut rng = seed;
    // Rounds: kill runs of one output folder at random moments until one finishes on its own,
    // check it, start a new folder; until 20 kills have landed on running processes.
    let (mut kills, mut round) = (0, 0);
    let started = Instant::now();
    while kills < 20 {
        let out = tmp.path().join(format!("round-{round}"));
        loop {
            let mut child = eval(&server, &data, &out, &["--concurrency", "4"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            tokio::time::sleep(full_run.mul_f64(next_unit(&mut rng))).await;
            if child.try_wait().unwrap().is_some() || kills >= 20 {
                let o = child.wait_with_output().unwrap();
                assert!(o.status.success(), "round {round}: {}", String::from_utf8_lossy(&o.stderr));
                break;
            }
            // SIGKILL to the child's PID, as `kill -9` sends: no chance to finish a write.
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
        }
        assert_one_whole_line_per_example(&out, n);
        assert_eq!(report_of(&whole), report_of(&out), "round {round} (seed {seed})");
        round += 1;
        // Kills land within a run's time, so rounds end; this only stops a test that hangs.
        let limit = full_run * 40 + Duration::from_secs(60);
        assert!(started.elapsed() < limit, "{kills} kills in {round} rounds took over {limit:?}");
    }
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_examples_are_cut_and_counted_and_failures_need_partial_for_a_report() {
    let running = serve_with(&["--max-input-tokens", "160"]).await;
    let server = format!("http://{}", running.addr);
    let tmp = tempfile::tempdir().unwrap();
    // Every fourth prompt is far over 160 tokens (the others about 95), in a single user turn:
    // no whole turn to drop.
    let data = many(tmp.path(), 12, |i| if i % 4 == 0 { 40 } else { 1 });

    let cut = tmp.path().join("cut");
    let o = eval(&server, &data, &cut, &["--progress-seconds", "0.01"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("3 examples were longer than the model's 160 tokens and cut (truncate_content)"),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        (&report["examples"], &report["examples_in_data"], &report["partial"], &report["truncated_examples"]),
        (&serde_json::json!(12), &serde_json::json!(12), &serde_json::json!(false), &serde_json::json!(3))
    );
    let flagged: Vec<String> = std::fs::read_to_string(cut.join("scores.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["truncated"] == true)
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(flagged, ["0", "4", "8"]);

    // Dropping whole turns cannot shorten a single-turn example: those fail, and the run gives
    // no report unless a partial one is asked for.
    let turns = tmp.path().join("turns");
    let o = eval(&server, &data, &turns, &["--truncation", "truncate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 of 12 examples have no score") && stderr.contains("--partial"), "{stderr}");
    assert!(!turns.join("report.json").exists());
    let o = eval(&server, &data, &turns, &["--truncation", "truncate", "--partial"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(turns.join("report.json")).unwrap()).unwrap();
    assert_eq!((&report["examples"], &report["partial"]), (&serde_json::json!(9), &serde_json::json!(true)));
    assert!(std::fs::read_to_string(turns.join("report.md")).unwrap().contains("Partial report: 9 of the 12"));
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_when_stderr_is_not_a_terminal() {
    let running = serve().await;
    let server = format!("http://{}", running.addr);
    let tmp = tempfile::tempdir().unwrap();
    let data = many(tmp.path(), 12, |_| 1);
    let out = tmp.path().join("out");
    let o = eval(&server, &data, &out, &["--concurrency", "1", "--progress-seconds", "0.02"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(" examples, ") && l.contains("/s, ETA ")).collect();
    assert!(!lines.is_empty(), "no progress line: {stderr}");
    for l in lines {
        let done: usize = l.strip_prefix("arbiter-eval: ").unwrap().split('/').next().unwrap().parse().unwrap();
        assert!(done <= 12 && l.contains("/12 examples"), "{l}");
    }
    running.stop();
    running.wait().await.unwrap();
}

#[test]
fn no_server_says_so_with_the_cause_and_no_debug_dump() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let server = format!("http://127.0.0.1:{port}");
    let o = eval(&server, &fixture("tiny-v1.jsonl"), &tmp.path().join("out"), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to {server}: transport error")), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("Error(") && !stderr.contains("ConnectError") && !stderr.contains("tonic::"), "{stderr}");
}
