//! Errors of the test kit; each says what to do about it.

use std::path::PathBuf;

/// Result of the test kit's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while starting or talking to the local cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control-plane binaries have not been built.
    #[error(
        "Kubernetes binaries not found: run `cargo xtask test` (it builds them); \
         looked for {missing} in {}", dir.display()
    )]
    KubeBinariesNotFound {
        /// Where they were looked for.
        dir: PathBuf,
        /// The first one missing.
        missing: String,
    },

    /// The unprivileged user that runs PostgreSQL and PgBouncer does not exist.
    #[error("user {user:?} not found: run `cargo xtask setup` (it creates it); PostgreSQL refuses to run as root")]
    UserNotFound {
        /// The user name.
        user: String,
    },

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Generating the cluster's certificates failed.
    #[error("cannot generate the cluster's certificates: {0}")]
    Certificate(#[from] rcgen::Error),

    /// A control-plane component exited while the cluster was starting.
    #[error("{component} exited ({status}) while the cluster was starting; last lines of {}:\n{tail}", log.display())]
    ComponentExited {
        /// etcd, kube-apiserver, ...
        component: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of that log.
        tail: String,
    },

    /// Something the cluster waits for did not happen in time.
    #[error("timed out after {secs} s waiting for {what}; the components' logs are in {}", logs.display())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
        /// The directory with the components' logs.
        logs: PathBuf,
    },

    /// A request to the API server failed.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },

    /// The kubeconfig the cluster wrote could not be loaded.
    #[error("cannot load the kubeconfig {}: {message}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            context: context.into(),
            source,
        }
    }
}
