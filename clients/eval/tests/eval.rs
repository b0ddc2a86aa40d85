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
            "row 0: missing field \"id\"",
        ),
        ("b.jsonl", "{\"prompt\": \"p\", \"chosen\": 3}\n", "\"chosen\" must be a string"),
        ("c.json", "{\"rows\": []}", "array of rows"),
        ("d.csv", "x", "unknown extension"),
        ("e.parquet", "not parquet", "not a Parquet file"),
        (
            "f.jsonl",
            "{\"prompt\": \"p\", \"chosen\": [\"a\"], \"rejected\": [], \"subset\": \"s\", \"id\": \"1\"}\n",
            "at least one chosen and one rejected",
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
    arbiter_server::testing::serve_demo(&[]).await.unwrap()
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
    let data = tmp.path().join("many.jsonl");
    let mut text = String::new();
    for i in 0..150 {
        let subset = ["alpacaeval-easy", "hep-go", "donotanswer"][i % 3];
        let row = serde_json::json!({"prompt": format!("Question {i}: explain it. ").repeat(8), "chosen": format!("Answer {i}, carefully."),
            "rejected": "No.", "subset": subset, "id": i});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(&data, text).unwrap();
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
    let a = std::fs::read_to_string(whole.join("report.json")).unwrap().replace(whole.to_str().unwrap(), "");
    let b = std::fs::read_to_string(resumed.join("report.json")).unwrap().replace(resumed.to_str().unwrap(), "");
    assert_eq!(a, b, "a resumed run gives the same report");
    assert_eq!(
        std::fs::read_to_string(resumed.join("scores.jsonl")).unwrap().lines().count(),
        150,
        "nothing scored twice"
    );

    running.stop();
    running.wait().await.unwrap();
}
