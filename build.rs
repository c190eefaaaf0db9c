//! Generates the `wasm_ecds.v1.Admin` gRPC service (server and client) from `proto/`: protox
//! parses the files into a descriptor set (no system `protoc`), tonic's prost codegen writes the
//! Rust into OUT_DIR, included by `src/xds/admin.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/wasm_ecds/v1/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
