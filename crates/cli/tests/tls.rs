//! TLS with libpq's semantics on every connection: TLS-only servers (PostgreSQL 13 from npm and
//! Debian's 15, both built with OpenSSL) with certificates from a CA the test makes, pgshift
//! with `sslmode=verify-full` to both servers and to PgBouncer's admin console, PgBouncer to
//! the servers with `server_tls_sslmode=verify-full`, the subscriptions both ways over TLS.
//! Each certificate problem is refused by name, with the fix, before anything changes.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{caught_up, ledger_database, through, Pair, APP_PASSWORD, APP_USER};
use pgshift_lab::ledger::{Ledger, LedgerTarget, LoadOptions};
use pgshift_lab::tls::{
    write_pair, CertFiles, CertificateAuthority, ServerTls, Validity, SERVER_NAMES,
};
use pgshift_lab::{BouncerDatabase, BouncerOptions, PgBouncer, PgServer, ServerOptions};
use support::{assert_untouched, nothing_lost, nothing_lost_but_ended, pgshift};

const SOURCE_MAJOR: u32 = 13;
const TARGET_MAJOR: u32 = 15;
/// Debian's PostgreSQL 15 client tools, built with OpenSSL.
const TOOLS: &str = "/usr/lib/postgresql/15/bin";
/// A role that logs in to the source with a client certificate (`cert` in pg_hba.conf).
const CERT_USER: &str = "pgshift_cert";

/// A CA, the certificates a test needs from it, and TLS-only servers.
struct Pki {
    ca: PathBuf,
    authority: CertificateAuthority,
    server: CertFiles,
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let authority = CertificateAuthority::new("pgshift-test-ca").unwrap();
        let ca = authority.write_cert(dir, "ca").unwrap();
        let server = write_pair(
            dir,
            "server",
            &authority
                .issue_server(SERVER_NAMES, Validity::Current)
                .unwrap(),
        )
        .unwrap();
        Pki {
            ca,
            authority,
            server,
            dir: dir.to_path_buf(),
        }
    }

    /// Another certificate for the servers, from the same CA.
    fn server_cert(&self, name: &str, names: &[&str], validity: Validity) -> CertFiles {
        let issued = self.authority.issue_server(names, validity).unwrap();
        write_pair(&self.dir, name, &issued).unwrap()
    }

    /// `sslmode=verify-full&sslrootcert=…` for a URL.
    fn verify_full(&self) -> String {
        format!("sslmode=verify-full&sslrootcert={}", self.ca.display())
    }
}

/// A TLS-only source (which also lets [`CERT_USER`] in by certificate) and a TLS-only target.
async fn tls_pair() -> (Pair, Pki) {
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let only = ServerTls::new(pki.server.clone()).only();
    let (source, target) = tokio::join!(
        PgServer::start(
            ServerOptions::new(SOURCE_MAJOR, dir.path(), "source")
                .tls(only.clone().cert_login(CERT_USER, pki.ca.clone()))
        ),
        PgServer::start(ServerOptions::new(TARGET_MAJOR, dir.path(), "target").tls(only)),
    );
    let pair = Pair {
        source: source.expect("the TLS-only source starts"),
        target: target.expect("the TLS-only target starts"),
        dir,
    };
    (pair, pki)
}

fn url(server: &PgServer, user: &str, params: &str) -> String {
    format!(
        "postgres://{user}@{}:{}/app?{params}",
        server.host(),
        server.port()
    )
}

fn pgpass(pair: &Pair, bouncer: Option<&PgBouncer>) -> PathBuf {
    let path = pair.dir.path().join("pgpass");
    pgshift_lab::write_pgpass(&path, &[&pair.source, &pair.target]).unwrap();
    if let Some(bouncer) = bouncer {
        let mut entries = std::fs::read_to_string(&path).unwrap();
        entries.push_str(&bouncer.admin_pgpass_entry().line());
        entries.push('\n');
        std::fs::write(&path, entries).unwrap();
    }
    path
}

fn text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn succeeds(pgpass: &Path, args: &[&str]) -> String {
    let output = pgshift(pgpass, args);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{}",
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until the source's subscription to the target (the rollback window) streams: the
/// target has a walsender for it, over TLS.
async fn back_stream_streams_over_tls(pair: &Pair) {
    support::until(
        "the back stream streams",
        Duration::from_secs(30),
        || async {
            let rows = pair
                .target
                .connect("postgres")
                .await
                .unwrap()
                .query(
                    "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)
                 WHERE r.application_name LIKE 'pgshift%' AND r.state = 'streaming'",
                    &[],
                )
                .await
                .unwrap();
            rows.iter().any(|row| row.get::<_, bool>(0))
        },
    )
    .await;
}

/// Each subscription's connection string on `server` (database `app`): what that server uses
/// to reach the other one.
async fn subscription_conninfos(server: &PgServer) -> Vec<String> {
    let client = server.connect("app").await.unwrap();
    let rows = client
        .query(
            "SELECT subconninfo FROM pg_subscription
             WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

/// The one subscription on `server` (the target's to the source: `forward`; the source's to
/// the target, the rollback window: `back`) verifies the other server as pgshift did.
async fn subscription_verifies_full(server: &PgServer, stream: &str, pki: &Pki) {
    let conninfos = subscription_conninfos(server).await;
    assert_eq!(
        conninfos.len(),
        1,
        "the {stream} subscription: {conninfos:?}"
    );
    let conninfo = &conninfos[0];
    let root_cert = format!("sslrootcert='{}'", pki.ca.display());
    assert!(
        conninfo.contains("sslmode=verify-full") && conninfo.contains(&root_cert),
        "the {stream} subscription does not verify the other server: {conninfo}"
    );
}

#[tokio::test]
async fn tls_only_servers_upgrade_through_pgbouncer_with_verify_full_everywhere_and_lose_nothing() {
    let (pair, pki) = tls_pair().await;
    ledger_database(&pair).await;
    // PgBouncer verifies the servers (verify-full) and serves TLS to its own clients.
    let bouncer_cert = pki.server_cert("bouncer", SERVER_NAMES, Validity::Current);
    let mut entry = BouncerDatabase::for_server(&pair.source, "app");
    entry.user = APP_USER.into();
    entry.password = APP_PASSWORD.into();
    let bouncer = PgBouncer::start(
        BouncerOptions::new(pair.dir.path(), vec![entry])
            .setting("server_tls_sslmode", "verify-full")
            .setting("server_tls_ca_file", pki.ca.display().to_string())
            .setting("client_tls_sslmode", "allow")
            .setting(
                "client_tls_cert_file",
                bouncer_cert.cert.display().to_string(),
            )
            .setting(
                "client_tls_key_file",
                bouncer_cert.key.display().to_string(),
            ),
    )
    .await
    .expect("pgbouncer starts");
    let pgpass = pgpass(&pair, Some(&bouncer));
    let (source, target) = (
        url(&pair.source, "postgres", &pki.verify_full()),
        url(&pair.target, "postgres", &pki.verify_full()),
    );
    let admin = format!("{}?{}", bouncer.admin_url(), pki.verify_full());
    let config = bouncer.config_path().display().to_string();

    let load = Ledger::run(through(&bouncer), LoadOptions::new(4));
    let run = succeeds(
        &pgpass,
        &[
            "run",
            "--source",
            &source,
            "--target",
            &target,
            "--pg-bin-dir",
            TOOLS,
            "--pgbouncer",
            &admin,
            "--pgbouncer-config",
            &config,
        ],
    );
    assert!(run.contains("finished: window_open"), "{run}");
    let entry = std::fs::read_to_string(bouncer.config_path()).unwrap();
    assert!(
        entry.contains(&format!("port={}", pair.target.port())),
        "PgBouncer was not repointed:\n{entry}"
    );
    // The back stream: the source subscribes to the target, over TLS with verify-full.
    back_stream_streams_over_tls(&pair).await;
    subscription_verifies_full(&pair.source, "back", &pki).await;
    nothing_lost(load, &pair.target, Duration::from_secs(3)).await;
    // Every commit made on the new server since the switch reached the old one.
    caught_up(&pair.target, &pair.source, "app", "ledger_entries").await;
}

#[tokio::test]
async fn tls_only_servers_upgrade_in_direct_mode_with_settings_from_the_environment() {
    let (pair, pki) = tls_pair().await;
    ledger_database(&pair).await;
    let pgpass = pgpass(&pair, None);
    let load = Ledger::run(
        LedgerTarget::read_write(&[&pair.source, &pair.target], "app"),
        LoadOptions::new(4),
    );
    let (source, target) = (
        url(&pair.source, "postgres", ""),
        url(&pair.target, "postgres", ""),
    );
    let servers = [
        "--source",
        &source,
        "--target",
        &target,
        "--pg-bin-dir",
        TOOLS,
        "--json",
    ];
    // PGSSLMODE and PGSSLROOTCERT, as libpq reads them.
    let with_tls_env = |command: &str| {
        let output = support::command(&pgpass)
            .arg(command)
            .args(servers)
            .args(if command == "run" {
                &["--cutover", "manual"][..]
            } else {
                &[]
            })
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &pki.ca)
            .output()
            .unwrap();
        assert!(output.status.success(), "{command}: {}", text(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    with_tls_env("run");
    // The settings came from the environment; the subscriptions got them all the same.
    subscription_verifies_full(&pair.target, "forward", &pki).await;
    let report = with_tls_env("cutover");
    back_stream_streams_over_tls(&pair).await;
    subscription_verifies_full(&pair.source, "back", &pki).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ended = report["sessions_ended"].as_i64().unwrap();
    nothing_lost_but_ended(load, &pair.target, ended).await;
    caught_up(&pair.target, &pair.source, "app", "ledger_entries").await;
}

/// `pgshift check` of these servers.
fn check(pgpass: &Path, source: &str, target: &str) -> std::process::Output {
    let args = [
        "check",
        "--source",
        source,
        "--target",
        target,
        "--pg-bin-dir",
        TOOLS,
    ];
    pgshift(pgpass, &args)
}

/// Restarts `server` with another certificate.
async fn serve_certificate(server: &mut PgServer, files: &CertFiles) {
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    server
        .restart(&[("ssl_cert_file", &cert), ("ssl_key_file", &key)])
        .await
        .unwrap();
}

/// `check` and `run` both refuse with exit code `code` and say every one of `named`; nothing
/// changed on either server.
async fn refused(
    pair: &Pair,
    pgpass: &Path,
    source: &str,
    target: &str,
    code: i32,
    named: &[&str],
) {
    let args = [
        "--source",
        source,
        "--target",
        target,
        "--pg-bin-dir",
        TOOLS,
    ];
    for command in ["check", "run"] {
        let output = pgshift(pgpass, &[&[command], &args[..]].concat());
        let said = text(&output);
        assert_eq!(output.status.code(), Some(code), "{command}: {said}");
        for name in named {
            assert!(
                said.contains(name),
                "{command} did not say {name:?}:\n{said}"
            );
        }
        assert_untouched(pair, &said).await;
    }
}

#[tokio::test]
async fn certificate_problems_are_refused_by_name_with_the_fix_and_change_nothing() {
    let (mut pair, pki) = tls_pair().await;
    pair.source.create_database("app").await.unwrap();
    let pgpass = pgpass(&pair, None);
    let good_target = url(&pair.target, "postgres", &pki.verify_full());
    let good_source = url(&pair.source, "postgres", &pki.verify_full());

    // A CA that did not sign the servers' certificates.
    let other = CertificateAuthority::new("another-ca").unwrap();
    let other_ca = other.write_cert(pair.dir.path(), "other-ca").unwrap();
    let wrong_ca = url(
        &pair.source,
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
    );
    refused(
        &pair,
        &pgpass,
        &wrong_ca,
        &good_target,
        2,
        &["unknown CA", "sslrootcert", &other_ca.display().to_string()],
    )
    .await;

    // The target's certificate names another host: verify-full refuses, verify-ca accepts it.
    let elsewhere = pki.server_cert("elsewhere", &["db.elsewhere.example"], Validity::Current);
    serve_certificate(&mut pair.target, &elsewhere).await;
    refused(
        &pair,
        &pgpass,
        &good_source,
        &good_target,
        2,
        &["host name mismatch", "127.0.0.1", "verify-ca"],
    )
    .await;
    let verify_ca = url(
        &pair.target,
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={}", pki.ca.display()),
    );
    let checked = check(&pgpass, &good_source, &verify_ca);
    assert!(checked.status.success(), "{}", text(&checked));

    // An expired certificate.
    let expired = pki.server_cert("expired", SERVER_NAMES, Validity::Expired);
    serve_certificate(&mut pair.target, &expired).await;
    refused(
        &pair,
        &pgpass,
        &good_source,
        &good_target,
        2,
        &["certificate expired at 2021-01-01", "Renew"],
    )
    .await;
    // Without TLS, the TLS-only server has no pg_hba.conf line for pgshift: the error says
    // to connect with TLS.
    let without_tls = url(&pair.source, "postgres", "sslmode=disable");
    refused(
        &pair,
        &pgpass,
        &without_tls,
        &good_target,
        2,
        &[
            "pg_hba.conf",
            "hostssl",
            "sslmode=verify-full",
            "sslmode=disable connected without TLS",
        ],
    )
    .await;
    // verify-full without a root certificate anywhere: a usage error before any connection.
    let no_root = url(&pair.target, "postgres", "sslmode=verify-full");
    refused(
        &pair,
        &pgpass,
        &good_source,
        &no_root,
        64,
        &[
            "root certificate file",
            "/nonexistent-home/.postgresql/root.crt",
            "sslrootcert",
        ],
    )
    .await;
}

/// The source URL of [`CERT_USER`], a superuser who logs in with a client certificate from
/// the test's CA and has no password.
async fn cert_login(pair: &Pair, pki: &Pki) -> String {
    common::exec(
        &pair.source,
        "postgres",
        &format!("CREATE ROLE {CERT_USER} SUPERUSER LOGIN"),
    )
    .await;
    let client = write_pair(
        pair.dir.path(),
        "client",
        &pki.authority.issue_client(CERT_USER).unwrap(),
    )
    .unwrap();
    url(
        &pair.source,
        CERT_USER,
        &format!(
            "{}&sslcert={}&sslkey={}",
            pki.verify_full(),
            client.cert.display(),
            client.key.display()
        ),
    )
}

#[tokio::test]
async fn a_source_reached_by_client_certificate_is_subscribed_to_without_a_password() {
    let (pair, pki) = tls_pair().await;
    ledger_database(&pair).await;
    let with_cert = cert_login(&pair, &pki).await;
    let pgpass = pgpass(&pair, None);
    let target = url(&pair.target, "postgres", &pki.verify_full());
    succeeds(
        &pgpass,
        &[
            "run",
            "--source",
            &with_cert,
            "--target",
            &target,
            "--pg-bin-dir",
            TOOLS,
            "--cutover",
            "manual",
        ],
    );
    // The target caught up through it: its subscription logs in by the certificate.
    subscription_verifies_full(&pair.target, "forward", &pki).await;
    let conninfo = subscription_conninfos(&pair.target).await.remove(0);
    assert!(
        conninfo.contains(&format!("user='{CERT_USER}'")) && conninfo.contains("sslkey="),
        "{conninfo}"
    );
    assert!(!conninfo.contains("password"), "{conninfo}");
}

#[tokio::test]
async fn a_client_certificate_logs_in_where_pg_hba_asks_for_one() {
    let (pair, pki) = tls_pair().await;
    pair.source.create_database("app").await.unwrap();
    let with_cert = cert_login(&pair, &pki).await;
    let pgpass = pgpass(&pair, None);
    let target = url(&pair.target, "postgres", &pki.verify_full());
    let checked = check(&pgpass, &with_cert, &target);
    let said = text(&checked);
    assert!(said.contains("ready: no blockers"), "{said}");
    assert!(checked.status.success(), "{said}");

    // Without the certificate the server refuses the login, by its own words.
    let without = url(&pair.source, CERT_USER, &pki.verify_full());
    refused(&pair, &pgpass, &without, &target, 2, &["certificate"]).await;
    // A certificate from a CA the server does not trust: the server ends the handshake.
    let stranger = CertificateAuthority::new("stranger-ca").unwrap();
    let foreign = write_pair(
        pair.dir.path(),
        "foreign",
        &stranger.issue_client(CERT_USER).unwrap(),
    )
    .unwrap();
    let foreign_cert = url(
        &pair.source,
        CERT_USER,
        &format!(
            "{}&sslcert={}&sslkey={}",
            pki.verify_full(),
            foreign.cert.display(),
            foreign.key.display()
        ),
    );
    refused(
        &pair,
        &pgpass,
        &foreign_cert,
        &target,
        2,
        &["client certificate", "sslcert"],
    )
    .await;
}

#[tokio::test]
async fn require_refuses_a_server_without_tls_and_the_default_prefer_connects_without_it() {
    let pair = support::pair_with_app(SOURCE_MAJOR, TARGET_MAJOR, &[]).await;
    let pgpass = support::pgpass(&pair);
    let plain = |server: &PgServer, params: &str| url(server, "postgres", params);
    refused(
        &pair,
        &pgpass,
        &plain(&pair.source, "sslmode=require"),
        &plain(&pair.target, ""),
        2,
        &["does not support TLS", "sslmode=require", "ssl = on"],
    )
    .await;
    // prefer (the default) and allow go on without TLS, as libpq does.
    for params in ["", "sslmode=allow"] {
        let checked = check(
            &pgpass,
            &plain(&pair.source, params),
            &plain(&pair.target, params),
        );
        assert!(checked.status.success(), "{params}: {}", text(&checked));
    }
}
