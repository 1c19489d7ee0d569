//! No password reaches a server log, pgshift's own log or a file that outlives pgshift, and
//! the child tools use the passwords pgshift resolved, not whatever libpq finds in the
//! environment.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bouncer_for, exec, ledger_database, Pair, APP_PASSWORD, APP_USER};
use pgshift_lab::{PgServer, ServerOptions};

/// Settings under which PostgreSQL logs every statement it runs, and how long each took.
const LOG_EVERYTHING: &[(&str, &str)] = &[
    ("log_statement", "all"),
    ("log_min_duration_statement", "0"),
];

/// A pair started with `source_settings` and `target_settings` on top of the lab's.
async fn pair_with(source_settings: &[(&str, &str)], target_settings: &[(&str, &str)]) -> Pair {
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let options = |major, name, settings: &[(&str, &str)]| {
        settings.iter().fold(
            ServerOptions::new(major, dir.path().to_path_buf(), name),
            |options, (key, value)| options.setting(key, value),
        )
    };
    let (source, target) = tokio::join!(
        PgServer::start(options(15, "source", source_settings)),
        PgServer::start(options(18, "target", target_settings))
    );
    Pair {
        source: source.unwrap(),
        target: target.unwrap(),
        dir,
    }
}

/// A text to look for (a secret, mostly), and the name a failure message gives it (never the
/// value).
struct Needle {
    what: String,
    value: String,
}

fn needle(what: &str, value: &str) -> Needle {
    Needle {
        what: what.into(),
        value: value.into(),
    }
}

fn superuser_passwords(pair: &Pair) -> Vec<Needle> {
    vec![
        needle("the source password", pair.source.password()),
        needle("the target password", pair.target.password()),
    ]
}

/// Every log file of a server: the postmaster's output and the collector's files.
fn server_logs(server: &PgServer) -> Vec<PathBuf> {
    let mut files = vec![server.log_path().to_path_buf()];
    files.extend(files_under(&server.data_dir().join("log")));
    files
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// How long each file was at some moment: what the test itself logged before pgshift ran
/// (the application's role created with its password, say) is not pgshift's doing.
struct Lengths(Vec<(PathBuf, usize)>);

impl Lengths {
    fn of(files: &[PathBuf]) -> Lengths {
        Lengths(
            files
                .iter()
                .map(|f| (f.clone(), std::fs::read(f).map_or(0, |c| c.len())))
                .collect(),
        )
    }

    /// Where `file` was: its length then, 0 for a file that did not exist.
    fn before(&self, file: &Path) -> usize {
        self.0
            .iter()
            .find(|(f, _)| f == file)
            .map_or(0, |(_, len)| *len)
    }
}

/// "FILE holds WHAT" for each needle found in what the files gained since `since` (all of
/// them without it), or in a text named by its label.
fn leaks(
    files: &[PathBuf],
    since: Option<&Lengths>,
    texts: &[(&str, &str)],
    needles: &[Needle],
) -> Vec<String> {
    let mut found = Vec::new();
    let mut check = |label: &str, contents: &[u8]| {
        for needle in needles {
            let bytes = needle.value.as_bytes();
            if contents.windows(bytes.len()).any(|w| w == bytes) {
                found.push(format!("{label} holds {}", needle.what));
            }
        }
    };
    for file in files {
        let contents = std::fs::read(file).unwrap();
        let start = since.map_or(0, |l| l.before(file)).min(contents.len());
        check(&file.display().to_string(), &contents[start..]);
    }
    for (label, text) in texts {
        check(label, text.as_bytes());
    }
    found
}

/// Waits until the server's log shows `text` (the collector writes a little behind): a
/// statement the test ran last, so that everything logged before it is on disk too.
async fn wait_for_log(server: &PgServer, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = server_logs(server);
        if logs
            .iter()
            .any(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).contains(text))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server log never showed {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pgpass(pair: &Pair, extra: &[pgshift_lab::PgpassEntry]) -> PathBuf {
    let path = pair.dir.path().join("pgpass");
    let mut entries = vec![pair.source.pgpass_entry(), pair.target.pgpass_entry()];
    entries.extend_from_slice(extra);
    pgshift_lab::write_pgpass_entries(&path, &entries).unwrap();
    path
}

/// `pgshift run` from the pair's `app` database, with the target's tools, in an environment
/// without PG* variables but `env`.
fn run_command(pair: &Pair, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let source = pair.source.url("app");
    let target = pair.target.url("app");
    let bin = pair.target.bin_dir().display().to_string();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgshift"));
    command
        .args(["run", "--source", &source, "--target", &target])
        .args(["--pg-bin-dir", &bin])
        .args(extra);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG").envs(env.iter().copied());
    command
}

fn run(pair: &Pair, extra: &[&str], env: &[(&str, &str)]) -> Output {
    run_command(pair, extra, env)
        .output()
        .expect("pgshift runs")
}

async fn app_with_rows(pair: &Pair) {
    pair.source.create_database("app").await.unwrap();
    exec(
        &pair.source,
        "app",
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;",
    )
    .await;
}

#[tokio::test]
async fn no_password_reaches_a_log_when_every_statement_is_logged() {
    let target_settings = [
        LOG_EVERYTHING,
        // pg_stat_statements keeps query texts in a file of its own.
        &[("shared_preload_libraries", "pg_stat_statements")],
    ]
    .concat();
    let pair = pair_with(LOG_EVERYTHING, &target_settings).await;
    ledger_database(&pair).await;
    let bouncer = bouncer_for(&pair).await;
    let pgpass = pgpass(&pair, &[bouncer.admin_pgpass_entry()]);
    let pgpass_env = pgpass.display().to_string();
    let config = bouncer.config_path().display().to_string();
    let admin = bouncer.admin_url();
    let logs = |pair: &Pair| {
        let mut files = server_logs(&pair.source);
        files.extend(server_logs(&pair.target));
        files.push(bouncer.log_path().to_path_buf());
        files
    };
    let before_run = Lengths::of(&logs(&pair));
    let output = run(
        &pair,
        &["--pgbouncer", &admin, "--pgbouncer-config", &config],
        // Every crate at trace level: tokio-postgres would log each statement's text.
        &[("PGPASSFILE", &pgpass_env), ("RUST_LOG", "trace")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "run failed:\n{stderr}");

    // The role pgshift copied carries its password hash: a secret too.
    let app_hash: String = pair
        .source
        .connect("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&APP_USER],
        )
        .await
        .unwrap()
        .get(0);
    let mut secrets = superuser_passwords(&pair);
    secrets.push(needle(
        "the PgBouncer admin password",
        bouncer.admin_password(),
    ));
    secrets.push(needle("the application's password", APP_PASSWORD));
    secrets.push(needle("the application role's password hash", &app_hash));

    // The servers do log statements: a test's own statement is there.
    for server in [&pair.source, &pair.target] {
        exec(server, "postgres", "SELECT 'statements are logged'").await;
        wait_for_log(server, "SELECT 'statements are logged'").await;
    }
    let mut files = logs(&pair);
    let query_texts = pair
        .target
        .data_dir()
        .join("pg_stat_tmp/pgss_query_texts.stat");
    assert!(query_texts.is_file(), "pg_stat_statements is not loaded");
    files.push(query_texts);
    let found = leaks(
        &files,
        Some(&before_run),
        &[("pgshift's stderr", &stderr)],
        &secrets,
    );
    assert!(found.is_empty(), "{found:#?}");
    // Nor did pgshift's sessions or its psql restore have any statement logged: the state table
    // that only they touch is named nowhere in what the target logged.
    let statements = leaks(
        &server_logs(&pair.target),
        Some(&before_run),
        &[],
        &[needle(
            "a statement on pgshift's state table",
            "pgshift_state",
        )],
    );
    assert!(statements.is_empty(), "{statements:#?}");
}

#[tokio::test]
async fn a_failing_subscription_leaves_the_source_password_out_of_the_log() {
    let pair = pair_with(&[], &[]).await;
    app_with_rows(&pair).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    drop(listener);
    let pgpass = pgpass(&pair, &[]).display().to_string();
    let output = run(
        &pair,
        &["--source-address-from-target", &closed],
        &[("PGPASSFILE", &pgpass)],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("creating the subscription"), "{stderr}");

    // At default settings the failure is logged (and, unless prevented, its statement).
    wait_for_log(&pair.target, "could not connect to the publisher").await;
    let found = leaks(
        &server_logs(&pair.target),
        None,
        &[("pgshift's stderr", &stderr)],
        &superuser_passwords(&pair),
    );
    assert!(found.is_empty(), "{found:#?}");
}

/// The pid of a child process of `parent` whose command name is `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID ..."; COMM may hold spaces, the last ')' ends it.
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && comm == name).then_some(pid)
    })
}

#[tokio::test]
async fn a_kill_during_the_schema_copy_leaves_no_password_on_disk() {
    let pair = pair_with(&[], &[]).await;
    pair.source.create_database("app").await.unwrap();
    // A schema large enough that the restore runs for a while.
    exec(
        &pair.source,
        "app",
        "DO $$ BEGIN FOR i IN 1..1500 LOOP
             EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, a text, b int)', i);
             EXECUTE format('CREATE INDEX ON t%s (b)', i);
         END LOOP; END $$",
    )
    .await;
    let tmp = pair.dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let pgpass = pgpass(&pair, &[]).display().to_string();
    let tmp_env = tmp.display().to_string();
    let mut child = run_command(&pair, &[], &[("PGPASSFILE", &pgpass), ("TMPDIR", &tmp_env)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("app: CopySchema") {
            break;
        }
    }
    // Killed while psql restores: the passwords and the script are in use at that moment.
    let deadline = Instant::now() + Duration::from_secs(120);
    let psql = loop {
        if let Some(pid) = child_named(child.id(), "psql") {
            break pid;
        }
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "psql never ran; pgshift said:\n{}",
            seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // psql dies with pgshift (parent-death signal).
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{psql}")).exists() {
        assert!(Instant::now() < deadline, "psql outlived pgshift");
        std::thread::sleep(Duration::from_millis(10));
    }

    let left = files_under(&tmp);
    let found = leaks(&left, None, &[], &superuser_passwords(&pair));
    assert!(found.is_empty(), "{found:#?}");
    assert!(left.is_empty(), "pgshift left files behind: {left:?}");
}

#[tokio::test]
async fn pg_variables_in_pgshifts_environment_do_not_reach_the_tools() {
    let pair = pair_with(&[], &[]).await;
    app_with_rows(&pair).await;
    let pgpass = pgpass(&pair, &[]).display().to_string();
    // Each of these alone makes pg_dump or psql fail if it reaches them.
    let output = run(
        &pair,
        &["--password-file", &pgpass],
        &[
            ("PGPASSWORD", "stale-password"),
            ("PGSERVICE", "pgshift-no-such-service"),
            // PGSSLMODE is pgshift's own setting now (tests/tls.rs); this one libpq 14+ reads.
            ("PGTARGETSESSIONATTRS", "standby"),
            ("PGOPTIONS", "-c default_transaction_read_only=on"),
            ("PGPASSFILE", "/nonexistent/pgpass"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "run failed:\n{stderr}");
    assert_eq!(
        common::checksums(&pair.source, "app").await,
        common::checksums(&pair.target, "app").await
    );
}

/// `pgshift check --json` from `source` (as its superuser) to `server`, logged in to the target
/// as `target_user`: the blockers' codes and problems.
fn check_blockers(
    source: &PgServer,
    server: &PgServer,
    pgpass: &Path,
    target_user: &str,
) -> Vec<(String, String)> {
    let source = source.url("postgres");
    let target = format!(
        "postgres://{target_user}@{}:{}/postgres",
        server.host(),
        server.port()
    );
    let bin = server.bin_dir().display().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(["check", "--json", "--source", &source, "--target", &target])
        .args(["--pg-bin-dir", &bin])
        .env("PGPASSFILE", pgpass)
        .env_remove("PGPASSWORD")
        .output()
        .expect("pgshift runs");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    report["blockers"]
        .as_array()
        .unwrap_or_else(|| panic!("not a preflight report: {report}"))
        .iter()
        .map(|b| {
            (
                b["code"].as_str().unwrap().to_string(),
                b["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every setting that logs statements, at a value that does (and `debug_print_parse`, which
/// any role may turn off).
const LOUD: &[(&str, &str)] = &[
    ("log_statement", "all"),
    ("log_min_duration_statement", "0"),
    ("log_min_duration_sample", "0"),
    ("log_transaction_sample_rate", "0.5"),
    ("debug_print_parse", "on"),
];

#[tokio::test]
async fn a_target_role_that_may_not_silence_the_log_is_refused_on_every_major() {
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().unwrap();
    // Every major pgshift upgrades to (an older target is refused before this matters).
    let targets = pgshift_lab::testing::MAJORS
        .filter(|major| *major as i32 >= pgshift_engine::preflight::OLDEST_TARGET_MAJOR);
    for major in targets {
        let server = PgServer::start(LOUD.iter().fold(
            ServerOptions::new(major, dir.path().to_path_buf(), format!("pg{major}")),
            |options, (key, value)| options.setting(key, value),
        ))
        .await
        .unwrap();
        // The source: a server of its own (pgshift refuses a target that is the source).
        let source = PgServer::start(ServerOptions::new(
            major,
            dir.path().to_path_buf(),
            format!("source{major}"),
        ))
        .await
        .unwrap();
        server
            .create_login_role("plain", "plain-password")
            .await
            .unwrap();
        let pgpass = dir.path().join(format!("pgpass{major}"));
        let mut plain = server.pgpass_entry();
        plain.user = "plain".into();
        plain.password = "plain-password".into();
        pgshift_lab::write_pgpass_entries(
            &pgpass,
            &[server.pgpass_entry(), plain, source.pgpass_entry()],
        )
        .unwrap();
        let logging = |blockers: &[(String, String)]| {
            blockers
                .iter()
                .find(|(code, _)| code == "statement_logging")
                .map(|(_, problem)| problem.clone())
        };

        // A superuser turns every setting off, whatever the server's values.
        let blockers = check_blockers(&source, &server, &pgpass, "postgres");
        assert_eq!(logging(&blockers), None, "PostgreSQL {major}: {blockers:?}");
        // A plain role may not; the settings that would log are named (and the default
        // log_min_error_statement = error logs every failing statement).
        let privileged = "log_statement, log_min_error_statement, log_min_duration_statement, \
                          log_min_duration_sample, log_transaction_sample_rate";
        let blockers = check_blockers(&source, &server, &pgpass, "plain");
        let problem = logging(&blockers)
            .unwrap_or_else(|| panic!("PostgreSQL {major}: not refused: {blockers:?}"));
        assert!(
            problem.starts_with(&format!("may not turn off {privileged} for")),
            "PostgreSQL {major}: {problem}"
        );
        if major >= 15 {
            // From 15 on, the privilege to set them is enough.
            exec(
                &server,
                "postgres",
                &format!("GRANT SET ON PARAMETER {privileged} TO plain"),
            )
            .await;
            let blockers = check_blockers(&source, &server, &pgpass, "plain");
            assert_eq!(logging(&blockers), None, "PostgreSQL {major}: {blockers:?}");
        }
        server.stop().await.unwrap();
        source.stop().await.unwrap();
    }
}
