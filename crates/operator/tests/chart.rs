//! The Helm chart (deploy/helm/pgshift): it lints, its RBAC is exactly the operator's least
//! privilege, its Deployment runs the operator as it expects to be run, and the RBAC works on a
//! real API server when the operator's service account is impersonated.

#[path = "support/chart.rs"]
mod chart;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use pgshift_testkit::KubeCluster;
use serde_json::{json, Value};

const RELEASE: &str = "pgshift";
const NAMESPACE: &str = "pgshift-system";

/// (API group, resource, verb): one permission, however the rules group them.
type Grant = (String, String, String);

fn grants(rules: &[(&str, &[&str], &[&str])]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs) in rules {
        for resource in *resources {
            for verb in *verbs {
                out.insert((group.to_string(), resource.to_string(), verb.to_string()));
            }
        }
    }
    out
}

/// What the operator's reconcile uses, and nothing more.
fn operator_grants() -> BTreeSet<Grant> {
    let crud = &[
        "get", "list", "watch", "create", "patch", "update", "delete",
    ][..];
    grants(&[
        (
            "pgshift.io",
            &["postgresupgrades"],
            &["get", "list", "watch", "patch", "update"],
        ),
        (
            "pgshift.io",
            &["postgresupgrades/status"],
            &["get", "patch", "update"],
        ),
        ("pgshift.io", &["postgresupgrades/finalizers"], &["update"]),
        ("", &["services", "configmaps", "secrets"], crud),
        (
            "",
            &["persistentvolumeclaims"],
            &["get", "list", "watch", "delete"],
        ),
        ("", &["pods"], &["get", "list", "watch"]),
        ("", &["events"], &["create", "patch"]),
        ("events.k8s.io", &["events"], &["create", "patch"]),
        ("apps", &["statefulsets", "deployments"], crud),
        (
            "batch",
            &["jobs"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
    ])
}

fn leader_election_grants() -> BTreeSet<Grant> {
    grants(&[(
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
    )])
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .collect()
}

/// The grants of a rendered Role or ClusterRole; every rule must be plain (no resourceNames,
/// no nonResourceURLs) so that the expanded set is the whole truth.
fn role_grants(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let keys: BTreeSet<&str> = rule
            .as_object()
            .expect("a rule")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["apiGroups", "resources", "verbs"]),
            "{rule}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.into(), resource.into(), verb.into()));
                }
            }
        }
    }
    out
}

/// Checks that hold for every role the chart renders, whatever the values.
fn assert_no_dangerous_grants(docs: &[Value]) {
    let roles: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
        .collect();
    assert!(!roles.is_empty(), "the chart renders no roles");
    for role in roles {
        let name = &role["metadata"]["name"];
        for (group, resource, verb) in role_grants(role) {
            let grant = format!("{verb} {group}/{resource} in {name}");
            assert!(
                !group.contains('*') && !resource.contains('*') && verb != "*",
                "wildcard: {grant}"
            );
            // Nothing that reaches into a container: the operator talks to PostgreSQL over
            // the network.
            assert!(
                ![
                    "pods/exec",
                    "pods/log",
                    "pods/attach",
                    "pods/portforward",
                    "pods/proxy"
                ]
                .contains(&resource.as_str()),
                "container access: {grant}"
            );
            assert!(
                !["escalate", "bind", "impersonate", "deletecollection"].contains(&verb.as_str()),
                "dangerous verb: {grant}"
            );
            assert!(
                group != "rbac.authorization.k8s.io" && resource != "nodes",
                "out of scope: {grant}"
            );
            if resource == "pods" {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "the operator never changes pods itself: {grant}"
                );
            }
        }
    }
}

fn rendered_set(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    chart::kinds(docs).into_iter().collect()
}

fn set_of(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(k, n, ns)| (k.to_string(), n.to_string(), ns.to_string()))
        .collect()
}

fn subjects(binding: &Value) -> Vec<(String, String, String)> {
    binding["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (f("kind"), f("name"), f("namespace"))
        })
        .collect()
}

fn operator_container(docs: &[Value]) -> &Value {
    let deployment = chart::find(docs, "Deployment", RELEASE);
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container: {containers:?}");
    &containers[0]
}

fn chart_yaml() -> Value {
    let text = std::fs::read_to_string(chart::chart_dir().join("Chart.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn lint(values: &[(&str, &str)], kube_version: &str) {
    let mut cmd = chart::helm_command();
    cmd.arg("lint")
        .arg("--strict")
        .arg(chart::chart_dir())
        .args(["--kube-version", kube_version]);
    for (k, v) in values {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helm lint {values:?} failed:\n{text}");
    assert!(
        text.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{text}"
    );
    assert!(
        !text.contains("[WARNING]") && !text.contains("[ERROR]"),
        "{text}"
    );
}

#[test]
fn helm_lint_strict_passes() {
    // The API server the tests run, and the oldest Kubernetes the chart declares.
    for kube_version in [pgshift_testkit::KUBE_VERSION, "v1.25.0"] {
        lint(&[], kube_version);
        lint(&[("watchNamespace", "apps")], kube_version);
        lint(
            &[("replicas", "1"), ("serviceAccount.create", "false")],
            kube_version,
        );
    }
}

#[test]
fn helm_version_is_the_one_the_build_script_builds() {
    let script = include_str!("../../../tools/helm/build.sh");
    let line = format!("\nHELM_VERSION={}\n", chart::HELM_VERSION);
    assert!(
        script.contains(&line),
        "tools/helm/build.sh must build helm {}",
        chart::HELM_VERSION
    );
}

#[test]
fn chart_versions_match_the_crate() {
    let chart = chart_yaml();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["name"], "pgshift");
    let version = chart["kubeVersion"].as_str().expect("kubeVersion");
    assert!(version.starts_with(">="), "{version}");
}

#[test]
fn renders_exactly_the_operator_objects() {
    let docs = chart::render(RELEASE, NAMESPACE, &[]);
    assert_eq!(
        rendered_set(&docs),
        set_of(&[
            ("ServiceAccount", "pgshift", NAMESPACE),
            ("ClusterRole", "pgshift", ""),
            ("ClusterRoleBinding", "pgshift", ""),
            ("Role", "pgshift-leader-election", NAMESPACE),
            ("RoleBinding", "pgshift-leader-election", NAMESPACE),
            ("Deployment", "pgshift", NAMESPACE),
            ("Service", "pgshift-metrics", NAMESPACE),
            ("PodDisruptionBudget", "pgshift", NAMESPACE),
        ])
    );
    // `helm template` leaves crds/ out (the CRD is generated by `pgshift crd`, not templated).
    assert!(!docs.iter().any(|d| d["kind"] == "CustomResourceDefinition"));
}

#[test]
fn cluster_rbac_is_exactly_least_privilege() {
    let docs = chart::render(RELEASE, NAMESPACE, &[]);
    assert_no_dangerous_grants(&docs);

    let role = chart::find(&docs, "ClusterRole", "pgshift");
    assert_eq!(role_grants(role), operator_grants());
    // Spelled out because it is the most sensitive grant: the operator reads the source's
    // credentials and writes the target's, and needs no more than these verbs.
    let secrets: BTreeSet<String> = role_grants(role)
        .into_iter()
        .filter(|(g, r, _)| g.is_empty() && r == "secrets")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(
        secrets,
        ["create", "delete", "get", "list", "patch", "update", "watch"]
            .map(String::from)
            .into()
    );

    let binding = chart::find(&docs, "ClusterRoleBinding", "pgshift");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pgshift"})
    );
    let sa = (
        "ServiceAccount".to_string(),
        "pgshift".to_string(),
        NAMESPACE.to_string(),
    );
    assert_eq!(subjects(binding), vec![sa.clone()]);

    let leader = chart::find(&docs, "Role", "pgshift-leader-election");
    assert_eq!(leader["metadata"]["namespace"], NAMESPACE);
    assert_eq!(role_grants(leader), leader_election_grants());
    let leader_binding = chart::find(&docs, "RoleBinding", "pgshift-leader-election");
    assert_eq!(leader_binding["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        leader_binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pgshift-leader-election"})
    );
    assert_eq!(subjects(leader_binding), vec![sa]);
}

#[test]
fn watch_namespace_scopes_rbac_to_a_role_in_that_namespace() {
    let docs = chart::render(RELEASE, NAMESPACE, &[("watchNamespace", "apps")]);
    assert_no_dangerous_grants(&docs);
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding"),
        "nothing cluster-wide: {:?}",
        chart::kinds(&docs)
    );
    assert_eq!(
        rendered_set(&docs),
        set_of(&[
            ("ServiceAccount", "pgshift", NAMESPACE),
            ("Role", "pgshift", "apps"),
            ("RoleBinding", "pgshift", "apps"),
            ("Role", "pgshift-leader-election", NAMESPACE),
            ("RoleBinding", "pgshift-leader-election", NAMESPACE),
            ("Deployment", "pgshift", NAMESPACE),
            ("Service", "pgshift-metrics", NAMESPACE),
            ("PodDisruptionBudget", "pgshift", NAMESPACE),
        ])
    );
    let role = chart::find(&docs, "Role", "pgshift");
    assert_eq!(role_grants(role), operator_grants());
    let binding = chart::find(&docs, "RoleBinding", "pgshift");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pgshift"})
    );
    // The service account lives in the release namespace, not the watched one.
    assert_eq!(
        subjects(binding),
        vec![("ServiceAccount".into(), "pgshift".into(), NAMESPACE.into())]
    );
    // Leases stay in the release namespace.
    let leader = chart::find(&docs, "Role", "pgshift-leader-election");
    assert_eq!(leader["metadata"]["namespace"], NAMESPACE);

    let args = strings(&operator_container(&docs)["args"]);
    assert_eq!(args.last(), Some(&"--watch-namespace=apps"));
}

#[test]
fn deployment_runs_the_operator_as_it_expects() {
    let docs = chart::render(RELEASE, NAMESPACE, &[]);
    let deployment = chart::find(&docs, "Deployment", RELEASE);
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["spec"]["serviceAccountName"], "pgshift");

    let c = operator_container(&docs);
    let app_version = chart_yaml()["appVersion"].as_str().unwrap().to_string();
    assert_eq!(c["image"], format!("ghcr.io/pgshift/pgshift:{app_version}"));
    assert_eq!(strings(&c["command"]), ["/pgshift"]);
    assert_eq!(
        strings(&c["args"]),
        [
            "operator",
            "--metrics-addr=0.0.0.0:8080",
            "--lease-namespace=$(POD_NAMESPACE)",
            "--identity=$(POD_NAME)",
        ]
    );
    // The kubelet expands $(VAR) only for variables the container defines.
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), &e["valueFrom"]))
        .collect();
    assert_eq!(
        env.get("POD_NAME"),
        Some(&&json!({"fieldRef": {"fieldPath": "metadata.name"}}))
    );
    assert_eq!(
        env.get("POD_NAMESPACE"),
        Some(&&json!({"fieldRef": {"fieldPath": "metadata.namespace"}}))
    );

    assert_eq!(
        c["ports"],
        json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "http"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "http"})
    );

    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);

    // Selectors: the Deployment's matches its pods; the Service and PDB select those pods.
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(labels.get(k), Some(v), "pod label {k}");
    }
    let service = chart::find(&docs, "Service", "pgshift-metrics");
    assert_eq!(&service["spec"]["selector"], selector);
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "http-metrics", "port": 8080, "targetPort": "http", "protocol": "TCP"}])
    );
    let pdb = chart::find(&docs, "PodDisruptionBudget", "pgshift");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
}

#[test]
fn values_change_what_they_say() {
    // Another metrics port moves the flag, the container port and the Service together.
    let docs = chart::render(RELEASE, NAMESPACE, &[("metrics.port", "9090")]);
    let c = operator_container(&docs);
    assert_eq!(strings(&c["args"])[1], "--metrics-addr=0.0.0.0:9090");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    let service = chart::find(&docs, "Service", "pgshift-metrics");
    assert_eq!(service["spec"]["ports"][0]["port"], 9090);

    let docs = chart::render(RELEASE, NAMESPACE, &[("image.tag", "1.2.3")]);
    assert_eq!(
        operator_container(&docs)["image"],
        "ghcr.io/pgshift/pgshift:1.2.3"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    let docs = chart::render(RELEASE, NAMESPACE, &[("image.digest", &digest)]);
    assert_eq!(
        operator_container(&docs)["image"],
        format!("ghcr.io/pgshift/pgshift@{digest}")
    );

    // One replica: no PodDisruptionBudget, which would block every node drain.
    let docs = chart::render(RELEASE, NAMESPACE, &[("replicas", "1")]);
    assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));

    // A service account made elsewhere is bound, not created.
    let docs = chart::render(
        RELEASE,
        NAMESPACE,
        &[
            ("serviceAccount.create", "false"),
            ("serviceAccount.name", "ops"),
        ],
    );
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceAccount"));
    let deployment = chart::find(&docs, "Deployment", RELEASE);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "ops"
    );
    for binding in docs
        .iter()
        .filter(|d| d["kind"].as_str().unwrap().ends_with("Binding"))
    {
        assert_eq!(
            subjects(binding),
            vec![("ServiceAccount".into(), "ops".into(), NAMESPACE.into())]
        );
    }

    let docs = chart::render(RELEASE, NAMESPACE, &[("rbac.create", "false")]);
    assert!(!docs
        .iter()
        .any(|d| d["apiVersion"] == "rbac.authorization.k8s.io/v1"));

    // values.schema.json catches typos and invalid namespace names before anything is applied.
    let err = chart::try_render(RELEASE, NAMESPACE, &[("replica", "3")]).unwrap_err();
    assert!(err.contains("'replica' not allowed"), "{err}");
    let err = chart::try_render(RELEASE, NAMESPACE, &[("watchNamespace", "Apps")]).unwrap_err();
    assert!(err.contains("/watchNamespace"), "{err}");
}

// --- Against a real API server -------------------------------------------------------------

async fn start() -> KubeCluster {
    KubeCluster::start_for_test().await
}

/// A client that authenticates as the admin and acts as `user` (Impersonate-User).
async fn impersonating(cluster: &KubeCluster, user: &str) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(user.to_string());
    kube::Client::try_from(config).unwrap()
}

/// Whether the client's user may `verb` `group`/`resource`[/`subresource`] in `namespace`
/// ("" = cluster-wide), as the API server's authorizer answers.
async fn can(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let review = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    review.status.expect("a review has a status").allowed
}

fn assert_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_has_exactly_the_chart_rbac_on_a_real_api_server() {
    let cluster = start().await;
    let admin = cluster.client();

    let user = chart::install_rbac(admin.clone(), NAMESPACE).await;
    assert_eq!(user, format!("system:serviceaccount:{NAMESPACE}:pgshift"));
    // Server-side apply converges: a second install changes nothing and does not fail.
    assert_eq!(chart::install_rbac(admin.clone(), NAMESPACE).await, user);
    // A release that watches one namespace, beside it in the same cluster.
    let scoped_user = chart::install_rbac_with(
        admin.clone(),
        "scoped",
        "scoped-system",
        &[("watchNamespace", "apps")],
    )
    .await;
    assert_eq!(
        scoped_user,
        "system:serviceaccount:scoped-system:scoped-pgshift"
    );
    chart::apply(
        &admin,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}),
    )
    .await;

    let sa = impersonating(&cluster, &user).await;
    // The API server sees the service account, with its groups, and not the admin.
    let me = Api::<SelfSubjectReview>::all(sa.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let info = me.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(info.username.as_deref(), Some(user.as_str()));
    let groups = info.groups.unwrap_or_default();
    assert!(
        groups.iter().any(|g| g == "system:serviceaccounts"),
        "{groups:?}"
    );
    assert!(!groups.iter().any(|g| g == "system:masters"), "{groups:?}");

    // Real requests: what the operator does works, anything else is refused.
    Api::<StatefulSet>::namespaced(sa.clone(), "apps")
        .list(&ListParams::default())
        .await
        .expect("the operator lists StatefulSets in a namespace");
    Api::<StatefulSet>::all(sa.clone())
        .list(&ListParams::default())
        .await
        .expect("and across namespaces");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "pgshift-probe"}})).unwrap();
    Api::<ConfigMap>::namespaced(sa.clone(), "apps")
        .create(&PostParams::default(), &cm)
        .await
        .expect("the operator creates ConfigMaps");
    assert_forbidden(
        Api::<Node>::all(sa.clone())
            .list(&ListParams::default())
            .await,
        "list nodes",
    );
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "postgres:18"}]},
    }))
    .unwrap();
    assert_forbidden(
        Api::<Pod>::namespaced(sa.clone(), "apps")
            .create(&PostParams::default(), &pod)
            .await,
        "create pods",
    );
    // An exec request is authorized before the pod is even looked up: the admin would get
    // 404 or 400 here, the operator must get 403.
    let exec = http::Request::post("/api/v1/namespaces/apps/pods/p/exec?command=sh&stdout=true")
        .body(Vec::new())
        .unwrap();
    let err = sa
        .request_text(exec)
        .await
        .expect_err("exec must be refused");
    match &err {
        kube::Error::Api(status) if status.code == 403 => assert!(
            status
                .message
                .contains("cannot create resource \"pods/exec\""),
            "{}",
            status.message
        ),
        other => panic!("exec: expected 403 Forbidden, got {other:?}"),
    }

    // The authorizer's answers for the rest of the rule set.
    let checks: &[(&str, &str, &str, &str, bool)] = &[
        ("create", "", "pods/exec", "apps", false),
        ("get", "", "pods/exec", "apps", false),
        ("create", "", "pods/attach", "apps", false),
        ("get", "", "pods/log", "apps", false),
        ("create", "", "pods/portforward", "apps", false),
        ("delete", "", "pods", "apps", false),
        ("watch", "", "pods", "apps", true),
        ("list", "", "secrets", "apps", true),
        ("delete", "", "persistentvolumeclaims", "apps", true),
        ("create", "", "persistentvolumeclaims", "apps", false),
        ("patch", "pgshift.io", "postgresupgrades", "apps", true),
        ("create", "pgshift.io", "postgresupgrades", "apps", false),
        ("delete", "pgshift.io", "postgresupgrades", "apps", false),
        (
            "patch",
            "pgshift.io",
            "postgresupgrades/status",
            "apps",
            true,
        ),
        (
            "update",
            "pgshift.io",
            "postgresupgrades/finalizers",
            "apps",
            true,
        ),
        ("update", "apps", "statefulsets", "apps", true),
        ("update", "batch", "jobs", "apps", false),
        ("create", "events.k8s.io", "events", "apps", true),
        ("create", "coordination.k8s.io", "leases", NAMESPACE, true),
        ("update", "coordination.k8s.io", "leases", NAMESPACE, true),
        ("list", "coordination.k8s.io", "leases", NAMESPACE, false),
        ("create", "coordination.k8s.io", "leases", "apps", false),
        ("list", "", "nodes", "", false),
        (
            "create",
            "rbac.authorization.k8s.io",
            "rolebindings",
            "apps",
            false,
        ),
        ("impersonate", "", "serviceaccounts", NAMESPACE, false),
    ];
    for &(verb, group, resource, ns, expected) in checks {
        assert_eq!(
            can(&sa, verb, group, resource, ns).await,
            expected,
            "{user} {verb} {group}/{resource} in {ns:?}"
        );
    }

    // The namespaced release: the same rights, only in `apps`; leases in its own namespace.
    let scoped = impersonating(&cluster, &scoped_user).await;
    Api::<StatefulSet>::namespaced(scoped.clone(), "apps")
        .list(&ListParams::default())
        .await
        .expect("the scoped operator lists StatefulSets in apps");
    assert_forbidden(
        Api::<StatefulSet>::namespaced(scoped.clone(), "other")
            .list(&ListParams::default())
            .await,
        "scoped: list statefulsets in another namespace",
    );
    assert_forbidden(
        Api::<StatefulSet>::all(scoped.clone())
            .list(&ListParams::default())
            .await,
        "scoped: list statefulsets cluster-wide",
    );
    let scoped_checks: &[(&str, &str, &str, &str, bool)] = &[
        ("list", "", "secrets", "apps", true),
        ("list", "", "secrets", "other", false),
        ("create", "", "pods/exec", "apps", false),
        (
            "create",
            "coordination.k8s.io",
            "leases",
            "scoped-system",
            true,
        ),
        ("create", "coordination.k8s.io", "leases", "apps", false),
    ];
    for &(verb, group, resource, ns, expected) in scoped_checks {
        assert_eq!(
            can(&scoped, verb, group, resource, ns).await,
            expected,
            "{scoped_user} {verb} {group}/{resource} in {ns:?}"
        );
    }
}
