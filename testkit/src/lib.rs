//! Test support, never linked into a shipped binary: a real server on a loopback port,
//! in-process, for the end-to-end tests of the server and of the clients.
#![deny(missing_docs)]

use std::time::{Duration, Instant};

use clap::Parser;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub use arbiter_server::serve::Running;
use arbiter_server::serve::{start, ServeArgs, SERVICE_NAME};

/// Why the demo server did not come up.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
struct ArgsOnly {
    #[command(flatten)]
    args: ServeArgs,
}

/// Starts `arbiter serve --demo` on 127.0.0.1:0 without metrics, with a 2048-token batch budget,
/// no shutdown linger, and the `extra` flags (which may override those); returns once the health
/// service says SERVING.
pub async fn serve_demo(extra: &[&str]) -> Result<Running, Error> {
    let mut argv = vec!["arbiter", "--demo", "--listen", "127.0.0.1:0", "--metrics-listen", "none"];
    argv.extend_from_slice(&["--max-batch-tokens", "2048", "--shutdown-linger-seconds", "0"]);
    argv.extend_from_slice(extra);
    let args = ArgsOnly::try_parse_from(argv)?.args;
    let running = start(args).await?;
    let endpoint = format!("http://{}", running.addr);
    let t = Instant::now();
    loop {
        if let Ok(ch) = tonic::transport::Channel::from_shared(endpoint.clone())?.connect().await {
            let status = HealthClient::new(ch)
                .check(HealthCheckRequest { service: SERVICE_NAME.into() })
                .await
                .map(|r| r.into_inner().status);
            if status.ok() == Some(ServingStatus::Serving as i32) {
                return Ok(running);
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the server did not become SERVING in 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
