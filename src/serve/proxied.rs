//! The controller's side of `proxy` mode (behavior.md §11): the identities proxied streams want
//! become plugins and secrets of the driver, and what the driver makes of each becomes its
//! result in the [`Hub`].

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;

use crate::convert::{filter_for, MODULES_PATH};
use crate::driver::Driver;
use crate::engine::{Event, Serving};
use crate::metrics::ConversionResult;
use crate::plugin::ObjectKey;
use crate::proxy::convert::fallback;
use crate::proxy::hub::PROXY_NAMESPACE;
use crate::proxy::{Conversion, Hub, Wanted};

pub struct ProxyLink {
    pub hub: Arc<Hub>,
    pub wanted: watch::Receiver<Arc<Wanted>>,
}

impl ProxyLink {
    pub fn new(hub: Arc<Hub>) -> ProxyLink {
        let wanted = hub.wanted();
        ProxyLink { hub, wanted }
    }

    /// The objects wanted now.
    pub fn current(&mut self) -> Arc<Wanted> {
        self.wanted.borrow_and_update().clone()
    }

    /// Hands the hub the results of the identities `events` touched, and of every wanted one
    /// still without a result (new, or refused by admission).
    pub fn report(&self, driver: &Driver, events: &[Event], module_endpoint: &str) {
        let mut keys: BTreeSet<ObjectKey> = events
            .iter()
            .filter_map(Event::plugin)
            .filter(|k| k.namespace == PROXY_NAMESPACE)
            .cloned()
            .collect();
        keys.extend(
            self.hub
                .keys()
                .into_iter()
                .filter(|k| !self.hub.has_result(k)),
        );
        for key in keys {
            if let Some(c) = conversion(driver, &self.hub, &key, module_endpoint) {
                self.hub.set_result(&key, c);
            }
        }
    }
}

/// What an identity converts to now; `None` while it is still being processed.
fn conversion(
    driver: &Driver,
    hub: &Hub,
    key: &ObjectKey,
    module_endpoint: &str,
) -> Option<Conversion> {
    if let Some((_, refusal)) = driver.refusal(key) {
        // Admission refused what the upstream sent (a malformed url, say): only a fallback.
        let fail = hub.fail_strategy(key)?;
        let error = format!("{}: {}", refusal.field, refusal.message);
        if !hub.has_result(key) {
            driver
                .engine()
                .metrics()
                .record_conversion(ConversionResult::FetchFailure, 0.0);
        }
        return Some(Conversion {
            filter: fallback(fail),
            error: Some(error),
        });
    }
    let st = driver.engine().plugin(key)?;
    let filter = filter_for(
        &st.serving,
        driver.config().delivery,
        |sha| format!("{module_endpoint}{MODULES_PATH}{sha}.wasm"),
        |m| driver.engine().served_bytes(m),
    );
    let filter = match filter {
        Ok(f) => f?,
        Err(e) => {
            tracing::error!(plugin = %key, error = %e, "cannot read module for inline delivery");
            return None;
        }
    };
    let error = match &st.serving {
        Serving::Module(_) => None,
        _ => st.last_error.clone(),
    };
    Some(Conversion { filter, error })
}
