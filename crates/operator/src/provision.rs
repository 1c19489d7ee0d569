//! The Kubernetes objects an upgrade needs before the engine can work: pgshift's own Service to
//! the source, the target server, and PgBouncer in front of the clients.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use crate::build;
use crate::cluster::{self, create_if_absent, secret_value};
use crate::crd::Phase;
use crate::error::Result;
use crate::names::{role, ORIGINAL_ANNOTATION, POSTGRES_PORT};
use crate::reconcile::Context;
use crate::router::route_clients;
use crate::status::Report;
use crate::validate::Validated;

/// With a source Service, pgshift reaches the source through a Service of its own with the
/// same selector: the one the spec names may be the clients', which pgshift moves.
pub async fn reach_source(v: &mut Validated, ctx: &Context) -> Result<()> {
    if v.upgrade.spec.source.service.is_none() {
        return Ok(());
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &v.namespace);
    let own = create_if_absent(&services, &build::source_service(v)).await?;
    if let Some(ip) = own.spec.and_then(|s| s.cluster_ip) {
        v.source.host = ip;
        v.source.port = POSTGRES_PORT as u16;
    }
    Ok(())
}

/// The target's Secret, Service and StatefulSet (left as they are once released, after
/// completion). Returns the superuser's password once the server is ready and its Service has
/// an address.
pub async fn provision_target(v: &mut Validated, ctx: &Context) -> Result<Option<String>> {
    let ns = &v.namespace;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = create_if_absent(&secrets, &build::target_secret(v, &random_password())).await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let service = cluster::apply_unless_released(&services, &build::target_service(v)).await?;
    v.target_host = service.spec.and_then(|s| s.cluster_ip);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let set = cluster::apply_unless_released(&sets, &build::target_statefulset(v)).await?;
    let ready = set.status.and_then(|s| s.ready_replicas).unwrap_or(0) >= 1;
    Ok(match (ready, &v.target_host) {
        (true, Some(_)) => secret_value(&secret, "password"),
        _ => None,
    })
}

fn random_password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

/// PgBouncer in front of the source, and the clients' Service pointed at it. True once every
/// replica is ready and the clients' Service selects them.
pub async fn provision_pgbouncer(
    v: &Validated,
    ctx: &Context,
    report: &mut Report,
) -> Result<bool> {
    let ns = &v.namespace;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let route = create_if_absent(&services, &build::route_service(v, false)).await?;
    let route_host = route.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    create_if_absent(
        &secrets,
        &build::pgbouncer_secret(v, &random_password(), v.source.password.expose()),
    )
    .await?;
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    cluster::apply(&maps, &build::pgbouncer_config(v, &route_host)).await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let deployment = cluster::apply(&deployments, &build::pgbouncer_deployment(v)).await?;
    let wanted = v.upgrade.spec.traffic.pgbouncer.replicas;
    let ready = deployment
        .status
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    if ready < wanted {
        report.phase(
            Phase::Provisioning,
            "PgBouncerStarting",
            &format!("waiting for PgBouncer: {ready} of {wanted} replicas ready"),
        );
        return Ok(false);
    }
    let client_service = services.get(&v.upgrade.spec.traffic.service).await?;
    if !client_service
        .annotations()
        .contains_key(ORIGINAL_ANNOTATION)
    {
        route_clients(&services, &client_service, &v.names, role::PGBOUNCER).await?;
        report.event(
            EventType::Normal,
            "ClientsRouted",
            &format!(
                "Service {} now reaches the source through PgBouncer ({wanted} replicas)",
                v.upgrade.spec.traffic.service
            ),
        );
    }
    Ok(true)
}
