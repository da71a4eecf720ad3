//! Generated protobuf and gRPC code, and the encoded descriptor set that reflection serves.
//! Nothing else lives here: conversions between these types and the domain live in each
//! service's `grpc.rs`.
#![allow(clippy::all, missing_docs)]

/// `roster.v1`: messages, enums, clients and servers.
pub mod v1 {
    tonic::include_proto!("roster.v1");
}

/// The encoded `FileDescriptorSet` of every proto file (incl. imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("roster_descriptor");
