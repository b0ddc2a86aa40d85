//! Generates the arbiter.v1 messages and stubs with a vendored protoc (no system install needed),
//! and the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("arbiter_descriptor.bin"))
        // Undecodable requests are the caller's fault: INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::codec::ArbiterCodec")
        .compile_protos(&["arbiter/v1/arbiter.proto"], &["."])?;
    println!("cargo:rerun-if-changed=arbiter/v1/arbiter.proto");
    Ok(())
}
