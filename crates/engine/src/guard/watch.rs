//! The guard's side: watches the worker and, if it goes (or overruns) while armed, ends its
//! server sessions and releases the clients the way any later pgshift would.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::wire::{Config, FromGuard, ToGuard};
use super::GRACE;
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::Event;
use crate::upgrade::Upgrade;

/// How long the guard keeps trying to release clients (a server may be restarting).
const RECOVERY_PERSISTENCE: Duration = Duration::from_secs(30);

/// Runs the guard: reads its configuration from stdin, reports ready on stdout, then watches.
/// Returns when the worker released the clients, or when the guard did.
pub async fn serve() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .map_err(|e| Error::Guard(format!("reading the configuration: {e}")))?
        .ok_or_else(|| Error::Guard("no configuration on stdin".into()))?;
    let config: Config = serde_json::from_str(&first)
        .map_err(|e| Error::Guard(format!("the configuration is not what pgshift writes: {e}")))?;
    let mut stdout = tokio::io::stdout();
    let mut up = match Upgrade::for_guard(config.plan(), std::sync::Arc::new(say)).await {
        Ok(up) => up,
        Err(error) => {
            reply(
                &mut stdout,
                &FromGuard::Failed {
                    message: error.to_string(),
                },
            )
            .await;
            return Err(error);
        }
    };
    reply(
        &mut stdout,
        &FromGuard::Ready {
            source_pids: up.own_source_pids.clone(),
            target_pids: up.own_target_pids.clone(),
        },
    )
    .await;

    let mut deadline: Option<Instant> = None;
    loop {
        let next = match deadline {
            None => Ok(lines.next_line().await),
            Some(at) => tokio::time::timeout_at(at.into(), lines.next_line()).await,
        };
        match next {
            Ok(Ok(Some(line))) => match serde_json::from_str::<ToGuard>(&line) {
                Ok(ToGuard::Armed) => deadline = Some(Instant::now() + config.max_pause() + GRACE),
                Ok(ToGuard::Released) => return Ok(()),
                Err(_) => {}
            },
            // The pipe closed: the worker is gone (or gave up on this attempt).
            Ok(Ok(None)) | Ok(Err(_)) => {
                if deadline.is_none() {
                    return Ok(());
                }
                say(Event::Warning {
                    message: format!(
                        "the pgshift process (pid {}) ended inside the cutover; releasing its clients",
                        config.worker_pid
                    ),
                });
                break;
            }
            // Armed and past the budget: the worker hangs. End it, then act in its place.
            Err(_) => {
                say(Event::Warning {
                    message: format!(
                        "the pgshift process (pid {}) overran the pause budget ({:?} + {GRACE:?}); ending it and releasing its clients",
                        config.worker_pid,
                        config.max_pause()
                    ),
                });
                // SAFETY: kill has no memory effects; the pid is the worker's, alive while its
                // pipe to us is open.
                unsafe {
                    libc::kill(config.worker_pid as libc::pid_t, libc::SIGKILL);
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(Some(_)) = lines.next_line().await {}
                })
                .await;
                break;
            }
        }
    }
    release(&mut up, &config).await
}

/// Ends the worker's sessions, then finishes or lifts the fence, retrying for a while.
async fn release(up: &mut Upgrade, config: &Config) -> Result<()> {
    let started = Instant::now();
    loop {
        let attempt = async {
            end_sessions(up, Side::Source, &config.worker_source_pids).await?;
            end_sessions(up, Side::Target, &config.worker_target_pids).await?;
            up.recover().await
        };
        match attempt.await {
            Ok(()) => {
                say(Event::Warning {
                    message: format!(
                        "clients released {:.0} ms after the pgshift process ended; run pgshift again to carry on",
                        started.elapsed().as_secs_f64() * 1e3
                    ),
                });
                return Ok(());
            }
            Err(error) if started.elapsed() < RECOVERY_PERSISTENCE => {
                say(Event::Warning {
                    message: format!("releasing clients failed ({error}); trying again"),
                });
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Terminates the given server processes and waits until they are gone: a statement of theirs
/// can then no longer commit behind the guard's back.
async fn end_sessions(up: &Upgrade, side: Side, pids: &[i32]) -> Result<()> {
    let server = match side {
        Side::Target => &up.target_admin,
        _ => &up.source_admin,
    };
    // Only pgshift's own sessions: a process id the worker reported for one server must never
    // end a client's session that happens to have it on the other.
    server
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE pid = ANY($1) AND application_name LIKE 'pgshift%'",
            &[&pids],
        )
        .await
        .on(side, "ending the dead pgshift's sessions")?;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let left: i64 = server
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1) AND application_name LIKE 'pgshift%'",
                &[&pids],
            )
            .await
            .on(side, "waiting for the dead pgshift's sessions to end")?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(Error::Guard(format!(
        "the dead pgshift's sessions on the {side} did not end within 5 s"
    )))
}

async fn reply(stdout: &mut tokio::io::Stdout, message: &FromGuard) {
    let mut line = serde_json::to_string(message).expect("messages serialize");
    line.push('\n');
    // The worker may be gone already; nothing to do about a closed pipe.
    let _ = stdout.write_all(line.as_bytes()).await;
    let _ = stdout.flush().await;
}

/// The guard's messages go to stderr, which it shares with the worker.
fn say(event: Event) {
    if let Event::Warning { message } = event {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "pgshift fence guard: {message}");
    }
}
