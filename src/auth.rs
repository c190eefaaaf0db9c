//! Who may use the revealing and mutating endpoints (docs/security.md): `POST /refresh`,
//! `/debug/*` and the module endpoint on the admin port, and the `wasm_ecds.v1.Admin` gRPC
//! service on the xDS port.
//!
//! A caller is authenticated when its port requires client certificates (mTLS: the TLS handshake
//! already verified it against the configured CA), or when it presents `Authorization: Bearer
//! <token>` matching the token file. The token file is re-read when it changes (a rotated
//! Kubernetes Secret), so a rotation needs no restart. With neither configured, the port is open
//! (a loopback-only development setup); `serve` warns at start when such a port is not loopback.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The bearer token of `--admin-token-file`, re-read when the file's modification time or size
/// changes.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Debug, Default)]
struct TokenState {
    stamp: Option<(SystemTime, u64)>,
    token: Option<Vec<u8>>,
}

/// A token file is at most this long (a token is a line of text).
const MAX_TOKEN_FILE: u64 = 64 * 1024;

impl TokenFile {
    /// Reads the token once, so a missing or empty file is a start-up error naming the flag.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = TokenFile {
            path: path.to_path_buf(),
            state: Mutex::new(TokenState::default()),
        };
        match file.current() {
            Some(_) => Ok(file),
            None => Err(format!(
                "--admin-token-file {}: missing, unreadable, larger than 64 KiB or empty",
                path.display()
            )),
        }
    }

    /// The token as the file has it now (trimmed); `None` when it cannot be read or is empty,
    /// which then authenticates nobody.
    fn current(&self) -> Option<Vec<u8>> {
        let mut state = self.state.lock().expect("token lock");
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp.is_none() || stamp != state.stamp {
            state.token = read_token(&self.path);
            state.stamp = stamp;
        }
        state.token.clone()
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let Some(token) = self.current() else {
            return false;
        };
        token.len() == presented.len()
            && token
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

fn read_token(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = Vec::new();
    file.take(MAX_TOKEN_FILE + 1).read_to_end(&mut text).ok()?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return None;
    }
    let token = text.trim_ascii().to_vec();
    (!token.is_empty()).then_some(token)
}

/// The access rule of one port.
#[derive(Debug, Default)]
pub struct Access {
    /// Every connection presented a client certificate the port's CA verified.
    pub mtls: bool,
    /// The port verifies the client certificates presented but does not require one (the admin
    /// port, whose probes and scrapers have none): a connection with a verified certificate is
    /// authenticated, one without needs the token.
    pub client_ca: bool,
    pub token: Option<TokenFile>,
}

impl Access {
    /// Nothing configured: everyone may.
    pub fn open() -> Self {
        Access::default()
    }

    /// Whether any authentication is configured.
    pub fn is_open(&self) -> bool {
        !self.mtls && !self.client_ca && self.token.is_none()
    }

    /// Whether a caller that sent this `Authorization` header value may use a protected
    /// endpoint.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        if self.is_open() || self.mtls {
            return true;
        }
        let presented = authorization.and_then(|h| {
            let h = h.trim_ascii();
            let (scheme, rest) = h.split_at(h.iter().position(|b| *b == b' ')?);
            scheme
                .eq_ignore_ascii_case(b"bearer")
                .then(|| rest.trim_ascii())
        });
        match (&self.token, presented) {
            (Some(t), Some(p)) => t.matches(p),
            _ => false,
        }
    }

    /// Whether this caller is authenticated (as opposed to allowed because nothing is
    /// configured): a module fetched with credentials is served only to such callers.
    pub fn authenticates(&self, authorization: Option<&[u8]>) -> bool {
        !self.is_open() && self.allows(authorization)
    }

    /// [`allows`](Self::allows) for a caller on a connection whose client certificate the port's
    /// CA did (`peer_verified`) or did not verify.
    pub fn allows_peer(&self, peer_verified: bool, authorization: Option<&[u8]>) -> bool {
        peer_verified || self.allows(authorization)
    }

    /// [`authenticates`](Self::authenticates) for a caller on a connection whose client
    /// certificate the port's CA did (`peer_verified`) or did not verify.
    pub fn authenticates_peer(&self, peer_verified: bool, authorization: Option<&[u8]>) -> bool {
        !self.is_open() && self.allows_peer(peer_verified, authorization)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let access = Access {
            token: Some(TokenFile::open(&path).unwrap()),
            ..Access::default()
        };
        assert!(access.allows(Some(b"Bearer s3cret")));
        assert!(access.allows(Some(b"bearer  s3cret ")));
        assert!(!access.allows(Some(b"Bearer s3cre")));
        assert!(!access.allows(Some(b"Basic s3cret")));
        assert!(!access.allows(Some(b"s3cret")));
        assert!(!access.allows(None));
        // A rotated Secret: the new token works, the old one no longer does.
        std::fs::write(&path, "n3w-token-longer").unwrap();
        assert!(access.allows(Some(b"Bearer n3w-token-longer")));
        assert!(!access.allows(Some(b"Bearer s3cret")));
        // An emptied file authenticates nobody.
        std::fs::write(&path, "\n").unwrap();
        assert!(!access.allows(Some(b"Bearer ")));
    }

    #[test]
    fn open_and_mtls_ports() {
        assert!(Access::open().allows(None));
        assert!(!Access::open().authenticates(None));
        let mtls = Access {
            mtls: true,
            ..Access::default()
        };
        assert!(mtls.allows(None) && mtls.authenticates(None));
        // Client certificates optional (the admin port): only a verified one authenticates.
        let optional = Access {
            client_ca: true,
            ..Access::default()
        };
        assert!(!optional.is_open());
        assert!(!optional.allows_peer(false, None) && !optional.authenticates_peer(false, None));
        assert!(optional.allows_peer(true, None) && optional.authenticates_peer(true, None));
        assert!(!Access::open().authenticates_peer(false, None));
    }

    #[test]
    fn bad_token_files_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TokenFile::open(&dir.path().join("missing")).is_err());
        std::fs::write(dir.path().join("empty"), " \n").unwrap();
        assert!(TokenFile::open(&dir.path().join("empty")).is_err());
        assert!(TokenFile::open(dir.path()).is_err());
    }
}
