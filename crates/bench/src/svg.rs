//! The pictures, as plain SVG: client commit latency over time around the upgrade for each
//! method, each method's time to ready, pgshift's pause against the work, and its catch-up
//! against the source's write rate.

use std::fmt::Write;

use pgshift_lab::ledger::Outcome;

use crate::catch_up::CatchUpPoint;
use crate::figures::MethodFigures;
use crate::scaling::ScalingPoint;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 170.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
/// Latency axis, log scale, in ms.
const Y_MIN_MS: f64 = 0.1;
const Y_MAX_MS: f64 = 10_000.0;
/// Attempts are drawn as the slowest of each bucket, which keeps every pause visible.
const BUCKET_S: f64 = 0.05;

/// One panel per measured method: the slowest attempt of each 50 ms (blue: committed; red:
/// failed; orange: in doubt), the upgrade shaded.
pub fn latency(methods: &[MethodFigures]) -> String {
    let methods: Vec<&MethodFigures> = methods.iter().filter(|m| m.not_run.is_none()).collect();
    let height = TOP + PANEL * methods.len() as f64 + 20.0;
    let mut svg = header(
        height,
        "Client transaction latency around the upgrade (log scale; shaded: the upgrade)",
    );
    for (i, m) in methods.iter().enumerate() {
        let top = TOP + PANEL * i as f64;
        let (t0, t1) = m
            .attempts
            .iter()
            .fold((0.0_f64, m.total_ms / 1e3), |(lo, hi), a| {
                (lo.min(a.at_s), hi.max(a.at_s))
            });
        let span = (t1 - t0).max(1e-3);
        let plot = Area {
            left: LEFT,
            top: top + 20.0,
            width: WIDTH - LEFT - RIGHT,
            height: PANEL - 45.0,
        };
        let x = |t: f64| plot.left + (t - t0) / span * plot.width;
        let y = |ms: f64| {
            let v = ms.clamp(Y_MIN_MS, Y_MAX_MS);
            plot.top + plot.height
                - (v / Y_MIN_MS).log10() / (Y_MAX_MS / Y_MIN_MS).log10() * plot.height
        };
        let _ = write!(
            svg,
            r##"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"##,
            top + 14.0,
            m.name
        );
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#eee"/>"##,
            x(0.0),
            plot.top,
            (x(m.total_ms / 1e3) - x(0.0)).max(1.0),
            plot.height
        );
        plot.frame(&mut svg);
        for ms in [1.0, 10.0, 100.0, 1000.0] {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{ms} ms</text><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                LEFT - 4.0,
                y(ms) + 3.0,
                plot.left,
                plot.left + plot.width,
                y(ms),
                y(ms)
            );
        }
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="10">{t0:.1} s</text><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{t1:.1} s (from the upgrade's start)</text>"##,
            plot.left,
            plot.top + plot.height + 12.0,
            plot.left + plot.width,
            plot.top + plot.height + 12.0
        );
        for (outcome, colour) in [
            (Outcome::Committed, "#1f5fbf"),
            (Outcome::Failed, "#d62728"),
            (Outcome::InDoubt, "#ff7f0e"),
        ] {
            let buckets = ((span / BUCKET_S).ceil() as usize).max(1);
            let mut slowest = vec![f64::NAN; buckets + 1];
            for a in m.attempts.iter().filter(|a| a.outcome == outcome) {
                let b = ((a.at_s - t0) / BUCKET_S) as usize;
                if let Some(cell) = slowest.get_mut(b) {
                    *cell = if cell.is_nan() {
                        a.latency_ms
                    } else {
                        cell.max(a.latency_ms)
                    };
                }
            }
            for (b, ms) in slowest.iter().enumerate().filter(|(_, ms)| !ms.is_nan()) {
                let _ = write!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{colour}"/>"##,
                    x(t0 + b as f64 * BUCKET_S),
                    y(*ms)
                );
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// One panel per dimension: the longest transaction during the fence (dots, joined) and
/// longest − p99 of the whole run (hollow), against the dimension's value.
pub fn scaling(points: &[ScalingPoint]) -> String {
    let mut dimensions: Vec<&str> = Vec::new();
    for p in points {
        if !dimensions.contains(&p.dimension) {
            dimensions.push(p.dimension);
        }
    }
    let height = TOP + PANEL * dimensions.len() as f64 + 20.0;
    let mut svg = header(height, "pgshift through PgBouncer: pause against the work (filled: longest transaction during the fence; hollow: longest - p99 of the run)");
    for (i, dimension) in dimensions.iter().enumerate() {
        let top = TOP + PANEL * i as f64;
        let mine: Vec<&ScalingPoint> = points
            .iter()
            .filter(|p| p.dimension == *dimension && p.error.is_none())
            .collect();
        let plot = Area {
            left: LEFT,
            top: top + 20.0,
            width: WIDTH - LEFT - RIGHT,
            height: PANEL - 45.0,
        };
        let y_max = mine
            .iter()
            .flat_map(|p| [p.pause_ms, p.longest_in_cutover_ms.unwrap_or(0.0)])
            .fold(10.0_f64, f64::max)
            * 1.1;
        let y = |ms: f64| plot.top + plot.height - ms / y_max * plot.height;
        let slot = plot.width / mine.len().max(1) as f64;
        let x = |i: usize| plot.left + slot * (i as f64 + 0.5);
        let _ = write!(
            svg,
            r##"<text x="{LEFT}" y="{:.1}" font-weight="bold">{dimension}</text><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{y_max:.0} ms</text><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">0</text>"##,
            top + 14.0,
            LEFT - 4.0,
            plot.top + 8.0,
            LEFT - 4.0,
            plot.top + plot.height
        );
        plot.frame(&mut svg);
        let mut line = String::new();
        for (i, p) in mine.iter().enumerate() {
            let _ = write!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="none" stroke="#888"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"##,
                x(i),
                y(p.pause_ms),
                x(i),
                plot.top + plot.height + 12.0,
                label(p.value)
            );
            if let Some(ms) = p.longest_in_cutover_ms {
                let _ = write!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#1f5fbf"/>"##,
                    x(i),
                    y(ms)
                );
                let _ = write!(line, "{:.1},{:.1} ", x(i), y(ms));
            }
        }
        let _ = write!(
            svg,
            r##"<polyline points="{line}" fill="none" stroke="#1f5fbf"/>"##
        );
    }
    svg.push_str("</svg>\n");
    svg
}

const BAR: f64 = 26.0;
const BAR_LEFT: f64 = 190.0;

/// One bar per measured method: from the start of the upgrade until the new server holds
/// everything (online methods: caught up, ready for the cutover); pgshift's bars in blue.
pub fn time_to_ready(methods: &[MethodFigures]) -> String {
    let methods: Vec<&MethodFigures> = methods
        .iter()
        .filter(|m| m.not_run.is_none() && m.time_to_ready_ms.is_finite())
        .collect();
    let height = TOP + BAR * methods.len() as f64 + 30.0;
    let mut svg = header(
        height,
        "Time until the new server holds everything (online methods: ready for the cutover)",
    );
    let longest = methods
        .iter()
        .map(|m| m.time_to_ready_ms)
        .fold(1.0_f64, f64::max);
    let width = WIDTH - BAR_LEFT - RIGHT - 60.0;
    for (i, m) in methods.iter().enumerate() {
        let top = TOP + BAR * i as f64;
        let colour = if m.name.starts_with("pgshift") {
            "#1f5fbf"
        } else {
            "#999"
        };
        let length = (m.time_to_ready_ms / longest * width).max(1.0);
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{BAR_LEFT}" y="{:.1}" width="{length:.1}" height="{:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="11">{:.1} s</text>"##,
            BAR_LEFT - 6.0,
            top + BAR * 0.65,
            m.name,
            top + 4.0,
            BAR - 8.0,
            BAR_LEFT + length + 4.0,
            top + BAR * 0.65,
            m.time_to_ready_ms / 1e3
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One group per sweep point: the source's WAL rate (grey) and what apply confirmed (blue)
/// during pgshift's catch-up, labelled with the commit rate and whether it converged.
pub fn catch_up(points: &[CatchUpPoint]) -> String {
    let points: Vec<&CatchUpPoint> = points.iter().filter(|p| p.error.is_none()).collect();
    let height = TOP + PANEL + 40.0;
    let mut svg = header(
        height,
        "pgshift's catch-up: source WAL MB/s (grey) and applied MB/s (blue) per write rate",
    );
    let plot = Area {
        left: LEFT,
        top: TOP + 10.0,
        width: WIDTH - LEFT - RIGHT,
        height: PANEL - 20.0,
    };
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let y_max = points
        .iter()
        .flat_map(|p| [finite(p.source_bytes_per_s), finite(p.applied_bytes_per_s)])
        .fold(1e5_f64, f64::max)
        * 1.15;
    let y = |bytes: f64| plot.top + plot.height - finite(bytes) / y_max * plot.height;
    let slot = plot.width / points.len().max(1) as f64;
    plot.frame(&mut svg);
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{:.1} MB/s</text><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">0</text>"##,
        LEFT - 4.0,
        plot.top + 8.0,
        y_max / 1e6,
        LEFT - 4.0,
        plot.top + plot.height
    );
    for (i, p) in points.iter().enumerate() {
        let left = plot.left + slot * i as f64 + slot * 0.2;
        let bar = slot * 0.28;
        for (offset, bytes, colour) in [
            (0.0, p.source_bytes_per_s, "#999"),
            (bar, p.applied_bytes_per_s, "#1f5fbf"),
        ] {
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{colour}"/>"##,
                left + offset,
                y(bytes),
                plot.top + plot.height - y(bytes)
            );
        }
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{:.0} TPS, {} clients</text><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"##,
            left + bar,
            plot.top + plot.height + 13.0,
            p.source_tps,
            p.clients,
            left + bar,
            plot.top + plot.height + 26.0,
            if p.converged {
                format!("ready after {:.1} s of catch-up", p.catch_up_ms / 1e3)
            } else {
                "did not converge".to_string()
            }
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn label(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.0}")
    }
}

struct Area {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl Area {
    fn frame(&self, svg: &mut String) {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#999"/>"##,
            self.left, self.top, self.width, self.height
        );
    }
}

fn header(height: f64, title: &str) -> String {
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="18" font-size="13">{title}</text>"##
    )
}
