//! Pod volumes as directories, and the mapping from paths inside a container to paths on this
//! machine (processes cannot be given a mount namespace of their own here).
//!
//! ConfigMap, Secret, projected (incl. service-account tokens), downward-API and emptyDir
//! volumes are written into the pod's directory when a container starts; a PersistentVolumeClaim
//! is the directory of the PersistentVolume bound to it, which outlives the pod.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, PersistentVolume,
    PersistentVolumeClaim, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Ctx;

/// A file to write into a volume: relative path, contents, mode.
type File = (String, Vec<u8>, i32);

/// Makes every volume of `pod` available under `pod_dir`; returns volume name → directory.
/// An `Err` is a message for the pod's status; the caller retries, as a kubelet does.
pub(crate) async fn prepare(
    ctx: &Ctx,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<HashMap<String, PathBuf>, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut dirs = HashMap::new();
    for volume in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let dir = match &volume.persistent_volume_claim {
            Some(claim) => claim_dir(ctx, &namespace, &claim.claim_name).await?,
            None => {
                let dir = pod_dir.join("volumes").join(&volume.name);
                let files = volume_files(ctx, pod, &namespace, volume).await?;
                write_volume(ctx, &dir, &files)?;
                dir
            }
        };
        dirs.insert(volume.name.clone(), dir);
    }
    Ok(dirs)
}

/// The files of a volume that lives in the pod's directory.
async fn volume_files(
    ctx: &Ctx,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
) -> Result<Vec<File>, String> {
    let mut files = Vec::new();
    if volume.empty_dir.is_some() {
        return Ok(files);
    }
    if let Some(source) = &volume.config_map {
        let mode = source.default_mode.unwrap_or(0o644);
        let optional = source.optional.unwrap_or(false);
        config_map_files(
            ctx,
            namespace,
            &source.name,
            &source.items,
            mode,
            optional,
            &mut files,
        )
        .await?;
        return Ok(files);
    }
    if let Some(source) = &volume.secret {
        let mode = source.default_mode.unwrap_or(0o644);
        let name = source.secret_name.clone().unwrap_or_default();
        let optional = source.optional.unwrap_or(false);
        secret_files(
            ctx,
            namespace,
            &name,
            &source.items,
            mode,
            optional,
            &mut files,
        )
        .await?;
        return Ok(files);
    }
    if let Some(source) = &volume.downward_api {
        let mode = source.default_mode.unwrap_or(0o644);
        downward_files(
            pod,
            source.items.as_deref().unwrap_or_default(),
            mode,
            &mut files,
        )?;
        return Ok(files);
    }
    if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.unwrap_or(0o644);
        for source in projected.sources.iter().flatten() {
            if let Some(s) = &source.config_map {
                let optional = s.optional.unwrap_or(false);
                config_map_files(
                    ctx, namespace, &s.name, &s.items, mode, optional, &mut files,
                )
                .await?;
            }
            if let Some(s) = &source.secret {
                let optional = s.optional.unwrap_or(false);
                secret_files(
                    ctx, namespace, &s.name, &s.items, mode, optional, &mut files,
                )
                .await?;
            }
            if let Some(s) = &source.downward_api {
                downward_files(
                    pod,
                    s.items.as_deref().unwrap_or_default(),
                    mode,
                    &mut files,
                )?;
            }
            if let Some(s) = &source.service_account_token {
                let token = service_account_token(
                    ctx,
                    pod,
                    namespace,
                    s.audience.as_deref(),
                    s.expiration_seconds,
                )
                .await?;
                files.push((s.path.clone(), token.into_bytes(), mode));
            }
        }
        return Ok(files);
    }
    Err(format!(
        "volume {:?}: only configMap, secret, projected, downwardAPI, emptyDir and \
         persistentVolumeClaim volumes are supported by the process kubelet",
        volume.name
    ))
}

/// Selects `items` (or every key) of a ConfigMap's or Secret's data.
fn pick(
    data: HashMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    mode: i32,
    what: &str,
    files: &mut Vec<File>,
) -> Result<(), String> {
    match items {
        None => files.extend(data.into_iter().map(|(k, v)| (k, v, mode))),
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .ok_or_else(|| format!("{what} has no key {:?}", item.key))?;
                files.push((item.path.clone(), value.clone(), item.mode.unwrap_or(mode)));
            }
        }
    }
    Ok(())
}

async fn config_map_files(
    ctx: &Ctx,
    namespace: &str,
    name: &str,
    items: &Option<Vec<KeyToPath>>,
    mode: i32,
    optional: bool,
    files: &mut Vec<File>,
) -> Result<(), String> {
    let what = format!("configmap {namespace}/{name}");
    let data = fetch::<ConfigMap>(ctx, namespace, name, &what)
        .await?
        .map(|cm| {
            let mut data: HashMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            data
        });
    pick_if_found(data, optional, items, mode, &what, files)
}

async fn secret_files(
    ctx: &Ctx,
    namespace: &str,
    name: &str,
    items: &Option<Vec<KeyToPath>>,
    mode: i32,
    optional: bool,
    files: &mut Vec<File>,
) -> Result<(), String> {
    let what = format!("secret {namespace}/{name}");
    let data = fetch::<Secret>(ctx, namespace, name, &what)
        .await?
        .map(|secret| {
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        });
    pick_if_found(data, optional, items, mode, &what, files)
}

/// A ConfigMap or Secret the pod mounts (`what` names it in errors); `None` when absent.
async fn fetch<K>(ctx: &Ctx, namespace: &str, name: &str, what: &str) -> Result<Option<K>, String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read {what}: {e}"))
}

/// [`pick`] from a source that may be absent: fine when the volume marks it optional.
fn pick_if_found(
    data: Option<HashMap<String, Vec<u8>>>,
    optional: bool,
    items: &Option<Vec<KeyToPath>>,
    mode: i32,
    what: &str,
    files: &mut Vec<File>,
) -> Result<(), String> {
    match data {
        None if optional => Ok(()),
        None => Err(format!("{what} not found")),
        Some(data) => pick(data, items, mode, what, files),
    }
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    mode: i32,
    files: &mut Vec<File>,
) -> Result<(), String> {
    for item in items {
        let field = item
            .field_ref
            .as_ref()
            .ok_or_else(|| format!("downwardAPI {:?}: only fieldRef is supported", item.path))?;
        let value = field_value(pod, &field.field_path)?;
        files.push((
            item.path.clone(),
            value.into_bytes(),
            item.mode.unwrap_or(mode),
        ));
    }
    Ok(())
}

/// The value of a pod field reference (downward API, `valueFrom.fieldRef`).
pub(crate) fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let map_text = |map: &Option<std::collections::BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    };
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "metadata.labels" => Some(map_text(&meta.labels)),
        "metadata.annotations" => Some(map_text(&meta.annotations)),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        _ => {
            if let Some(key) = keyed("metadata.labels") {
                meta.labels.as_ref().and_then(|l| l.get(key).cloned())
            } else if let Some(key) = keyed("metadata.annotations") {
                meta.annotations.as_ref().and_then(|a| a.get(key).cloned())
            } else {
                return Err(format!(
                    "field {path:?} is not supported by the process kubelet"
                ));
            }
        }
    };
    Ok(value.unwrap_or_default())
}

async fn service_account_token(
    ctx: &Ctx,
    pod: &Pod,
    namespace: &str,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> Result<String, String> {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {
            "audiences": audience.map(|a| vec![a]).unwrap_or_default(),
            "expirationSeconds": expiration.unwrap_or(3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid()},
        },
    });
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let response: TokenRequest = api
        .create_subresource("token", &account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            format!("cannot get a token for service account {namespace}/{account}: {e}")
        })?;
    response
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| format!("no token issued for service account {namespace}/{account}"))
}

/// Rewrites a volume directory with `files`, readable by the pod's user (like `fsGroup`).
fn write_volume(ctx: &Ctx, dir: &Path, files: &[File]) -> Result<(), String> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        format!("cannot {what} {}: {e}", path.display())
    };
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        ctx.run_as.own(dir).map_err(|e| e.to_string())?;
    }
    for (relative, contents, mode) in files {
        let path = dir.join(safe_relative(relative)?);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
            ctx.run_as.own(parent).map_err(|e| e.to_string())?;
        }
        fs::write(&path, contents).map_err(|e| io("write", &path, e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode as u32 & 0o777))
            .map_err(|e| io("chmod", &path, e))?;
        ctx.run_as.own(&path).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `path` if it is relative and stays inside its directory.
fn safe_relative(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(p)
    } else {
        Err(format!(
            "volume file path {path:?} must be relative, without '..'"
        ))
    }
}

/// The directory of the PersistentVolume bound to a claim; waits (by failing) until bound.
async fn claim_dir(ctx: &Ctx, namespace: &str, claim: &str) -> Result<PathBuf, String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let what = format!("persistentvolumeclaim {namespace}/{claim}");
    let pvc = claims
        .get_opt(claim)
        .await
        .map_err(|e| format!("cannot read {what}: {e}"))?
        .ok_or_else(|| format!("{what} not found"))?;
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let volume_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|_| bound)
        .ok_or_else(|| format!("{what} is not bound yet"))?;
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = volumes
        .get(&volume_name)
        .await
        .map_err(|e| format!("cannot read persistentvolume {volume_name}: {e}"))?;
    let spec = pv.spec.unwrap_or_default();
    let path = spec
        .host_path
        .map(|h| h.path)
        .or(spec.local.map(|l| l.path))
        .ok_or_else(|| {
            format!("persistentvolume {volume_name} has neither hostPath nor local: cannot use it")
        })?;
    let dir = PathBuf::from(path);
    if !dir.is_dir() {
        return Err(format!(
            "the directory {} of persistentvolume {volume_name} is missing",
            dir.display()
        ));
    }
    ctx.run_as.own(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// Where a container's paths are on this machine: its volume mounts, else a private "root
/// file system" directory of the container's.
#[derive(Debug, Clone)]
pub(crate) struct Mounts {
    /// (mount path in the container, directory or file here), longest mount path first.
    mounts: Vec<(String, PathBuf)>,
    rootfs: PathBuf,
}

impl Mounts {
    pub(crate) fn new(
        container: &Container,
        volumes: &HashMap<String, PathBuf>,
        rootfs: PathBuf,
    ) -> Result<Mounts, String> {
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let dir = volumes.get(&mount.name).ok_or_else(|| {
                format!(
                    "volumeMount {:?}: the pod has no volume of that name",
                    mount.name
                )
            })?;
            let host = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => dir.join(safe_relative(sub)?),
                None => dir.clone(),
            };
            mounts.push((mount.mount_path.trim_end_matches('/').to_string(), host));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(Mounts { mounts, rootfs })
    }

    /// Mounts one file at `path` — the termination log, which a real kubelet bind-mounts there —
    /// keeping it where [`Mounts::host_path`] puts `path` (in a volume or the container's own
    /// directory), so that arguments and scripts naming it reach it too. Returns its path here.
    pub(crate) fn mount_file(&mut self, path: &str) -> PathBuf {
        let host = self.host_path(path);
        self.mounts
            .push((path.trim_end_matches('/').to_string(), host.clone()));
        self.mounts
            .sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        host
    }

    /// The path here of a container path inside one of its volume mounts.
    pub(crate) fn translate(&self, path: &str) -> Option<PathBuf> {
        self.mounts.iter().find_map(|(mount, host)| {
            let rest = path.strip_prefix(mount.as_str())?;
            if rest.is_empty() {
                Some(host.clone())
            } else {
                rest.strip_prefix('/').map(|rest| host.join(rest))
            }
        })
    }

    /// The path here of any container path: a mount, else the container's own directory.
    pub(crate) fn host_path(&self, path: &str) -> PathBuf {
        self.translate(path)
            .unwrap_or_else(|| self.rootfs.join(path.trim_start_matches('/')))
    }

    /// An argument with a mounted path in it (`/etc/x.conf`, `-c config_file=/etc/x.conf`)
    /// rewritten to the path here; other arguments unchanged.
    pub(crate) fn translate_arg(&self, arg: &str) -> String {
        if arg.starts_with('/') {
            if let Some(path) = self.translate(arg) {
                return path.display().to_string();
            }
        }
        if let Some((key, value)) = arg.split_once('=') {
            if value.starts_with('/') {
                if let Some(path) = self.translate(value) {
                    return format!("{key}={}", path.display());
                }
            }
        }
        arg.to_string()
    }

    /// A shell script (`sh -c`) with the mounted paths it names rewritten to the paths here
    /// (`echo done > /dev/termination-log`, `cat /etc/app/app.conf`). A mount path counts only
    /// as a whole word: at the start or after a blank, quote, `=`, `:`, redirection or
    /// operator, and followed by the end, `/`, a blank, a quote or an operator.
    pub(crate) fn translate_script(&self, script: &str) -> String {
        let starts_word = |c: char| c.is_whitespace() || "'\"`=:<>|;&(".contains(c);
        let ends_word = |c: char| c.is_whitespace() || "/'\"`:<>|;&)".contains(c);
        let mut out = String::with_capacity(script.len());
        let mut previous: Option<char> = None;
        let mut rest = script;
        while let Some(c) = rest.chars().next() {
            if c == '/' && previous.is_none_or(starts_word) {
                let mounted = self.mounts.iter().find_map(|(mount, host)| {
                    // A mount of "/" would match every path: leave scripts alone then.
                    let after = rest
                        .strip_prefix(mount.as_str())
                        .filter(|_| !mount.is_empty())?;
                    after
                        .chars()
                        .next()
                        .is_none_or(ends_word)
                        .then_some((mount, host))
                });
                if let Some((mount, host)) = mounted {
                    out.push_str(&host.display().to_string());
                    rest = &rest[mount.len()..];
                    previous = mount.chars().next_back();
                    continue;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            previous = Some(c);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_container_paths_to_mounts_and_rootfs() {
        let container: Container = serde_json::from_value(json!({
            "name": "c",
            "volumeMounts": [
                {"name": "data", "mountPath": "/var/lib/postgresql"},
                {"name": "conf", "mountPath": "/etc/pgbouncer/pgbouncer.ini", "subPath": "pgbouncer.ini"},
            ],
        }))
        .unwrap();
        let volumes = HashMap::from([
            ("data".to_string(), PathBuf::from("/v/pvc-1")),
            ("conf".to_string(), PathBuf::from("/p/1/volumes/conf")),
        ]);
        let mounts = Mounts::new(&container, &volumes, PathBuf::from("/p/1/rootfs")).unwrap();
        assert_eq!(
            mounts.host_path("/var/lib/postgresql/data"),
            PathBuf::from("/v/pvc-1/data")
        );
        assert_eq!(
            mounts.host_path("/var/lib/postgresqlx"),
            PathBuf::from("/p/1/rootfs/var/lib/postgresqlx")
        );
        assert_eq!(
            mounts.translate_arg("/etc/pgbouncer/pgbouncer.ini"),
            "/p/1/volumes/conf/pgbouncer.ini"
        );
        assert_eq!(
            mounts.translate_arg("config_file=/var/lib/postgresql/pg.conf"),
            "config_file=/v/pvc-1/pg.conf"
        );
        assert_eq!(mounts.translate_arg("-c"), "-c");
        assert_eq!(
            mounts.translate_script(
                "cat /etc/pgbouncer/pgbouncer.ini>/var/lib/postgresql/x; ls /var/lib/postgresqlx \"/var/lib/postgresql\""
            ),
            "cat /p/1/volumes/conf/pgbouncer.ini>/v/pvc-1/x; ls /var/lib/postgresqlx \"/v/pvc-1\""
        );
        assert_eq!(
            mounts.translate_script("echo a/var/lib/postgresql"),
            "echo a/var/lib/postgresql"
        );
        // The termination log, outside every mount, is kept in the container's own directory.
        let mut with_log = mounts.clone();
        let log = with_log.mount_file("/dev/termination-log");
        assert_eq!(log, PathBuf::from("/p/1/rootfs/dev/termination-log"));
        assert_eq!(
            with_log.translate_arg("/dev/termination-log"),
            log.display().to_string()
        );
        assert_eq!(
            with_log.translate_script("echo done >/dev/termination-log"),
            "echo done >/p/1/rootfs/dev/termination-log"
        );
        assert_eq!(
            mounts
                .clone()
                .mount_file("/var/lib/postgresql/termination-log"),
            PathBuf::from("/v/pvc-1/termination-log")
        );
        assert!(Mounts::new(
            &serde_json::from_value(
                json!({"name": "c", "volumeMounts": [{"name": "x", "mountPath": "/x"}]})
            )
            .unwrap(),
            &volumes,
            PathBuf::new()
        )
        .is_err());
    }
}
