//! Generates the SentencePiece model messages from the vendored `proto/sentencepiece_model.proto`
//! with a vendored protoc (no system install needed), as proto/build.rs does for arbiter's API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    prost_build::compile_protos(&["proto/sentencepiece_model.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/sentencepiece_model.proto");
    Ok(())
}
