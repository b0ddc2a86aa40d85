//! `arbiter-load` against a real server: started before the server is up, it waits for SERVING
//! instead of counting refusals, and at a concurrency below the sum of the mix weights it still
//! sends every kind of request.

use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_serving_then_sends_every_kind_of_the_mix_at_concurrency_3() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut load = Command::new(env!("CARGO_BIN_EXE_arbiter-load"));
    load.args(["--addr", &format!("http://{addr}"), "--demo", "--concurrency", "3", "--requests", "60"]).args([
        "--items",
        "2",
        "--lengths",
        "16..48",
        "--batch-tokens",
        "2048",
        "--ready-timeout",
        "120",
    ]);
    let load = tokio::task::spawn_blocking(move || load.output());
    // Nothing listens yet: the load generator must wait rather than count errors.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["serve", "--demo", "--listen", &addr, "--metrics-listen", "none", "--shutdown-linger-seconds", "0"])
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let out = load.await.unwrap().unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let server_log = std::fs::read_to_string(log.path()).unwrap();
    assert!(out.status.success(), "{stdout}\n{stderr}\nserver:\n{server_log}");
    assert!(stderr.contains("waiting for") && stderr.contains("to be SERVING"), "{stderr}");
    // The header names the requests by kind: "requests (Rank 12, Score 30, Stream 18)".
    let header = stdout.lines().next().unwrap();
    let kinds = header.split("requests (").nth(1).and_then(|r| r.split(')').next()).unwrap();
    let counts: Vec<(&str, u32)> = kinds
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.split_once(' ').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    assert_eq!(counts.iter().map(|(k, _)| *k).collect::<Vec<_>>(), ["Rank", "Score", "Stream"], "{header}");
    assert!(counts.iter().all(|(_, n)| *n > 0), "{header}");
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<u32>(), 60, "{header}");
    let row: Vec<&str> = stdout.lines().nth(2).unwrap().split('|').map(str::trim).collect();
    assert_eq!(row[11], "none", "no request failed: {stdout}");
}
