//! Compiles `proto/` with protox (no system protoc) into a descriptor set, which feeds both
//! tonic's code generation and the reflection service.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "roster/v1/common.proto",
        "roster/v1/user.proto",
        "roster/v1/authenticator.proto",
        "roster/v1/identity.proto",
        "roster/v1/log.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("roster_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .generate_default_stubs(true)
        // Undecodable requests answer INVALID_ARGUMENT, not tonic's INTERNAL (src/codec.rs).
        .codec_path("crate::codec::RosterCodec")
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_fds(fds)?;
    Ok(())
}
