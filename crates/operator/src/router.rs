//! Moves traffic in Kubernetes: a Service's selector is pointed at the target's pods. The
//! engine calls this at the point of no return (and again when recovering from a crash).

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use kube::{Api, Client};
use pgshift_engine::{Endpoint, Error, Router, Side};
use serde_json::json;

use crate::names::{role, Names, FIELD_MANAGER, ORIGINAL_ANNOTATION};

/// New connections through the Service must reach the target this many times in a row.
const CONFIRMATIONS: u32 = 3;
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct ServiceRouter {
    pub api: Api<Service>,
    pub service: String,
    pub names: Names,
    /// The target's superuser, aimed at the Service's address: a login through the route
    /// that lands on a server with the target's system identifier proves the route.
    pub probe: Endpoint,
    /// The target itself (its own Service), read once per switch for its identifier.
    pub target: Endpoint,
}

impl ServiceRouter {
    pub fn new(
        client: Client,
        namespace: &str,
        service: &str,
        names: Names,
        probe: Endpoint,
        target: Endpoint,
    ) -> Self {
        ServiceRouter {
            api: Api::namespaced(client, namespace),
            service: service.to_string(),
            names,
            probe,
            target,
        }
    }

    async fn point(&self) -> Result<(), Error> {
        let service = self
            .api
            .get(&self.service)
            .await
            .map_err(|e| Error::Route(format!("reading Service {}: {e}", self.service)))?;
        let patch = selector_patch(&service, &self.names, role::TARGET);
        self.api
            .patch(
                &self.service,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await
            .map_err(|e| {
                Error::Route(format!(
                    "pointing Service {} at the target: {e}",
                    self.service
                ))
            })?;
        Ok(())
    }

    /// Waits until new connections through the Service reach the target's server.
    async fn confirm(&self) -> Result<(), Error> {
        let target = system_identifier(&self.target).await.ok_or_else(|| {
            Error::Route("cannot read the target's system identifier".to_string())
        })?;
        let started = Instant::now();
        let mut in_a_row = 0;
        while in_a_row < CONFIRMATIONS {
            if started.elapsed() > ROUTE_TIMEOUT {
                return Err(Error::Route(format!(
                    "Service {} still does not reach the target after {ROUTE_TIMEOUT:?}",
                    self.service
                )));
            }
            in_a_row =
                match system_identifier(&self.probe).await.as_deref() == Some(target.as_str()) {
                    true => in_a_row + 1,
                    false => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        0
                    }
                };
        }
        Ok(())
    }
}

/// The server's system identifier (unique per cluster), or None when it cannot be reached.
async fn system_identifier(endpoint: &Endpoint) -> Option<String> {
    let client = endpoint.connect().await.ok()?;
    let row = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

impl Router for ServiceRouter {
    fn route_to(&self, side: Side) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            match side {
                Side::Target => {
                    self.point().await?;
                    self.confirm().await
                }
                // Undoing `isolate`: the Service as it was before pgshift changed it.
                _ => restore_clients(&self.api, &self.service)
                    .await
                    .map_err(|e| Error::Route(e.to_string())),
            }
        })
    }

    fn isolate(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let service = self.api.get(&self.service).await.map_err(route_error)?;
            route_clients(&self.api, &service, &self.names, role::ISOLATED)
                .await
                .map_err(route_error)
        })
    }
}

fn route_error(error: kube::Error) -> Error {
    Error::Route(error.to_string())
}

/// A JSON patch that points a Service at one role's pods, on their `postgres` port. Replacing
/// (not merging) the selector: a merge would keep the old keys and select nothing.
pub fn selector_patch(service: &Service, names: &Names, role: &str) -> json_patch::Patch {
    let mut operations =
        vec![json!({"op": "replace", "path": "/spec/selector", "value": names.selector(role)})];
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map_or(0, Vec::len);
    for index in 0..ports {
        operations.push(json!({"op": "replace", "path": format!("/spec/ports/{index}/targetPort"), "value": "postgres"}));
    }
    serde_json::from_value(json!(operations)).expect("a JSON patch")
}

/// Points the clients' Service at one role's pods, keeping its original selector and ports in
/// an annotation (in the same write) so that an abort can put them back.
pub async fn route_clients(
    services: &Api<Service>,
    service: &Service,
    names: &Names,
    role: &str,
) -> Result<(), kube::Error> {
    let spec = service.spec.clone().unwrap_or_default();
    let original = json!({"selector": spec.selector, "ports": spec.ports}).to_string();
    let mut patch = selector_patch(service, names, role);
    let annotation: json_patch::Patch = serde_json::from_value(json!([
        if service.metadata.annotations.is_some() {
            json!({"op": "add", "path": format!("/metadata/annotations/{}", ORIGINAL_ANNOTATION.replace('/', "~1")), "value": original})
        } else {
            json!({"op": "add", "path": "/metadata/annotations", "value": {ORIGINAL_ANNOTATION: original}})
        }
    ]))
    .expect("a JSON patch");
    patch.0.extend(annotation.0);
    services
        .patch(
            &service.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await?;
    Ok(())
}

/// Puts the clients' Service back as it was before pgshift changed it (and forgets the
/// annotation). A Service pgshift did not change is left alone.
pub async fn restore_clients(services: &Api<Service>, name: &str) -> Result<(), RestoreError> {
    let Some(service) = services.get_opt(name).await? else {
        return Ok(());
    };
    let Some(original) = service.annotations().get(ORIGINAL_ANNOTATION) else {
        return Ok(());
    };
    let original: serde_json::Value =
        serde_json::from_str(original).map_err(|e| RestoreError::Annotation {
            service: name.to_string(),
            problem: e.to_string(),
        })?;
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/spec/selector", "value": original["selector"]},
        {"op": "replace", "path": "/spec/ports", "value": original["ports"]},
        {"op": "remove", "path": format!("/metadata/annotations/{}", ORIGINAL_ANNOTATION.replace('/', "~1"))},
    ]))
    .expect("a JSON patch");
    services
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the annotation {ORIGINAL_ANNOTATION} on Service {service} is not what pgshift wrote ({problem}); restore the Service's selector and ports by hand, then remove the annotation")]
    Annotation { service: String, problem: String },
}

/// The field manager used for every write.
pub fn patch_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_is_replaced_and_every_port_aimed_at_postgres() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db", "tier": "data"},
                     "ports": [{"port": 5432, "targetPort": 5432}, {"port": 9187, "targetPort": "metrics"}]},
        }))
        .unwrap();
        let patch = serde_json::to_value(selector_patch(
            &service,
            &Names::new("orders"),
            role::TARGET,
        ))
        .unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "replace", "path": "/spec/selector", "value": {"pgshift.io/role": "target", "pgshift.io/upgrade": "orders"}},
                {"op": "replace", "path": "/spec/ports/0/targetPort", "value": "postgres"},
                {"op": "replace", "path": "/spec/ports/1/targetPort", "value": "postgres"},
            ])
        );
    }
}
