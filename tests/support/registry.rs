//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8), started on a
//! free loopback port with its own storage directory, optionally with Basic auth (bcrypt htpasswd)
//! and TLS (a self-signed certificate for 127.0.0.1), killed when dropped. Images are pushed with
//! plain OCI Distribution calls over hyper (guides/oci-registry.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use wasm_ecds::config::Config;
use wasm_ecds::fetch::hyper_transport::HyperTransport;

use super::image::{build_image, build_index, sha256_digest, Image, ImageFormat, OCI_INDEX};
use super::wasm::wasm_module;
use super::{find_on_path, require_tool};

/// Readiness polls: every 50 ms, at most this many (30 s) before the test fails.
const READY_POLLS: u32 = 600;
const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// One push or get request; generous, it only turns a hung registry into a failed test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A free port can be taken by someone else between our probe and the registry's bind.
const START_ATTEMPTS: u32 = 3;

/// How to run the registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Basic auth with one user (bcrypt htpasswd).
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS with a self-signed certificate for 127.0.0.1.
    pub tls: bool,
}

impl RegistryOptions {
    /// Plain HTTP, anonymous.
    pub fn plain() -> Self {
        RegistryOptions::default()
    }

    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic_auth = Some((user.to_string(), password.to_string()));
        self
    }

    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// The registry binary: `$REGISTRY_BIN`, else `docker-registry` on `PATH`, else
/// `/usr/bin/docker-registry`. `None` when none exists (see [`Registry::start`]).
pub fn registry_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REGISTRY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "REGISTRY_BIN={} does not exist", p.display());
        return Some(p);
    }
    find_on_path("docker-registry").or_else(|| {
        let p = PathBuf::from("/usr/bin/docker-registry");
        p.is_file().then_some(p)
    })
}

/// A registry's answer, read whole.
pub type RegistryResponse = super::HttpResponse;

/// What [`Registry::push`] stored.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub format: ImageFormat,
    pub repo: String,
    pub tag: String,
    /// `sha256:…` of the manifest the tag points to (the index for [`ImageFormat::Index`]);
    /// equal to the registry's `Docker-Content-Digest`.
    pub digest: String,
    /// Media type of that manifest.
    pub media_type: &'static str,
    /// The image manifest holding the module: `digest`, or the `linux/amd64` child of an index.
    pub image_digest: String,
    /// The blob holding the module (a tar.gz or the raw module).
    pub module_layer: String,
    /// Hex sha256 of the Wasm module.
    pub wasm_sha256: String,
    /// Every blob of the module's image (config and layers), without repeats.
    pub blobs: Vec<String>,
}

/// A running registry; killed on drop.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    cert: Option<CertificateDer<'static>>,
    credentials: Option<(String, String)>,
    client: PushClient,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base_url", &self.base_url())
            .field("auth", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry and waits until `GET /v2/` answers (200, or 401 with auth).
    ///
    /// Returns `None`, after a loud SKIP message, when no binary is found, except under `CI=true`
    /// where that panics. Panics when the registry does not come up.
    pub async fn start(opts: RegistryOptions) -> Option<Registry> {
        let bin = require_tool(
            "docker-registry",
            registry_bin(),
            "set REGISTRY_BIN or run scripts/install-test-deps.sh as root",
        )?;
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&bin, &opts).await {
                Ok(registry) => return Some(registry),
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("docker-registry did not start; its log:\n{log}"),
            }
        }
        panic!("docker-registry could not bind a free port; its log:\n{last_log}");
    }

    /// `Err(log)` when the process exits before it is ready.
    async fn try_start(bin: &Path, opts: &RegistryOptions) -> Result<Registry, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("storage dir");

        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: not-a-secret\n",
            storage.display()
        );
        let mut cert = None;
        if opts.tls {
            let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
                .expect("self-signed certificate");
            let cert_path = dir.path().join("cert.pem");
            let key_path = dir.path().join("key.pem");
            fs::write(&cert_path, key.cert.pem()).expect("write cert.pem");
            fs::write(&key_path, key.signing_key.serialize_pem()).expect("write key.pem");
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert_path.display(),
                key_path.display()
            ));
            cert = Some(key.cert.der().clone());
        }
        if let Some((user, password)) = &opts.basic_auth {
            // The cheapest bcrypt cost; `$2y$` is what `htpasswd -B` writes.
            let hash = bcrypt::hash_with_result(password, 4)
                .expect("bcrypt")
                .format_for_version(bcrypt::Version::TwoY);
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("write htpasswd");
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, yaml).expect("write config.yml");

        let log_path = dir.path().join("registry.log");
        let log = fs::File::create(&log_path).expect("registry log");
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        // distribution reads REGISTRY_* variables as configuration overrides (REGISTRY_BIN too).
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(name);
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));

        let client = PushClient::new(
            format!(
                "{}://127.0.0.1:{port}",
                if opts.tls { "https" } else { "http" }
            ),
            cert.clone(),
            opts.basic_auth.clone(),
        );
        let mut registry = Registry {
            child,
            dir,
            port,
            cert,
            credentials: opts.basic_auth.clone(),
            client,
        };
        for _ in 0..READY_POLLS {
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Err(format!("(exited with {status})\n{}", registry.log()));
            }
            if let Ok(Ok(resp)) = tokio::time::timeout(
                Duration::from_secs(5),
                registry.client.send("GET", "/v2/", &[], Vec::new()),
            )
            .await
            {
                if resp.status == 200 || resp.status == 401 {
                    return Ok(registry);
                }
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
        panic!(
            "docker-registry on port {port} not ready after {:?}; its log:\n{}",
            READY_POLL_INTERVAL * READY_POLLS,
            registry.log()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`: the registry part of `oci://` URLs and the key of a docker config.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_tls(&self) -> bool {
        self.cert.is_some()
    }

    /// `http://127.0.0.1:<port>` or `https://…`.
    pub fn base_url(&self) -> String {
        self.client.base.clone()
    }

    /// `oci://127.0.0.1:<port>/<repo>:<tag>`, or `…/<repo>@sha256:…` when `reference` is a digest.
    pub fn oci_url(&self, repo: &str, reference: &str) -> String {
        let sep = if reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        format!("oci://{}/{repo}{sep}{reference}", self.host())
    }

    /// The self-signed certificate of a TLS registry.
    pub fn certificate(&self) -> Option<CertificateDer<'static>> {
        self.cert.clone()
    }

    /// Extra roots for [`HyperTransport::new`]: the certificate of a TLS registry, else none.
    pub fn extra_roots(&self) -> Vec<CertificateDer<'static>> {
        self.cert.iter().cloned().collect()
    }

    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// A server [`Config`] for this registry: plain-HTTP registries are listed in
    /// `insecure_registries` (behavior.md §4.2); TLS registries rely on [`Self::extra_roots`].
    pub fn config(&self) -> Config {
        Config {
            insecure_registries: if self.is_tls() {
                Vec::new()
            } else {
                vec![self.host()]
            },
            ..Config::default()
        }
    }

    /// A transport that can reach this registry (see [`Self::config`]).
    pub fn transport(&self) -> HyperTransport {
        HyperTransport::new(&self.config(), self.extra_roots()).expect("hyper transport")
    }

    /// The `.dockerconfigjson` of a pull secret holding this registry's credentials.
    pub fn docker_config_json(&self) -> String {
        let (user, password) = self.credentials().expect("a registry with basic auth");
        docker_config_json(&self.host(), user, password)
    }

    /// The registry's own log (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A GET with the registry's credentials (if any); `path` is relative to the base URL.
    pub async fn get(&self, path: &str, accept: &[&str]) -> RegistryResponse {
        let headers: Vec<(&str, String)> = if accept.is_empty() {
            Vec::new()
        } else {
            vec![("accept", accept.join(", "))]
        };
        self.client
            .send("GET", path, &headers, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// A GET without credentials.
    pub async fn get_anonymous(&self, path: &str) -> RegistryResponse {
        self.client
            .anonymous()
            .send("GET", path, &[], Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Uploads a blob (monolithic: POST then PUT `?digest=`) and returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let started = self
            .client
            .send(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                Vec::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("start upload to {repo}: {e}"));
        assert_eq!(started.status, 202, "start upload to {repo}: {started:?}");
        let location = started.header("location").expect("upload location");
        let mut target = self.client.resolve(location).expect("upload location");
        target.query_pairs_mut().append_pair("digest", &digest);
        let done = self
            .client
            .send(
                "PUT",
                target.as_str(),
                &[("content-type", "application/octet-stream".to_string())],
                bytes.to_vec(),
            )
            .await
            .unwrap_or_else(|e| panic!("upload {digest} to {repo}: {e}"));
        assert_eq!(done.status, 201, "upload {digest} to {repo}: {done:?}");
        digest
    }

    /// Puts a manifest under `reference` (a tag or its digest) and returns the registry's digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> String {
        let resp = self
            .client
            .send(
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("content-type", media_type.to_string())],
                manifest.to_vec(),
            )
            .await
            .unwrap_or_else(|e| panic!("put manifest {repo}:{reference}: {e}"));
        assert_eq!(
            resp.status,
            201,
            "put manifest {repo}:{reference}: {resp:?} {}",
            String::from_utf8_lossy(&resp.body)
        );
        let digest = resp
            .header("docker-content-digest")
            .expect("Docker-Content-Digest")
            .to_string();
        assert_eq!(digest, sha256_digest(manifest), "registry digest");
        digest
    }

    async fn push_image(&self, repo: &str, reference: &str, image: &Image) {
        let mut pushed: Vec<&str> = Vec::new();
        for blob in &image.blobs {
            if !pushed.contains(&blob.digest.as_str()) {
                self.push_blob(repo, &blob.bytes).await;
                pushed.push(&blob.digest);
            }
        }
        self.push_manifest(repo, reference, image.media_type, &image.manifest)
            .await;
    }

    /// Pushes `wasm` as `repo:tag` in `format` and returns what was stored.
    pub async fn push(&self, repo: &str, tag: &str, format: ImageFormat, wasm: &[u8]) -> Pushed {
        let (image, digest) = match format {
            ImageFormat::Index => {
                let decoy = build_image(
                    ImageFormat::OciCompat,
                    &wasm_module("linux/arm64 decoy, not the module"),
                );
                let image = build_image(ImageFormat::OciCompat, wasm);
                self.push_image(repo, &decoy.digest, &decoy).await;
                self.push_image(repo, &image.digest, &image).await;
                let (index, _) =
                    build_index(&[("linux", "arm64", &decoy), ("linux", "amd64", &image)]);
                let digest = self.push_manifest(repo, tag, OCI_INDEX, &index).await;
                (image, digest)
            }
            _ => {
                let image = build_image(format, wasm);
                self.push_image(repo, tag, &image).await;
                let digest = image.digest.clone();
                (image, digest)
            }
        };
        let mut blobs: Vec<String> = Vec::new();
        for blob in &image.blobs {
            if !blobs.contains(&blob.digest) {
                blobs.push(blob.digest.clone());
            }
        }
        Pushed {
            format,
            repo: repo.to_string(),
            tag: tag.to_string(),
            digest,
            media_type: format.manifest_media_type(),
            image_digest: image.digest.clone(),
            module_layer: image.module_layer.clone(),
            wasm_sha256: hex::encode(Sha256::digest(wasm)),
            blobs,
        }
    }
}

/// A `.dockerconfigjson` with one registry entry (`auth` = base64 `user:password`).
pub fn docker_config_json(host: &str, user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({"auths": {host: {"auth": auth}}}).to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A small hyper client for pushes and plain GETs (HTTP or HTTPS trusting only the test root).
#[derive(Clone)]
struct PushClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    authorization: Option<String>,
}

impl PushClient {
    fn new(
        base: String,
        cert: Option<CertificateDer<'static>>,
        credentials: Option<(String, String)>,
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(cert) = cert {
            roots.add(cert).expect("test root certificate");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let authorization = credentials.map(|(user, password)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        });
        PushClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base,
            authorization,
        }
    }

    fn anonymous(&self) -> PushClient {
        PushClient {
            authorization: None,
            ..self.clone()
        }
    }

    /// `target` (an absolute URL such as an upload `Location`, or a path) against the base URL.
    fn resolve(&self, target: &str) -> Result<url::Url, String> {
        url::Url::parse(&self.base)
            .and_then(|base| base.join(target))
            .map_err(|e| format!("{target}: {e}"))
    }

    /// `target` is an absolute URL (an upload `Location`) or a path.
    async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<RegistryResponse, String> {
        let url = self.resolve(target)?;
        let mut request = http::Request::builder().method(method).uri(url.as_str());
        if let Some(auth) = &self.authorization {
            request = request.header("authorization", auth);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request {url}: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{method} {url}: {e:?}"))?;
            RegistryResponse::read(response, &format!("{method} {url}")).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"))?
    }
}
