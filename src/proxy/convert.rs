//! Converting the resources of one upstream ECDS response (behavior.md §11): each resource is
//! read ([`crate::extension::classify`]) and becomes a [`Slot`] — passed through, served from an
//! identity's result, or only ever a fallback. A resource that cannot be read fails the whole
//! response (`unmarshal_failure`: NACKed upstream, Envoy never sees it), as with the reference
//! agent.

use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::hub::{Conversion, Hub, Identity, Lease};
use crate::convert::{from_template, Filter};
use crate::extension::{classify, Classified, Template};
use crate::metrics::{ConversionResult, Metrics};
use crate::xds::ECDS_TYPE_URL;

/// One resource of a response.
#[derive(Debug)]
pub enum Slot {
    /// Not a remote-load Wasm config: forwarded as it came (`no_remote_load`).
    Pass(Any),
    /// Served from the result of an identity the driver processes.
    Remote {
        template: Arc<Template>,
        lease: Lease,
    },
    /// Nothing can be pulled (`miss_remote_fetch_hint`, a `file://` url): the fallback only.
    Fallback {
        template: Arc<Template>,
        filter: Filter,
    },
}

/// The resources of a response being converted.
#[derive(Debug)]
pub struct Converting {
    pub slots: Vec<Slot>,
}

pub use crate::convert::fallback_for as fallback;

/// Reads the resources and takes a lease on each identity, which starts its processing. `Err`:
/// a resource cannot be read (the message says which).
pub fn start(hub: &Arc<Hub>, metrics: &Metrics, resources: &[Any]) -> Result<Converting, String> {
    let mut slots = Vec::with_capacity(resources.len());
    for (i, r) in resources.iter().enumerate() {
        if r.type_url.is_empty() && r.value.is_empty() {
            // A delta entry without a resource (a TTL heartbeat): nothing to convert.
            slots.push(Slot::Pass(r.clone()));
            continue;
        }
        let classified = if r.type_url == ECDS_TYPE_URL {
            classify(r)
        } else {
            Err(format!("resource {i} has type {:?}", r.type_url))
        };
        let slot = match classified {
            Err(e) => {
                metrics.record_conversion(ConversionResult::UnmarshalFailure, 0.0);
                return Err(e);
            }
            Ok(Classified::Passthrough) => {
                metrics.record_conversion(ConversionResult::NoRemoteLoad, 0.0);
                Slot::Pass(r.clone())
            }
            Ok(Classified::MissingHint(template)) => {
                metrics.record_conversion(ConversionResult::MissRemoteFetchHint, 0.0);
                tracing::warn!(resource = %template.name, "remote Wasm code without http_uri: serving the fallback");
                let filter = fallback(template.fail_strategy());
                Slot::Fallback { template, filter }
            }
            Ok(Classified::Remote(template, code)) if !remote_scheme(&code.uri) => {
                metrics.record_conversion(ConversionResult::FetchFailure, 0.0);
                tracing::warn!(resource = %template.name, uri = %code.uri, "not an http(s) or oci url: serving the fallback");
                let filter = fallback(template.fail_strategy());
                Slot::Fallback { template, filter }
            }
            Ok(Classified::Remote(template, code)) => {
                let lease = hub.acquire(Identity::of(&template, &code));
                Slot::Remote { template, lease }
            }
        };
        slots.push(slot);
    }
    Ok(Converting { slots })
}

/// A proxied config may only name a module somewhere else: never a file of this host.
fn remote_scheme(uri: &str) -> bool {
    let lower = uri.get(..8).unwrap_or(uri).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("oci://")
}

impl Converting {
    /// Waits until every identity has a result.
    pub async fn ready(&mut self) {
        for slot in &mut self.slots {
            if let Slot::Remote { lease, .. } = slot {
                lease.result().await;
            }
        }
    }

    /// True when an identity's result changed since the last [`render`](Self::render).
    pub fn changed(&self) -> bool {
        self.slots.iter().any(|s| match s {
            Slot::Remote { lease, .. } => lease.changed(),
            _ => false,
        })
    }

    /// The resources to forward: every slot as it stands now. `Err` (`marshal_failure`) when the
    /// converted resources would not fit in one message of `max_size` bytes.
    pub fn render(&mut self, max_size: usize) -> Result<Vec<Any>, String> {
        let mut out = Vec::with_capacity(self.slots.len());
        let mut total = 0usize;
        for slot in &mut self.slots {
            let any = match slot {
                Slot::Pass(a) => a.clone(),
                Slot::Fallback { template, filter } => ecds_any(template, filter.clone()),
                Slot::Remote { template, lease } => match lease.latest() {
                    Some(c) => ecds_any(template, c.filter.clone()),
                    None => return Err(format!("{:?} has no result yet", template.name)),
                },
            };
            total += any.value.len();
            out.push(any);
        }
        if total > max_size {
            return Err(format!(
                "converted resources are {total} bytes, more than the {max_size} bytes of a message"
            ));
        }
        Ok(out)
    }

    /// The errors of the slots serving a fallback, for the log.
    pub fn errors(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Remote { template, lease } => {
                    let c: Arc<Conversion> = lease.peek()?;
                    let e = c.error.clone()?;
                    Some(format!("{}: {e}", template.name))
                }
                _ => None,
            })
            .collect()
    }
}

fn ecds_any(template: &Template, filter: Filter) -> Any {
    Any {
        type_url: ECDS_TYPE_URL.to_string(),
        value: from_template(template, filter).encode_to_vec(),
    }
}
