//! The blocked-address guard of the hyper transport (behavior.md §4.2 "Safety"): every address a
//! name resolves to is checked against [`Config::is_blocked`] before any connection is opened, so a
//! name that resolves only to blocked addresses fails with [`BlockedAddress`].

use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use crate::config::Config;

type BoxError = Box<dyn StdError + Send + Sync>;

pub(super) fn is_blocked(config: &Config, ip: IpAddr) -> bool {
    // `::ffff:a.b.c.d` is checked as `a.b.c.d` too, so mapped addresses don't escape IPv4 CIDRs.
    let canonical = ip.to_canonical();
    // A connection to the unspecified address (`0.0.0.0`, `::`) reaches this host's loopback, so
    // it is blocked whenever loopback is (as the token-realm check treats it as local).
    let loopback_blocked = || {
        [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
        .into_iter()
        .any(|l| config.is_blocked(l))
    };
    config.is_blocked(ip)
        || config.is_blocked(canonical)
        || (canonical.is_unspecified() && loopback_blocked())
}

/// A name resolved only to blocked addresses.
#[derive(Debug)]
pub(super) struct BlockedAddress {
    host: String,
    addr: IpAddr,
}

impl std::fmt::Display for BlockedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves to {}", self.host, self.addr)
    }
}

impl StdError for BlockedAddress {}

/// Resolves names with the system resolver and drops blocked addresses, so no connection is ever
/// opened to one; a name left with no address fails with [`BlockedAddress`].
#[derive(Clone)]
pub(super) struct GuardedResolver {
    pub(super) config: Arc<Config>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            // Port 0: the connector sets the URL's port afterwards.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (blocked, allowed): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
                .into_iter()
                .partition(|a| is_blocked(&config, a.ip()));
            match (allowed.is_empty(), blocked.first()) {
                (false, _) => Ok(allowed.into_iter()),
                (true, Some(addr)) => Err(Box::new(BlockedAddress {
                    host,
                    addr: addr.ip(),
                }) as BoxError),
                (true, None) => Err(format!("{host}: no addresses").into()),
            }
        })
    }
}
