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
use crate::router::ServiceRouter;
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
    let mut probe = target.clone();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &v.namespace);
    if let Some(ip) = services
        .get_opt(&service)
        .await?
        .and_then(|s| s.spec?.cluster_ip)
    {
        probe.host = ip;
    }
    let router = ServiceRouter::new(
        ctx.client.clone(),
        &v.namespace,
        &service,
        v.names.clone(),
        probe,
        target.clone(),
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
    // No rollback window in the operator yet: its router moves clients to the target only.
    plan.rollback_window = false;
    // No fence guard: a killed operator's pod takes a guard with it; the next leader recovers.
    plan.command = format!("operator for {}/{}", v.namespace, v.names.upgrade);
    let name = v.names.upgrade.clone();
    let events: pgshift_engine::EventSink = Arc::new(move |event| {
        tracing::debug!(upgrade = %name, ?event, "engine");
    });
    Ok(Upgrade::connect(plan, events).await?)
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
