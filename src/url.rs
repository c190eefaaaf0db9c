//! Module URLs: parsing `spec.url` into the three sources the server knows (OCI, HTTP(S), local file)
//! and deriving the cache's *module name* from them (behavior.md §1, §5).
//!
//! Credentials written into a URL (`https://user:password@host/…`) are never shown: [`redact`] is
//! the one function that hides them, and the text every [`ModuleUrl`] displays, serializes and
//! names its cache entries by is the redacted one. Only requests see them (as a basic
//! `Authorization` header, as Go's HTTP client sends them).
//!
//! This module only parses; it never touches the network. http(s) URLs are parsed once, by the
//! `url` crate, into an [`HttpUrl`]; the fetchers, the simulator and the tests use the same parser
//! for redirect `Location`s ([`url::Url::join`]) and for splitting a URL into host and path.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use thiserror::Error;

/// The tag an OCI reference without tag or digest resolves (behavior.md §4.2).
pub const DEFAULT_OCI_TAG: &str = "latest";

/// A parsed `spec.url`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleUrl {
    Oci(OciRef),
    /// `http://` or `https://`.
    Http(HttpUrl),
    /// `file:///path`: the absolute local path.
    File(String),
    /// Remote code without an `http_uri` (an `EnvoyFilter` extension config, behavior.md §10):
    /// nothing can be fetched, only the fallback is served. Never the result of parsing.
    NoHttpUri,
}

/// An `http://` or `https://` URL, parsed once.
///
/// Its text stays as written (trimmed, credentials [redacted](redact)): that text is the cache's
/// module name and the key of its resolutions, so it must not change when the parser's normal form
/// would differ (`https://h` versus `https://h/`). Equality, ordering and hashing go by the text
/// as written, credentials included. Requests use the parsed form ([`HttpUrl::url`]).
#[derive(Clone)]
pub struct HttpUrl {
    text: String,
    shown: String,
    parsed: url::Url,
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpUrl").field(&self.shown).finish()
    }
}

/// What user information in a URL is shown as.
pub const REDACTED: &str = "***";

/// `raw` with the user information of its authority (`user:password@`) replaced by `***@`; the
/// text unchanged when it has none. Works on any URL-like text (with or without a scheme, valid
/// or not), so that an error about a malformed URL can quote it safely too.
pub fn redact(raw: &str) -> Cow<'_, str> {
    let start = raw.find("://").map_or(0, |i| i + 3);
    let end = raw[start..]
        .find(['/', '?', '#'])
        .map_or(raw.len(), |i| start + i);
    match raw[start..end].rfind('@') {
        Some(at) => Cow::Owned(format!("{}{REDACTED}{}", &raw[..start], &raw[start + at..])),
        None => Cow::Borrowed(raw),
    }
}

/// An OCI image reference: `oci://registry/repository[:tag][@sha256:<hex>]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OciRef {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// 64 lowercase hex characters, without the `sha256:` prefix.
    pub digest: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("url is empty")]
    Empty,
    #[error("unsupported scheme {0:?} (want oci, http, https or file)")]
    Scheme(String),
    #[error("invalid url {url:?}: {why}")]
    Invalid { url: String, why: &'static str },
}

impl ModuleUrl {
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(UrlError::Empty);
        }
        let invalid = |why| UrlError::Invalid {
            url: redact(raw).into_owned(),
            why,
        };
        // An OCI reference has no place for credentials (they come from a pull secret); without
        // this the user information was read as a digest ("digest must be sha256").
        let oci = |rest: &str| {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if authority.contains('@') {
                return Err(invalid(
                    "credentials in an oci url are not supported (use imagePullSecret)",
                ));
            }
            OciRef::parse(rest).map(ModuleUrl::Oci).map_err(invalid)
        };
        match raw.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "oci" => oci(rest),
                "http" | "https" => HttpUrl::parse(raw).map(ModuleUrl::Http).map_err(invalid),
                "file" => {
                    if !rest.starts_with('/') || rest.len() < 2 {
                        return Err(invalid("file url must be file:///absolute/path"));
                    }
                    Ok(ModuleUrl::File(rest.to_string()))
                }
                other => Err(UrlError::Scheme(other.to_string())),
            },
            None if redact(raw) != raw => oci(raw),
            None => {
                // Kubernetes-style "scheme:rest" without slashes is not a URL we know.
                if let Some((scheme, _)) = raw.split_once(':') {
                    if !scheme.contains('/') && !scheme.contains('.') && !looks_like_port(raw) {
                        return Err(UrlError::Scheme(scheme.to_string()));
                    }
                }
                oci(raw)
            }
        }
    }

    /// The cache's module name: `oci://<registry>/<repository>` (tag and digest removed), or the full
    /// URL for http(s) and file.
    pub fn module_name(&self) -> String {
        match self {
            ModuleUrl::Oci(r) => format!("oci://{}/{}", r.registry, r.repository),
            ModuleUrl::Http(u) => u.as_str().to_string(),
            ModuleUrl::File(p) => format!("file://{p}"),
            ModuleUrl::NoHttpUri => String::new(),
        }
    }

    /// True for references whose content may change without the URL changing: a tagged (or untagged)
    /// OCI reference without digest, and every http(s) URL.
    pub fn is_mutable(&self) -> bool {
        match self {
            ModuleUrl::Oci(r) => r.digest.is_none(),
            ModuleUrl::Http(_) => true,
            ModuleUrl::File(_) | ModuleUrl::NoHttpUri => false,
        }
    }

    /// The URL as written, credentials included: only for handing the URL on to whoever fetches
    /// it (a proxy converting a remote resource). Never log or store it; [`fmt::Display`] is the
    /// redacted form.
    pub fn as_written(&self) -> String {
        match self {
            ModuleUrl::Http(u) => u.as_written().to_string(),
            other => other.to_string(),
        }
    }

    /// The registry, or the `host[:port]` of an http(s) URL (lowercase, default port omitted).
    pub fn host(&self) -> Option<&str> {
        match self {
            ModuleUrl::Oci(r) => Some(&r.registry),
            ModuleUrl::Http(u) => Some(authority(u.url())),
            ModuleUrl::File(_) | ModuleUrl::NoHttpUri => None,
        }
    }
}

fn looks_like_port(raw: &str) -> bool {
    // "localhost:5000/repo" or "host:5000/repo": the part after ':' starts with digits then '/'.
    raw.split_once(':')
        .map(|(_, r)| r.chars().next().is_some_and(|c| c.is_ascii_digit()) && r.contains('/'))
        .unwrap_or(false)
}

impl fmt::Display for ModuleUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleUrl::Oci(r) => write!(f, "oci://{r}"),
            ModuleUrl::Http(u) => f.write_str(u.as_str()),
            ModuleUrl::File(p) => write!(f, "file://{p}"),
            ModuleUrl::NoHttpUri => f.write_str("(no http_uri)"),
        }
    }
}

impl HttpUrl {
    /// Parses an absolute `http://` or `https://` URL with a host.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let text = raw.trim();
        let parsed = url::Url::parse(text).map_err(|e| match e {
            url::ParseError::EmptyHost => "missing host",
            _ => "not a valid http url",
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("not an http or https url");
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("missing host");
        }
        Ok(HttpUrl {
            text: text.to_string(),
            shown: redact(text).into_owned(),
            parsed,
        })
    }

    /// The URL as written, credentials redacted: its module name, what is shown and stored.
    pub fn as_str(&self) -> &str {
        &self.shown
    }

    /// The URL as written, credentials included (see [`ModuleUrl::as_written`]).
    pub fn as_written(&self) -> &str {
        &self.text
    }

    /// True when the URL carries a user name or password.
    pub fn has_credentials(&self) -> bool {
        !self.parsed.username().is_empty() || self.parsed.password().is_some()
    }

    /// The parsed (normalised) URL, credentials included.
    pub fn url(&self) -> &url::Url {
        &self.parsed
    }

    /// What requests are sent to: the parsed URL without its credentials (they go in
    /// [`HttpUrl::basic_auth`] instead, so that no error or log line quoting the request URL can
    /// show them).
    pub fn request_url(&self) -> url::Url {
        let mut u = self.parsed.clone();
        // Only fails for URLs that cannot have credentials, which have none to remove.
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u
    }

    /// `Basic base64(user:password)` for a URL with credentials, as Go's HTTP client sends them.
    pub fn basic_auth(&self) -> Option<String> {
        use base64::Engine as _;
        if !self.has_credentials() {
            return None;
        }
        let user = percent_decode(self.parsed.username());
        let password = percent_decode(self.parsed.password().unwrap_or_default());
        let mut pair = user;
        pair.push(b':');
        pair.extend_from_slice(&password);
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
    }
}

impl PartialEq for HttpUrl {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for HttpUrl {}

impl Hash for HttpUrl {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for HttpUrl {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HttpUrl {
    fn cmp(&self, other: &Self) -> Ordering {
        self.text.cmp(&other.text)
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// `%XX` escapes decoded (the url crate keeps user information percent-encoded).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `host[:port]` of a URL as the parser normalised it: lowercase, IPv6 in brackets, no user info,
/// no default port. Empty when the URL has no host.
pub fn authority(u: &url::Url) -> &str {
    &u[url::Position::BeforeHost..url::Position::AfterPort]
}

/// The path and query of a URL (`/` at least; no fragment), as an HTTP request line names them.
pub fn path_and_query(u: &url::Url) -> &str {
    &u[url::Position::BeforePath..url::Position::AfterQuery]
}

impl OciRef {
    /// Parses `registry/repository[:tag][@sha256:hex]` (no scheme).
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or("digest must be sha256:<64 hex>")?;
                if !is_sha256_hex(hex) {
                    return Err("digest must be sha256:<64 lowercase hex>");
                }
                (rest, Some(hex.to_string()))
            }
            None => (s, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or("missing repository after registry")?;
        if registry.is_empty() || registry.contains(char::is_whitespace) {
            return Err("missing registry host");
        }
        // A tag is after the last ':' of the path part (the registry part may carry a port).
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) => {
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                {
                    return Err("invalid tag");
                }
                (repo, Some(tag.to_string()))
            }
            None => (path, None),
        };
        if repository.is_empty()
            || repository.starts_with('/')
            || repository.ends_with('/')
            || !repository
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
        {
            return Err("invalid repository name (lowercase letters, digits, '._-/')");
        }
        Ok(OciRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The tag resolved when no digest is given: the explicit tag or `latest`.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or(DEFAULT_OCI_TAG)
    }

    /// What to ask the registry for: the digest if pinned, otherwise the tag.
    pub fn reference(&self) -> String {
        match &self.digest {
            Some(d) => format!("sha256:{d}"),
            None => self.tag_or_latest().to_string(),
        }
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@sha256:{d}")?;
        }
        Ok(())
    }
}

/// Exactly 64 characters of `[a-f0-9]`.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn parses_oci_forms() {
        let u = ModuleUrl::parse("oci://reg.example/ns/repo:v1").unwrap();
        assert_eq!(u.module_name(), "oci://reg.example/ns/repo");
        let ModuleUrl::Oci(r) = &u else { panic!() };
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(u.is_mutable());

        let u = ModuleUrl::parse(&format!("localhost:5000/repo@sha256:{D}")).unwrap();
        let ModuleUrl::Oci(r) = &u else { panic!() };
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert!(!u.is_mutable());
        assert_eq!(u.module_name(), "oci://localhost:5000/repo");

        let u = ModuleUrl::parse(&format!("oci://r:5000/a/b:t@sha256:{D}")).unwrap();
        let ModuleUrl::Oci(r) = &u else { panic!() };
        assert_eq!(
            (r.tag.as_deref(), r.reference()),
            (Some("t"), format!("sha256:{D}"))
        );
    }

    #[test]
    fn parses_http_and_file() {
        let u = ModuleUrl::parse(" https://h.example/x.wasm").unwrap();
        assert_eq!(
            u,
            ModuleUrl::Http(HttpUrl::parse("https://h.example/x.wasm").unwrap())
        );
        // The text as written is the module name, even where the parser's normal form differs.
        let u = ModuleUrl::parse("HTTPS://H.example").unwrap();
        assert_eq!(
            (u.to_string(), u.module_name()),
            ("HTTPS://H.example".into(), "HTTPS://H.example".into())
        );
        let ModuleUrl::Http(h) = &u else { panic!() };
        assert_eq!(h.url().as_str(), "https://h.example/");
        assert_eq!(u.host(), Some("h.example"));
        assert_eq!(
            ModuleUrl::parse("http://u:p@[::1]:8080/a?q#f")
                .unwrap()
                .host(),
            Some("[::1]:8080")
        );
        assert_eq!(
            ModuleUrl::parse("https://h:443/a").unwrap().host(),
            Some("h")
        );
        let u = url::Url::parse("https://h.example/a/b?x=1#frag").unwrap();
        assert_eq!(path_and_query(&u), "/a/b?x=1");
        let u = url::Url::parse("https://h.example?x=1").unwrap();
        assert_eq!(path_and_query(&u), "/?x=1");
        assert_eq!(
            ModuleUrl::parse("file:///opt/x.wasm").unwrap(),
            ModuleUrl::File("/opt/x.wasm".into())
        );
        assert_eq!(
            ModuleUrl::parse("http://h:8080/a").unwrap().host(),
            Some("h:8080")
        );
    }

    #[test]
    fn credentials_are_redacted_everywhere_but_the_request() {
        assert_eq!(redact("https://u:secret@h/x@y"), "https://***@h/x@y");
        assert_eq!(redact("https://h/x@y"), "https://h/x@y");
        assert_eq!(redact("u:secret@h:5000/r"), "***@h:5000/r");
        assert_eq!(redact("http://a@b@h?q=@"), "http://***@h?q=@");
        let u = ModuleUrl::parse("https://user:s%40cret@h.example/x.wasm").unwrap();
        assert_eq!(u.to_string(), "https://***@h.example/x.wasm");
        assert_eq!(u.module_name(), "https://***@h.example/x.wasm");
        assert_eq!(u.as_written(), "https://user:s%40cret@h.example/x.wasm");
        assert!(!format!("{u:?}").contains("cret"));
        let ModuleUrl::Http(h) = &u else { panic!() };
        assert!(h.has_credentials());
        assert_eq!(h.request_url().as_str(), "https://h.example/x.wasm");
        // base64("user:s@cret")
        assert_eq!(h.basic_auth().as_deref(), Some("Basic dXNlcjpzQGNyZXQ="));
        // Equal only as written: other credentials are another URL (not another cache name).
        let other = ModuleUrl::parse("https://user:other@h.example/x.wasm").unwrap();
        assert_ne!(u, other);
        assert_eq!(u.module_name(), other.module_name());
        let plain = ModuleUrl::parse("https://h.example/x.wasm").unwrap();
        let ModuleUrl::Http(p) = &plain else { panic!() };
        assert!(!p.has_credentials() && p.basic_auth().is_none());

        // OCI: refused, saying why, without quoting the secret.
        for raw in [
            "oci://user:secret@reg.example/ns/repo:v1",
            "user:secret@reg.example/ns/repo:v1",
        ] {
            let e = ModuleUrl::parse(raw).unwrap_err().to_string();
            assert!(e.contains("credentials in an oci url"), "{e}");
            assert!(!e.contains("secret") && !e.contains("digest"), "{e}");
        }
        let e = ModuleUrl::parse("https://u:secret@")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn rejects_bad_urls() {
        assert_eq!(ModuleUrl::parse(""), Err(UrlError::Empty));
        assert!(matches!(ModuleUrl::parse("ftp://x/y"), Err(UrlError::Scheme(s)) if s == "ftp"));
        assert!(ModuleUrl::parse("oci://reg").is_err());
        assert!(ModuleUrl::parse("oci://reg/Repo").is_err());
        assert!(ModuleUrl::parse("oci://reg/repo@sha256:abc").is_err());
        assert!(ModuleUrl::parse("http://").is_err());
        assert!(ModuleUrl::parse("file://relative").is_err());
    }
}
