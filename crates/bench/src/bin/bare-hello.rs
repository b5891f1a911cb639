//! `bare-hello`: the bare axum baseline for `scripts/bench gateway`.
//!
//! ```text
//! bare-hello --addr 127.0.0.1:0
//! ```
//! Prints `{"message":"listening","http_addr":"…"}` once bound, and exits on
//! SIGTERM or SIGINT.

use std::net::SocketAddr;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// The bare axum hello server (no middleware).
#[derive(Parser)]
#[command(name = "bare-hello", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("{}", serde_json::json!({"message": "listening", "http_addr": listener.local_addr()?.to_string()}));
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    shoal_bench::hello::serve(listener, shutdown).await?;
    Ok(())
}
