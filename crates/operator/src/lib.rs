//! pgshift's Kubernetes face: the `PostgresUpgrade` resource and the controller that drives
//! the engine for it. Pure steps (validate, build, status) are apart from those that talk to
//! the API server or the databases (cluster, reconcile, router).

pub mod build;
pub mod cluster;
pub mod connect;
pub mod controller;
pub mod crd;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod provision;
pub mod reconcile;
pub mod router;
pub mod status;
pub mod validate;
