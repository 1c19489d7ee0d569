//! How pgshift's pause (through PgBouncer) grows with the work: database size, write rate,
//! number of tables and of sequences. Each point is one full pgshift run on a fresh source.

use serde::Serialize;

use crate::figures::MethodFigures;
use crate::lab::Workload;
use crate::pgshift::{self, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dimension {
    SizeGb,
    Tps,
    Tables,
    Sequences,
}

impl Dimension {
    fn name(self) -> &'static str {
        match self {
            Dimension::SizeGb => "size_gb",
            Dimension::Tps => "tps",
            Dimension::Tables => "tables",
            Dimension::Sequences => "sequences",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalingPoint {
    pub dimension: &'static str,
    /// Measured where it can be (size of the loaded database, commits per second achieved),
    /// else what was asked for (tables and sequences added).
    pub value: f64,
    /// Longest transaction − p99 over the whole run, initial copy included.
    pub pause_ms: f64,
    /// The longest transaction in flight during the fence: the cutover's own share.
    pub longest_in_cutover_ms: Option<f64>,
    pub write_unavailable_ms: f64,
    pub failed: u64,
    pub lost: u64,
    pub total_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ScalingPoint {
    /// pgshift lost or failed a transaction through PgBouncer, or did not finish.
    pub fn pgshift_broke(&self) -> bool {
        self.error.is_some() || self.lost > 0 || self.failed > 0
    }
}

/// The variations of `base` measured, quick or full.
fn variations(base: &Workload, quick: bool) -> Vec<(Dimension, Workload)> {
    let with = |change: &dyn Fn(&mut Workload)| {
        let mut work = base.clone();
        change(&mut work);
        work
    };
    let (scales, rates, tables, sequences): (&[u32], &[f64], &[u32], &[u32]) = if quick {
        (&[10, 40, 160], &[250.0, 1000.0], &[10, 250], &[10, 1000])
    } else {
        (&[77, 770, 3080], &[500.0, 2000.0], &[10, 1000], &[10, 5000])
    };
    let mut out = Vec::new();
    for &scale in scales {
        out.push((Dimension::SizeGb, with(&|w| w.scale = scale)));
    }
    for &rate in rates {
        out.push((Dimension::Tps, with(&|w| w.rate = Some(rate))));
    }
    // And the machine's maximum: no rate cap.
    out.push((Dimension::Tps, with(&|w| w.rate = None)));
    for &n in tables {
        out.push((Dimension::Tables, with(&|w| w.extra_tables = n)));
    }
    for &n in sequences {
        out.push((Dimension::Sequences, with(&|w| w.extra_sequences = n)));
    }
    out
}

pub async fn run(base: &Workload, quick: bool) -> Vec<ScalingPoint> {
    let mut points = Vec::new();
    for (dimension, work) in variations(base, quick) {
        tracing::info!(
            dimension = dimension.name(),
            scale = work.scale,
            rate = ?work.rate,
            tables = work.extra_tables,
            sequences = work.extra_sequences,
            "measuring a scaling point"
        );
        let asked = match dimension {
            Dimension::Tables => f64::from(work.extra_tables),
            Dimension::Sequences => f64::from(work.extra_sequences),
            Dimension::SizeGb | Dimension::Tps => f64::NAN,
        };
        let point = match pgshift::run(&work, Mode::Pgbouncer).await {
            Ok(figures) => point(dimension, asked, &figures),
            Err(e) => {
                tracing::error!(dimension = dimension.name(), "{e}");
                ScalingPoint {
                    dimension: dimension.name(),
                    value: asked,
                    pause_ms: f64::NAN,
                    longest_in_cutover_ms: None,
                    write_unavailable_ms: f64::NAN,
                    failed: 0,
                    lost: 0,
                    total_ms: f64::NAN,
                    error: Some(e.to_string()),
                }
            }
        };
        tracing::info!(?point, "measured");
        points.push(point);
    }
    points
}

fn point(dimension: Dimension, asked: f64, figures: &MethodFigures) -> ScalingPoint {
    let value = match dimension {
        Dimension::SizeGb => figures.size_mb / 1e3,
        Dimension::Tps => figures.tps,
        Dimension::Tables | Dimension::Sequences => asked,
    };
    ScalingPoint {
        dimension: dimension.name(),
        value,
        pause_ms: figures.pause_ms,
        longest_in_cutover_ms: figures.longest_in_cutover_ms,
        write_unavailable_ms: figures.write_unavailable_ms,
        failed: figures.failed,
        lost: figures.lost,
        total_ms: figures.total_ms,
        error: None,
    }
}
