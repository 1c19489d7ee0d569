//! The engine for one upgrade: its endpoints, its traffic (a Service router, PgBouncer's ready
//! pods as poolers) and its plan.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::Api;
use pgshift_engine::{Endpoint, Plan, Routed, Side, Traffic, Upgrade};

use crate::build;
use crate::cluster::{self, secret_value};
use crate::crd::TrafficMode;
use crate::error::Result;
use crate::names::{role, POSTGRES_PORT, TARGET_SUPERUSER};
use crate::reconcile::Context;
use crate::router::{Proof, ServiceRouter, SourcePods};
use crate::validate::Validated;

fn up_source(v: &Validated) -> Endpoint {
    Endpoint::new(
        Side::Source,
        &v.source.host,
        v.source.port,
        &v.source.user,
        "postgres",
        Some(v.source.password.clone()),
    )
}

pub fn target_endpoint(v: &Validated, password: &str) -> Endpoint {
    Endpoint::new(
        Side::Target,
        v.target_host.as_deref().unwrap_or_default(),
        POSTGRES_PORT as u16,
        TARGET_SUPERUSER,
        "postgres",
        Some(pgshift_engine::Secret::new(password)),
    )
}

/// The engine, for this upgrade: the clients' route is a Service (the route Service behind
/// PgBouncer, or the clients' own in `Service` mode); `poolers` are the PgBouncers it pauses
/// at the cutover ([`pooler_consoles`]).
pub async fn connect(
    v: &Validated,
    ctx: &Context,
    target: Endpoint,
    poolers: Vec<Endpoint>,
) -> Result<Upgrade> {
    let spec = &v.upgrade.spec;
    let source = up_source(v);
    let service = match spec.traffic.mode {
        TrafficMode::PgBouncer => v.names.route(),
        TrafficMode::Service => spec.traffic.service.clone(),
    };
    // Logins through the route's address prove where it points.
    let route_ip = Api::<Service>::namespaced(ctx.client.clone(), &v.namespace)
        .get_opt(&service)
        .await?
        .and_then(|s| s.spec?.cluster_ip);
    let through_route = |server: &Endpoint| {
        let mut probe = server.clone();
        if let Some(ip) = &route_ip {
            probe.host = ip.clone();
            probe.port = POSTGRES_PORT as u16;
        }
        Proof {
            probe,
            server: server.clone(),
        }
    };
    let router = ServiceRouter::new(
        ctx.client.clone(),
        &v.namespace,
        &service,
        v.names.clone(),
        source_pods(v),
        (through_route(&source), through_route(&target)),
    );
    let mut plan = Plan::new(source, target);
    plan.databases = if spec.source.databases.is_empty() {
        pgshift_engine::Databases::All
    } else {
        pgshift_engine::Databases::Named(spec.source.databases.clone())
    };
    plan.traffic = Traffic::Routed(Box::new(Routed {
        poolers,
        router: Arc::new(router),
    }));
    plan.max_pause = v.max_pause;
    plan.schema_tools_in_target_image = true;
    // The operator drives one attempt per reconcile and counts them itself.
    plan.cutover_attempts = 1;
    plan.rollback_window = !v.rollback_window.is_zero();
    // No fence guard: a killed operator's pod takes a guard with it; the next leader recovers.
    plan.command = format!("operator for {}/{}", v.namespace, v.names.upgrade);
    let name = v.names.upgrade.clone();
    let events: pgshift_engine::EventSink = Arc::new(move |event| {
        tracing::debug!(upgrade = %name, ?event, "engine");
    });
    Ok(Upgrade::connect(plan, events).await?)
}

/// How a rollback points the route back at the source: PgBouncer's route at the pods the
/// source Service selects (as pgshift made it), the clients' own Service as it was before
/// pgshift changed it.
pub fn source_pods(v: &Validated) -> SourcePods {
    match v.upgrade.spec.traffic.mode {
        TrafficMode::PgBouncer => SourcePods::Selected {
            selector: v.source.selector.clone(),
            target_port: v.source.target_port.clone(),
        },
        TrafficMode::Service => SourcePods::Original,
    }
}

/// The admin consoles of PgBouncer's ready pods (none in `Service` mode).
pub async fn pooler_consoles(v: &Validated, ctx: &Context) -> Result<Vec<Endpoint>> {
    if v.upgrade.spec.traffic.mode != TrafficMode::PgBouncer {
        return Ok(Vec::new());
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &v.namespace);
    let Some(password) = secrets
        .get_opt(&v.names.pgbouncer())
        .await?
        .and_then(|s| secret_value(&s, "admin-password"))
    else {
        return Ok(Vec::new());
    };
    let ips = cluster::ready_pod_ips(
        &ctx.client,
        &v.namespace,
        &v.names.selector(role::PGBOUNCER),
    )
    .await?;
    Ok(ips
        .into_iter()
        .map(|ip| {
            Endpoint::new(
                Side::Pgbouncer,
                &ip,
                POSTGRES_PORT as u16,
                build::PGBOUNCER_ADMIN,
                "pgbouncer",
                Some(pgshift_engine::Secret::new(password.clone())),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PostgresUpgrade;
    use crate::validate::tests::{fixture, inputs};
    use crate::validate::validate;

    #[test]
    fn a_rollback_routes_to_the_source_pods_behind_pgbouncer_and_to_the_original_service_without() {
        let pgbouncer: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        let v = validate(&pgbouncer, &inputs()).unwrap();
        // The route Service as build made it toward the source.
        let route = crate::build::route_service(&v, false).spec.unwrap();
        assert_eq!(
            source_pods(&v),
            SourcePods::Selected {
                selector: route.selector.unwrap(),
                target_port: serde_json::to_value(route.ports.unwrap()[0].target_port.clone())
                    .unwrap(),
            }
        );
        let service_mode: PostgresUpgrade = fixture("upgrade-rollback.yaml");
        let v = validate(&service_mode, &inputs()).unwrap();
        assert_eq!(source_pods(&v), SourcePods::Original);
    }
}
