//! Compiles every `.proto` under the repository's `proto/` with protox (a pure-Rust protobuf
//! compiler), so a fresh machine needs nothing but cargo: no `protoc` binary.
//!
//! Besides the Rust code it writes the encoded `FileDescriptorSet` that server reflection
//! serves, so `grpcurl` and `buf curl` work against a running service with no proto at hand.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "stagedoor/queue/v1/queue.proto",
        "stagedoor/concert/v1/concert.proto",
        "stagedoor/point/v1/point.proto",
        "stagedoor/payment/v1/payment.proto",
    ];
    // Rebuild when any contract changes, and only then.
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let descriptors = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("stagedoor_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec with smaller buffers (see `stagedoor_proto::codec`).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
