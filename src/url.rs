//! Module URLs: parsing `spec.url` into the three sources the server knows (OCI, HTTP(S), local file)
//! and deriving the cache's *module name* from them (behavior.md §1, §5).
//!
//! This module only parses; it never touches the network. http(s) URLs are parsed once, by the
//! `url` crate, into an [`HttpUrl`]; the fetchers, the simulator and the tests use the same parser
//! for redirect `Location`s ([`url::Url::join`]) and for splitting a URL into host and path.

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
/// Its text stays as written (trimmed): that text is the cache's module name and the key of its
/// resolutions, so it must not change when the parser's normal form would differ (`https://h`
/// versus `https://h/`). Equality, ordering and hashing go by that text. Requests use the parsed
/// form ([`HttpUrl::url`]).
#[derive(Clone, Debug)]
pub struct HttpUrl {
    text: String,
    parsed: url::Url,
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
            url: raw.to_string(),
            why,
        };
        match raw.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "oci" => OciRef::parse(rest).map(ModuleUrl::Oci).map_err(invalid),
                "http" | "https" => HttpUrl::parse(raw).map(ModuleUrl::Http).map_err(invalid),
                "file" => {
                    if !rest.starts_with('/') || rest.len() < 2 {
                        return Err(invalid("file url must be file:///absolute/path"));
                    }
                    Ok(ModuleUrl::File(rest.to_string()))
                }
                other => Err(UrlError::Scheme(other.to_string())),
            },
            None => {
                // Kubernetes-style "scheme:rest" without slashes is not a URL we know.
                if let Some((scheme, _)) = raw.split_once(':') {
                    if !scheme.contains('/') && !scheme.contains('.') && !looks_like_port(raw) {
                        return Err(UrlError::Scheme(scheme.to_string()));
                    }
                }
                OciRef::parse(raw).map(ModuleUrl::Oci).map_err(invalid)
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
            parsed,
        })
    }

    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed (normalised) URL, what requests are sent to.
    pub fn url(&self) -> &url::Url {
        &self.parsed
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
        f.write_str(&self.text)
    }
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
