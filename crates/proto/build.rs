//! Compiles `proto/**/*.proto` with protox (pure Rust, so a fresh machine or a
//! Docker build needs no `protoc`) and writes the file descriptor set that
//! server reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &["shoal/worker/v1/worker.proto", "shoal/aggregator/v1/aggregator.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    // The sources live at the repository root (`proto/`); a copy inside the
    // crate is used when the crate is built on its own (e.g. packaged).
    let root = [manifest.join("../../proto"), manifest.join("proto")]
        .into_iter()
        .find(|p| p.is_dir())
        .ok_or("proto sources not found (expected ../../proto)")?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("shoal_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
