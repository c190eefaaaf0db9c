//! Assembles WebAssembly text into a binary:
//! `cargo run --manifest-path examples/envoy/wat2wasm/Cargo.toml -- IN.wat OUT.wasm`.
//!
//! A few lines around the `wat` crate (the assembler the tests use), in a package of its own, so
//! that the Envoy example (`examples/envoy/run.sh`) builds its proxy-wasm module from
//! `examples/envoy/module.wat` without a Wasm toolchain, without anything of `wasm-ecds` itself and
//! without compiling `wasm-ecds`' dev-dependencies. Exit status 2 on bad usage, 1 when the text
//! does not assemble or the output cannot be written.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: wat2wasm IN.wat OUT.wasm");
        return ExitCode::from(2);
    };
    let wasm = match wat::parse_file(input) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {}: {e}", input.display());
            return ExitCode::from(1);
        }
    };
    if let Err(e) = std::fs::write(output, &wasm) {
        eprintln!("error: {}: {e}", output.display());
        return ExitCode::from(1);
    }
    eprintln!(
        "wat2wasm: {} -> {} ({} bytes)",
        input.display(),
        output.display(),
        wasm.len()
    );
    ExitCode::SUCCESS
}
