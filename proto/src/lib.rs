//! arbiter's gRPC API, package `arbiter.v1`, generated from `proto/arbiter/v1/arbiter.proto`.
#![allow(missing_docs)] // generated code; the .proto file documents every message and field

pub mod codec;

/// Generated messages, client and server of `arbiter.v1`.
pub mod v1 {
    tonic::include_proto!("arbiter.v1");

    /// Encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("arbiter_descriptor");
}
