//! Checks an upgrade against the objects it refers to (pure: the dereference step read them).
//! What the CRD schema can check, the API server already did; this is what needs other
//! objects: does the Secret hold credentials, does the Service select the source's pods?

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use serde_json::{json, Value};

use crate::crd::{PostgresUpgrade, TrafficMode};
use crate::names::{Names, ORIGINAL_ANNOTATION, POSTGRES_PORT};

/// What the upgrade refers to, as read from the API server (absent = not found).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub credentials: Option<Secret>,
    pub source_service: Option<Service>,
    pub client_service: Option<Service>,
    pub target_service: Option<Service>,
}

/// How pgshift reaches the source.
#[derive(Debug, Clone)]
pub struct SourceAccess {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: pgshift_engine::Secret,
    /// The source pods' selector (from its Service); empty for a host outside the cluster.
    pub selector: BTreeMap<String, String>,
    /// The source Service's target port, which the route Service copies.
    pub target_port: Value,
}

#[derive(Debug, Clone)]
pub struct Validated {
    pub upgrade: PostgresUpgrade,
    pub namespace: String,
    pub names: Names,
    pub source: SourceAccess,
    /// The target Service's ClusterIP, once it exists.
    pub target_host: Option<String>,
    pub max_pause: Duration,
    /// `spec.rollback.window`: zero for none.
    pub rollback_window: Duration,
}

/// One thing wrong with the spec or what it refers to, with what to do about it.
pub type Problem = String;

pub fn validate(upgrade: &PostgresUpgrade, inputs: &Inputs) -> Result<Validated, Vec<Problem>> {
    let namespace = upgrade.metadata.namespace.clone().unwrap_or_default();
    let name = upgrade.metadata.name.clone().unwrap_or_default();
    let spec = &upgrade.spec;
    let mut problems = Vec::new();

    let credentials = credentials(
        &spec.source.credentials_secret,
        &namespace,
        inputs.credentials.as_ref(),
    )
    .map_err(|p| problems.push(p))
    .ok();

    let address = match (&spec.source.service, &spec.source.host) {
        (Some(service_ref), _) => match &inputs.source_service {
            None => {
                problems.push(format!(
                    "spec.source.service: Service {:?} not found in namespace {namespace}; name the Service that reaches the source server",
                    service_ref.name
                ));
                None
            }
            Some(service) => {
                let port = service_ref.port.unwrap_or(POSTGRES_PORT);
                service_address(service, port)
                    .map_err(|p| {
                        problems.push(format!("spec.source.service {:?}: {p}", service_ref.name))
                    })
                    .ok()
            }
        },
        (None, Some(host)) => Some((
            host.clone(),
            spec.source.port.unwrap_or(POSTGRES_PORT) as u16,
            BTreeMap::new(),
            json!(spec.source.port.unwrap_or(POSTGRES_PORT)),
        )),
        (None, None) => {
            problems.push("spec.source: set service or host".to_string());
            None
        }
    };

    match &inputs.client_service {
        None => problems.push(format!(
            "spec.traffic.service: Service {:?} not found in namespace {namespace}; name the Service your clients connect to",
            spec.traffic.service
        )),
        Some(service) if selector_of(service).is_empty() => problems.push(format!(
            "spec.traffic.service: Service {:?} has no selector; pgshift moves clients by changing it, so it must select the source's pods",
            spec.traffic.service
        )),
        Some(_) => {}
    }

    if spec.traffic.mode == TrafficMode::PgBouncer {
        if spec.source.service.is_none() {
            problems.push(
                "spec.traffic.mode PgBouncer needs spec.source.service (PgBouncer reaches the source's pods through a Service pgshift copies from it); use mode Service for a source outside the cluster".to_string(),
            );
        }
        if let Some((user, _)) = &credentials {
            if !is_simple_name(user) {
                problems.push(format!(
                    "the source user {user:?} in Secret {:?} is not a plain name (letters, digits, _): PgBouncer looks up client passwords as that user; use such a superuser",
                    spec.source.credentials_secret
                ));
            }
        }
    }

    let max_pause = parse_duration(&spec.cutover.max_pause)
        .map_err(|p| problems.push(format!("spec.cutover.maxPause: {p}")))
        .ok();
    let rollback_window = parse_window(&spec.rollback.window)
        .map_err(|p| problems.push(format!("spec.rollback.window: {p}")))
        .ok();

    let target_host = inputs
        .target_service
        .as_ref()
        .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
        .filter(|ip| ip != "None");

    if !problems.is_empty() {
        return Err(problems);
    }
    let ((user, password), (host, port, selector, target_port), max_pause, rollback_window) = (
        credentials.expect("checked"),
        address.expect("checked"),
        max_pause.expect("checked"),
        rollback_window.expect("checked"),
    );
    Ok(Validated {
        upgrade: upgrade.clone(),
        namespace,
        names: Names::new(&name),
        source: SourceAccess {
            host,
            port,
            user,
            password,
            selector,
            target_port,
        },
        target_host,
        max_pause,
        rollback_window,
    })
}

fn credentials(
    name: &str,
    namespace: &str,
    secret: Option<&Secret>,
) -> Result<(String, pgshift_engine::Secret), Problem> {
    let secret = secret.ok_or_else(|| {
        format!(
            "spec.source.credentialsSecret: Secret {name:?} not found in namespace {namespace}; create it with keys username and password (a superuser of the source)"
        )
    })?;
    let value = |key: &str| {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.clone().into_bytes())
            })
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                format!("Secret {name:?} has no key {key:?}; it needs username and password")
            })?;
        String::from_utf8(bytes).map_err(|_| format!("Secret {name:?}: {key} is not UTF-8 text"))
    };
    Ok((
        value("username")?,
        pgshift_engine::Secret::new(value("password")?),
    ))
}

fn selector_of(service: &Service) -> BTreeMap<String, String> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default()
}

type Address = (String, u16, BTreeMap<String, String>, Value);

/// ClusterIP, port, selector and target port of a Service's `port`.
fn service_address(service: &Service, port: i32) -> Result<Address, Problem> {
    let spec = service.spec.as_ref().ok_or("has no spec")?;
    let ip = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or("is headless (no ClusterIP); give a Service with a ClusterIP")?;
    let service_port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == port)
        .ok_or_else(|| format!("has no port {port}; set spec.source.service.port"))?;
    let mut target_port = match &service_port.target_port {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) => {
            json!(name)
        }
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => json!(n),
        None => json!(port),
    };
    let mut selector = selector_of(service);
    // When pgshift has moved this Service already, the source is what it selected before.
    if let Some(original) = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_ANNOTATION))
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
    {
        selector = serde_json::from_value(original["selector"].clone()).unwrap_or_default();
        if let Some(p) = original["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["port"] == json!(port))
        {
            target_port = p.get("targetPort").cloned().unwrap_or(json!(port));
        }
    }
    if selector.is_empty() {
        return Err("has no selector; it must select the source server's pods".into());
    }
    Ok((ip, port as u16, selector, target_port))
}

fn is_simple_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `2s`, `500ms` (the CRD's pattern).
pub fn parse_duration(text: &str) -> Result<Duration, Problem> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. 2s or 500ms"))?;
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 2s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "{text:?}: unit {unit:?} is not ms or s; write e.g. 2s or 500ms"
        )),
    }
}

/// `24h`, `1h30m`, `90s`, or `0` (the CRD's pattern): hours, minutes and seconds, in that order.
pub fn parse_window(text: &str) -> Result<Duration, Problem> {
    let wrong = || {
        format!("{text:?} is not a duration such as 24h, 90m, 1h30m or 30s (0: no rollback window)")
    };
    match text {
        "0" => return Ok(Duration::ZERO),
        "" => return Err(wrong()),
        _ => {}
    }
    let mut seconds: u64 = 0;
    let mut rest = text;
    let mut units = ['h', 'm', 's'].as_slice();
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(wrong)?;
        let n: u64 = rest[..digits].parse().map_err(|_| wrong())?;
        let unit = rest[digits..].chars().next().ok_or_else(wrong)?;
        let at = units.iter().position(|u| *u == unit).ok_or_else(wrong)?;
        let scale = [3600, 60, 1][3 - units.len() + at];
        seconds = n
            .checked_mul(scale)
            .and_then(|s| s.checked_add(seconds))
            .ok_or_else(wrong)?;
        units = &units[at + 1..];
        rest = &rest[digits + 1..];
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    pub(crate) fn inputs() -> Inputs {
        let service: Service = fixture("source-service.yaml");
        Inputs {
            credentials: Some(fixture("credentials.yaml")),
            source_service: Some(service.clone()),
            client_service: Some(service),
            target_service: None,
        }
    }

    fn problems(upgrade: &PostgresUpgrade, inputs: &Inputs) -> String {
        validate(upgrade, inputs).unwrap_err().join("\n")
    }

    #[test]
    fn a_valid_upgrade_resolves_the_source() {
        let upgrade: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        let v = validate(&upgrade, &inputs()).unwrap();
        assert_eq!(
            (v.source.host.as_str(), v.source.port),
            ("10.96.0.20", 5432)
        );
        assert_eq!(v.source.user, "postgres");
        assert_eq!(v.source.password.expose(), "s\"ecret");
        assert_eq!(
            v.source.selector,
            BTreeMap::from([("app".into(), "db".into())])
        );
        assert_eq!(v.source.target_port, json!("pg"));
        assert_eq!(v.max_pause, Duration::from_millis(500));
        assert_eq!(
            (v.namespace.as_str(), v.names.target().as_str()),
            ("shop", "orders-target")
        );
        assert_eq!(v.target_host, None);
    }

    #[test]
    fn missing_or_incomplete_references_name_the_fix() {
        let upgrade: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        let mut no_secret = inputs();
        no_secret.credentials = None;
        let text = problems(&upgrade, &no_secret);
        assert!(
            text.contains("Secret \"db-superuser\" not found in namespace shop"),
            "{text}"
        );
        assert!(text.contains("keys username and password"), "{text}");

        let mut no_password = inputs();
        no_password
            .credentials
            .as_mut()
            .unwrap()
            .data
            .as_mut()
            .unwrap()
            .remove("password");
        assert!(problems(&upgrade, &no_password).contains("has no key \"password\""));

        let mut headless = inputs();
        headless
            .source_service
            .as_mut()
            .unwrap()
            .spec
            .as_mut()
            .unwrap()
            .cluster_ip = Some("None".into());
        assert!(problems(&upgrade, &headless).contains("is headless"));

        let mut no_selector = inputs();
        no_selector
            .client_service
            .as_mut()
            .unwrap()
            .spec
            .as_mut()
            .unwrap()
            .selector = None;
        assert!(problems(&upgrade, &no_selector).contains("has no selector"));

        let mut no_client_service = inputs();
        no_client_service.client_service = None;
        assert!(problems(&upgrade, &no_client_service)
            .contains("name the Service your clients connect to"));
    }

    #[test]
    fn pgbouncer_mode_needs_a_source_service() {
        let mut upgrade: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        upgrade.spec.source.service = None;
        upgrade.spec.source.host = Some("db.example.internal".into());
        let text = problems(&upgrade, &inputs());
        assert!(
            text.contains("use mode Service for a source outside the cluster"),
            "{text}"
        );
        upgrade.spec.traffic.mode = TrafficMode::Service;
        let v = validate(&upgrade, &inputs()).unwrap();
        assert_eq!(v.source.host, "db.example.internal");
        assert!(v.source.selector.is_empty());
    }

    #[test]
    fn a_service_pgshift_moved_still_names_the_source_it_selected() {
        let upgrade: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        let mut moved = inputs();
        let service = moved.source_service.as_mut().unwrap();
        service.spec.as_mut().unwrap().selector = Some(BTreeMap::from([
            ("pgshift.io/upgrade".into(), "orders".into()),
            ("pgshift.io/role".into(), "pgbouncer".into()),
        ]));
        service.metadata.annotations = Some(BTreeMap::from([(
            ORIGINAL_ANNOTATION.to_string(),
            json!({"selector": {"app": "db"}, "ports": [{"port": 5432, "targetPort": 15432}]})
                .to_string(),
        )]));
        let v = validate(&upgrade, &moved).unwrap();
        assert_eq!(
            v.source.selector,
            BTreeMap::from([("app".into(), "db".into())])
        );
        assert_eq!(v.source.target_port, json!(15432));
    }

    #[test]
    fn the_rollback_window_defaults_to_a_day_and_reads_as_the_crds_pattern() {
        let upgrade: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        let v = validate(&upgrade, &inputs()).unwrap();
        assert_eq!(v.rollback_window, Duration::from_secs(24 * 3600));
        let windowed: PostgresUpgrade = fixture("upgrade-rollback.yaml");
        let v = validate(&windowed, &inputs()).unwrap();
        assert_eq!(v.rollback_window, Duration::from_secs(90 * 60));
        assert!(v.upgrade.spec.rollback.requested);
        for (text, seconds) in [("0", 0), ("30s", 30), ("1h30m", 5400), ("2h15s", 7215)] {
            assert_eq!(
                parse_window(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for wrong in ["", "24", "1d", "30s1m", "1h1h", "m", "-1h"] {
            assert!(
                parse_window(wrong).unwrap_err().contains("such as 24h"),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn durations_are_the_crds_pattern() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("2").unwrap_err().contains("has no unit"));
        assert!(parse_duration("1m").unwrap_err().contains("is not ms or s"));
    }
}
