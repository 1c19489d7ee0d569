//! What can stop a benchmark run.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Lab(#[from] pgshift_lab::Error),

    #[error("pgshift failed: {0}")]
    Engine(#[from] pgshift_engine::Error),

    #[error("{context}: {source}")]
    Pg {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{tool} exited with {status}: {stderr}")]
    Tool {
        tool: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("{tool} is not installed: {install}")]
    MissingTool {
        tool: &'static str,
        install: &'static str,
    },

    #[error("{0}")]
    Timeout(String),

    #[error("the upgraded server exited with {0} before accepting connections")]
    UpgradedServerExited(std::process::ExitStatus),

    #[error("pgshift stopped at {0}, not ready for the cutover")]
    NotReady(&'static str),

    #[error("cannot print the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, BenchError>;

/// Adds what was being done to a driver error.
pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Pg { context, source }
}

/// Adds what was being done to an I/O error.
pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}
