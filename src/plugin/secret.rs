//! Pull secrets: `kubernetes.io/dockerconfigjson` Secrets and the registry credentials they hold
//! (behavior.md §4.2 "Authentication"). Credentials never appear in `Debug` output or logs.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::ObjectKey;

pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// A parsed pull secret. `object` is the manifest as JSON, for change detection.
#[derive(Clone, PartialEq)]
pub struct PullSecret {
    pub key: ObjectKey,
    pub object: Value,
    pub config: DockerConfig,
}

impl fmt::Debug for PullSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullSecret")
            .field("key", &self.key)
            .field("registries", &self.config.auths.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Username and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The value of a Basic `Authorization` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The `auths` of a docker config JSON, keyed by registry as written.
#[derive(Clone, Default, PartialEq)]
pub struct DockerConfig {
    pub auths: BTreeMap<String, Credentials>,
}

#[derive(Deserialize)]
struct RawDockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, RawAuth>,
}

#[derive(Deserialize)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl DockerConfig {
    /// The docker config JSON of these credentials (`auths.<registry>.auth`), as a pull secret
    /// is passed on to a proxy (behavior.md §11).
    pub fn to_json(&self) -> String {
        let auths: serde_json::Map<String, serde_json::Value> = (self.auths.iter())
            .map(|(registry, c)| {
                let auth = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password));
                (registry.clone(), serde_json::json!({ "auth": auth }))
            })
            .collect();
        serde_json::json!({ "auths": auths }).to_string()
    }

    /// Parses docker config JSON text. Errors never quote the secret material.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let raw: RawDockerConfig = serde_json::from_slice(json)
            .map_err(|_| "is not valid docker config json".to_string())?;
        let mut auths = BTreeMap::new();
        for (registry, a) in raw.auths {
            let creds = match (a.auth, a.username, a.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| format!("auths.{registry}.auth is not base64"))?;
                    let text = String::from_utf8(decoded)
                        .map_err(|_| format!("auths.{registry}.auth is not utf-8"))?;
                    let (u, p) = text.split_once(':').ok_or_else(|| {
                        format!("auths.{registry}.auth must encode user:password")
                    })?;
                    Credentials {
                        username: u.to_string(),
                        password: p.to_string(),
                    }
                }
                (_, Some(username), password) => Credentials {
                    username,
                    password: password.unwrap_or_default(),
                },
                _ => return Err(format!("auths.{registry} has neither auth nor username")),
            };
            auths.insert(registry, creds);
        }
        Ok(DockerConfig { auths })
    }

    /// Credentials for a registry host (`host[:port]`). Keys may be written as bare hosts or as URLs
    /// (`https://host/v1/`); `docker.io` aliases are matched as Docker does.
    pub fn credentials_for(&self, registry: &str) -> Option<&Credentials> {
        let normalise = |k: &str| {
            let k = k
                .strip_prefix("https://")
                .or_else(|| k.strip_prefix("http://"))
                .unwrap_or(k);
            let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
            match host.as_str() {
                "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
                _ => host,
            }
        };
        let want = normalise(registry);
        self.auths
            .iter()
            .find(|(k, _)| normalise(k) == want)
            .map(|(_, c)| c)
    }
}

impl PullSecret {
    /// Builds a pull secret from a `Secret` object; errors are `(field, message)`.
    pub fn from_object(key: ObjectKey, object: &Value) -> Result<Self, (String, String)> {
        let ty = object
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if ty != DOCKER_CONFIG_JSON_TYPE {
            return Err((
                "type".into(),
                format!("unsupported secret type {ty:?} (want {DOCKER_CONFIG_JSON_TYPE})"),
            ));
        }
        let string_data = object
            .get("stringData")
            .and_then(|d| d.get(DOCKER_CONFIG_JSON_KEY));
        let data = object
            .get("data")
            .and_then(|d| d.get(DOCKER_CONFIG_JSON_KEY));
        let bytes = match (string_data, data) {
            (Some(Value::String(s)), _) => s.clone().into_bytes(),
            (_, Some(Value::String(b64))) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| {
                    (
                        "data..dockerconfigjson".to_string(),
                        "is not base64".to_string(),
                    )
                })?,
            _ => {
                return Err((
                    "data..dockerconfigjson".into(),
                    "is required for a kubernetes.io/dockerconfigjson secret".into(),
                ))
            }
        };
        let config =
            DockerConfig::parse(&bytes).map_err(|m| ("data..dockerconfigjson".to_string(), m))?;
        Ok(PullSecret {
            key,
            object: object.clone(),
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auth_and_username_forms_and_redacts() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let json = format!(
            r#"{{"auths":{{"reg.example":{{"auth":"{auth}"}},"https://other:5000/v1/":{{"username":"bob","password":"pw"}}}}}}"#
        );
        let c = DockerConfig::parse(json.as_bytes()).unwrap();
        assert_eq!(c.credentials_for("reg.example").unwrap().password, "s3cret");
        assert_eq!(c.credentials_for("other:5000").unwrap().username, "bob");
        assert!(c.credentials_for("third").is_none());
        assert!(!format!("{:?}", c.credentials_for("reg.example")).contains("s3cret"));
    }

    #[test]
    fn rejects_bad_secrets_without_quoting_them() {
        let key = ObjectKey::new("default", "s");
        let obj = serde_json::json!({"type": "Opaque"});
        assert_eq!(
            PullSecret::from_object(key.clone(), &obj).unwrap_err().0,
            "type"
        );
        let obj = serde_json::json!({"type": DOCKER_CONFIG_JSON_TYPE, "data": {".dockerconfigjson": "%%%"}});
        let e = PullSecret::from_object(key, &obj).unwrap_err();
        assert!(!e.1.contains("%%%"));
    }
}
