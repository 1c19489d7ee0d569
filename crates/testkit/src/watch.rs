//! A watched, cached view of one kind of object, as controllers keep (a reflector).

use std::fmt::Debug;
use std::hash::Hash;

use futures_util::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// Mirrors `api`'s objects into a store and calls `changed` after every change, once the first
/// listing is complete. Never returns: watch errors are retried with backoff.
pub(crate) async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    mut changed: impl FnMut(&Store<K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, config).default_backoff());
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init | Event::InitApply(_)) => {}
            Ok(_) => changed(&store),
            Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
        }
    }
}
