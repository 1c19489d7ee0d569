//! Moves traffic in Kubernetes: a Service's selector is pointed at the target's pods at the
//! switch, and back at the source's pods by a rollback (or when an aborted attempt undoes
//! `isolate`). The engine calls this at the point of no return of either switch (and again
//! when recovering from a crash); each move is proven by logins through the Service.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use kube::{Api, Client};
use pgshift_engine::{Endpoint, Error, Router, Side};
use serde_json::{json, Value};

use crate::names::{role, Names, FIELD_MANAGER, ORIGINAL_ANNOTATION};

/// New connections through the Service must reach the wanted server this many times in a row.
const CONFIRMATIONS: u32 = 3;
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a login through the route proves that it reaches one server: a login that lands on a
/// server with that server's system identifier.
#[derive(Debug, Clone)]
pub struct Proof {
    /// A superuser of that server, aimed at the Service's address. The target's is
    /// `pgshift_superuser`, a role the source lacks; the source's superuser exists on the
    /// target too (roles are copied), which is why the identifier decides.
    pub probe: Endpoint,
    /// The server itself (its own Service), read once per move for its identifier.
    pub server: Endpoint,
}

/// How the Service reaches the source's pods again.
#[derive(Debug, Clone, PartialEq)]
pub enum SourcePods {
    /// The Service's selector and ports from before pgshift changed them (the annotation
    /// [`ORIGINAL_ANNOTATION`]): the clients' own Service in `Service` mode.
    Original,
    /// These pods on this target port: the route behind PgBouncer, which pgshift made with the
    /// source Service's selector.
    Selected {
        selector: BTreeMap<String, String>,
        target_port: Value,
    },
}

#[derive(Debug)]
pub struct ServiceRouter {
    pub api: Api<Service>,
    pub service: String,
    pub names: Names,
    pub source_pods: SourcePods,
    pub source: Proof,
    pub target: Proof,
}

impl ServiceRouter {
    pub fn new(
        client: Client,
        namespace: &str,
        service: &str,
        names: Names,
        source_pods: SourcePods,
        (source, target): (Proof, Proof),
    ) -> Self {
        ServiceRouter {
            api: Api::namespaced(client, namespace),
            service: service.to_string(),
            names,
            source_pods,
            source,
            target,
        }
    }

    async fn point(&self, side: Side) -> Result<(), Error> {
        let selected = match (side, &self.source_pods) {
            (Side::Source, SourcePods::Original) => {
                return restore_clients(&self.api, &self.service)
                    .await
                    .map_err(|e| {
                        Error::Route(format!(
                            "pointing Service {} back at the source: {e}",
                            self.service
                        ))
                    })
            }
            (
                Side::Source,
                SourcePods::Selected {
                    selector,
                    target_port,
                },
            ) => Some((selector, target_port)),
            _ => None,
        };
        let service = self
            .api
            .get(&self.service)
            .await
            .map_err(|e| Error::Route(format!("reading Service {}: {e}", self.service)))?;
        let patch = match selected {
            Some((selector, target_port)) => point_patch(&service, selector, target_port),
            None => selector_patch(&service, &self.names, role::TARGET),
        };
        self.api
            .patch(
                &self.service,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await
            .map_err(|e| {
                Error::Route(format!(
                    "pointing Service {} at the {side}: {e}",
                    self.service
                ))
            })?;
        Ok(())
    }

    /// Waits until new connections through the Service reach `side`'s server.
    async fn confirm(&self, side: Side) -> Result<(), Error> {
        let proof = match side {
            Side::Source => &self.source,
            _ => &self.target,
        };
        let wanted = system_identifier(&proof.server)
            .await
            .ok_or_else(|| Error::Route(format!("cannot read the {side}'s system identifier")))?;
        let started = Instant::now();
        let mut in_a_row = 0;
        while in_a_row < CONFIRMATIONS {
            if started.elapsed() > ROUTE_TIMEOUT {
                return Err(Error::Route(format!(
                    "Service {} still does not reach the {side} after {ROUTE_TIMEOUT:?}",
                    self.service
                )));
            }
            in_a_row =
                match system_identifier(&proof.probe).await.as_deref() == Some(wanted.as_str()) {
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
    /// Toward the target at the switch; toward the source at a rollback's switch and to undo
    /// `isolate` after an aborted attempt. Either way proven before it returns.
    fn route_to(&self, side: Side) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.point(side).await?;
            self.confirm(side).await
        })
    }

    fn isolate(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let isolating = |e: kube::Error| {
                Error::Route(format!(
                    "isolating Service {} for the fence: {e}",
                    self.service
                ))
            };
            let service = self.api.get(&self.service).await.map_err(isolating)?;
            route_clients(&self.api, &service, &self.names, role::ISOLATED)
                .await
                .map_err(isolating)
        })
    }
}

/// A JSON patch that points a Service at one role's pods, on their `postgres` port.
pub fn selector_patch(service: &Service, names: &Names, role: &str) -> json_patch::Patch {
    point_patch(service, &names.selector(role), &json!("postgres"))
}

/// A JSON patch that points a Service at the pods `selector` selects, every port at
/// `target_port`. Replacing (not merging) the selector: a merge would keep the old keys and
/// select nothing.
pub fn point_patch(
    service: &Service,
    selector: &BTreeMap<String, String>,
    target_port: &Value,
) -> json_patch::Patch {
    let mut operations =
        vec![json!({"op": "replace", "path": "/spec/selector", "value": selector})];
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map_or(0, Vec::len);
    for index in 0..ports {
        operations.push(json!({"op": "replace", "path": format!("/spec/ports/{index}/targetPort"), "value": target_port}));
    }
    serde_json::from_value(json!(operations)).expect("a JSON patch")
}

/// Points the clients' Service at one role's pods, keeping its original selector and ports in
/// an annotation (in the same write) so that an abort can put them back. An annotation already
/// there is kept: it holds the original, and the Service may point at the target by now (a
/// rollback's fence isolates it again).
pub async fn route_clients(
    services: &Api<Service>,
    service: &Service,
    names: &Names,
    role: &str,
) -> Result<(), kube::Error> {
    services
        .patch(
            &service.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(clients_patch(service, names, role)),
        )
        .await?;
    Ok(())
}

/// [`route_clients`]'s patch.
pub fn clients_patch(service: &Service, names: &Names, role: &str) -> json_patch::Patch {
    let mut patch = selector_patch(service, names, role);
    if service.annotations().contains_key(ORIGINAL_ANNOTATION) {
        return patch;
    }
    let spec = service.spec.clone().unwrap_or_default();
    let original = json!({"selector": spec.selector, "ports": spec.ports}).to_string();
    let annotation = if service.metadata.annotations.is_some() {
        json!({"op": "add", "path": format!("/metadata/annotations/{}", ORIGINAL_ANNOTATION.replace('/', "~1")), "value": original})
    } else {
        json!({"op": "add", "path": "/metadata/annotations", "value": {ORIGINAL_ANNOTATION: original}})
    };
    let annotation: json_patch::Patch =
        serde_json::from_value(json!([annotation])).expect("a JSON patch");
    patch.0.extend(annotation.0);
    patch
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

    /// A rollback points PgBouncer's route back at the source's pods on the source Service's
    /// own target port.
    #[test]
    fn the_route_goes_back_to_the_source_pods_on_their_port() {
        let route: Service = serde_json::from_value(json!({
            "metadata": {"name": "orders-route"},
            "spec": {"selector": {"pgshift.io/role": "target", "pgshift.io/upgrade": "orders"},
                     "ports": [{"port": 5432, "targetPort": "postgres"}]},
        }))
        .unwrap();
        let source = BTreeMap::from([("app".to_string(), "db".to_string())]);
        let patch = serde_json::to_value(point_patch(&route, &source, &json!("pg"))).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "replace", "path": "/spec/selector", "value": {"app": "db"}},
                {"op": "replace", "path": "/spec/ports/0/targetPort", "value": "pg"},
            ])
        );
    }

    /// The annotation holds the Service as the clients had it: a second `isolate` (a
    /// rollback's fence, with the Service on the target) must not overwrite it.
    #[test]
    fn isolating_keeps_the_original_the_first_move_recorded() {
        let names = Names::new("orders");
        let untouched: Service = serde_json::from_value(json!({
            "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432, "targetPort": 5432}]},
        }))
        .unwrap();
        let first =
            serde_json::to_value(clients_patch(&untouched, &names, role::ISOLATED)).unwrap();
        let recorded = &first[2]["value"][ORIGINAL_ANNOTATION];
        assert_eq!(
            serde_json::from_str::<Value>(recorded.as_str().unwrap()).unwrap(),
            json!({"selector": {"app": "db"}, "ports": [{"port": 5432, "targetPort": 5432}]})
        );
        let mut on_target = untouched.clone();
        on_target.spec.as_mut().unwrap().selector = Some(names.selector(role::TARGET));
        on_target.metadata.annotations = Some(BTreeMap::from([(
            ORIGINAL_ANNOTATION.to_string(),
            recorded.as_str().unwrap().to_string(),
        )]));
        let again =
            serde_json::to_value(clients_patch(&on_target, &names, role::ISOLATED)).unwrap();
        assert_eq!(
            again,
            json!([
                {"op": "replace", "path": "/spec/selector", "value": {"pgshift.io/role": "isolated", "pgshift.io/upgrade": "orders"}},
                {"op": "replace", "path": "/spec/ports/0/targetPort", "value": "postgres"},
            ])
        );
    }
}
