//! Helpers shared by the integration tests (`mod support;` in each test file): a real OCI
//! registry ([`registry`]), Wasm images in every format ([`image`]), test modules ([`wasm`]), a real
//! Envoy with a generated ECDS bootstrap ([`envoy`]), fault-injecting HTTP servers and a mock OCI
//! registry ([`faults`]), an upstream xDS server that is not wasm-ecds ([`upstream`]), an in-test
//! CA ([`pki`]) and locating external tools.
//!
//! External tools (style guide §5 "Real-Envoy and real-registry tests stay separate"):
//! - `docker-registry`: `$REGISTRY_BIN`, else on `PATH`, else `/usr/bin/docker-registry`;
//! - Envoy: `$ENVOY_BIN`, else `<crate>/.tools/envoy/envoy/_bin/envoy`, else `envoy` on `PATH`;
//! - the upstream xDS server's Python (grpcio, xds-protos): `$UPSTREAM_PYTHON`, else
//!   `${WASM_ECDS_CACHE:-/var/cache/wasm-ecds}/py-upstream/bin/python`.
//!
//! `scripts/install-test-deps.sh` installs all three. When one is missing, tests print a loud SKIP
//! message and pass, except under `CI=true` where they panic.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

pub mod envoy;
pub mod faults;
pub mod image;
pub mod kube;
pub mod pki;
pub mod proxied;
pub mod registry;
pub mod serve;
pub mod upstream;
pub mod wasm;

use std::io::Write;
use std::path::PathBuf;

pub use image::ImageFormat;
pub use registry::{docker_config_json, Pushed, Registry, RegistryOptions, RegistryResponse};
pub use wasm::{proxy_wasm_test_module, proxy_wasm_test_module_tagged, wasm_module};

/// True under `CI=true` (or `CI=1`): missing tools fail the tests instead of skipping them.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Prints a SKIP line straight to stderr: libtest captures `eprintln!`, not direct writes, so the
/// message shows even for passing tests.
pub fn skip(message: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP: {message} (under CI=true this fails the test) ***\n"
    );
}

/// `Some(path)` when the tool was found; otherwise SKIP (`None`), or panic under `CI=true`.
pub fn require_tool(name: &str, found: Option<PathBuf>, hint: &str) -> Option<PathBuf> {
    match found {
        Some(path) => Some(path),
        None if in_ci() => panic!("{name} not found and CI=true: {hint}"),
        None => {
            skip(&format!("{name} not found: {hint}"));
            None
        }
    }
}

/// The first executable file called `name` in `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Envoy: `$ENVOY_BIN`, else `.tools/envoy/envoy/_bin/envoy` in the crate (where
/// `scripts/install-test-deps.sh` puts it), else `envoy` on `PATH`.
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ENVOY_BIN={} does not exist", p.display());
        return Some(p);
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/envoy/envoy/_bin/envoy");
    if tools.is_file() {
        return Some(tools);
    }
    find_on_path("envoy")
}

/// [`envoy_bin`], or SKIP / panic under `CI=true` (see [`require_tool`]).
pub fn require_envoy() -> Option<PathBuf> {
    require_tool(
        "envoy",
        envoy_bin(),
        "set ENVOY_BIN or run scripts/install-test-deps.sh",
    )
}

/// A response read whole (test helper; the server's fetchers stream instead).
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Lowercase names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Reads a hyper response whole; errors name `what` (e.g. `GET <url>`).
    pub async fn read(
        response: hyper::Response<hyper::body::Incoming>,
        what: &str,
    ) -> Result<Self, String> {
        use http_body_util::BodyExt as _;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{what}: body: {e}"))?
            .to_bytes();
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        })
    }
}

/// The next response of an xDS stream within `wait`, or the status that ended it (`OK` when it
/// ended without one): the refusals the bounds tests expect.
pub async fn next_or_status(
    s: &mut wasm_ecds::xds::client::SotwSession,
    wait: std::time::Duration,
) -> Result<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse, tonic::Status> {
    match tokio::time::timeout(wait, s.recv())
        .await
        .expect("a response or a status")
    {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(tonic::Status::ok("stream ended")),
        Err(wasm_ecds::xds::Error::Status(status)) => Err(status),
        Err(e) => panic!("unexpected error: {e}"),
    }
}
