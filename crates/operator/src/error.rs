//! What can stop a reconcile, each with a kind for metrics and a message for status and events.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{0}")]
    Engine(#[from] pgshift_engine::Error),

    #[error("the schema copy Job {job} for database {database} failed: {message}. The restore is one transaction, so nothing was kept; pgshift tries again with a new Job every 30 s until the cause is fixed")]
    SchemaCopyFailed {
        job: String,
        database: String,
        message: String,
    },

    #[error("{0}")]
    Finalizer(String),

    #[error(transparent)]
    Restore(#[from] crate::router::RestoreError),
}

impl Error {
    /// A short name for metrics and event reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Engine(e) if e.is_connection() => "Connection",
            Error::Engine(pgshift_engine::Error::CutoverAborted { .. }) => "CutoverAborted",
            Error::Engine(pgshift_engine::Error::ApplyFailing { .. }) => "ApplyFailing",
            Error::Engine(pgshift_engine::Error::Sql { .. }) => "Sql",
            Error::Engine(pgshift_engine::Error::Busy { .. }) => "Busy",
            Error::Engine(_) => "Engine",
            Error::SchemaCopyFailed { .. } => "SchemaCopyFailed",
            Error::Finalizer(_) => "Finalizer",
            Error::Restore(_) => "RestoreService",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
