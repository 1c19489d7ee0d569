//! The cluster's certificates, made in-process with rcgen (no openssl processes to run, nothing
//! to install): a cluster CA, a front-proxy CA, serving certificates for the API server,
//! controller manager and scheduler, client certificates for the admin (`system:masters`), the
//! controller manager and the scheduler, and the service-account signing key. All keys are
//! ECDSA P-256, which every component accepts (service-account tokens are then signed ES256).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub(crate) struct CertFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// Every file the control plane needs.
#[derive(Debug, Clone)]
pub(crate) struct Pki {
    pub(crate) ca: CertFiles,
    pub(crate) front_proxy_ca: CertFiles,
    pub(crate) apiserver: CertFiles,
    pub(crate) front_proxy_client: CertFiles,
    pub(crate) admin: CertFiles,
    pub(crate) controller_manager: CertFiles,
    pub(crate) controller_manager_serving: CertFiles,
    pub(crate) scheduler: CertFiles,
    pub(crate) scheduler_serving: CertFiles,
    pub(crate) service_account_key: PathBuf,
    pub(crate) service_account_pub: PathBuf,
}

/// A CA that signs the other certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Result<(Ca, CertFiles)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("pgshift-testkit-{name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let files = write_pair(dir, name, &cert.pem(), &key.serialize_pem())?;
        Ok((
            Ca {
                issuer: Issuer::new(params, key),
            },
            files,
        ))
    }

    fn sign(
        &self,
        dir: &Path,
        name: &str,
        subject: &Subject<'_>,
        usage: ExtendedKeyUsagePurpose,
        ips: &[IpAddr],
        dns: &[&str],
    ) -> Result<CertFiles> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, subject.common_name);
        if let Some(org) = subject.organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        write_pair(dir, name, &cert.pem(), &key.serialize_pem())
    }
}

struct Subject<'a> {
    common_name: &'a str,
    organization: Option<&'a str>,
}

const fn user(common_name: &str) -> Subject<'_> {
    Subject {
        common_name,
        organization: None,
    }
}

/// Generates everything into `dir`.
pub(crate) fn generate(dir: &Path) -> Result<Pki> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let loopback: [IpAddr; 1] = [[127, 0, 0, 1].into()];
    let server = ExtendedKeyUsagePurpose::ServerAuth;
    let client = || ExtendedKeyUsagePurpose::ClientAuth;

    let (ca, ca_files) = Ca::new(dir, "ca")?;
    // Its own CA for the aggregation layer's front proxy; the controller manager and scheduler
    // read it from the API server to authenticate requests and complain while it is missing.
    let (front_proxy, front_proxy_ca) = Ca::new(dir, "front-proxy-ca")?;
    let apiserver = ca.sign(
        dir,
        "apiserver",
        &user("kube-apiserver"),
        server.clone(),
        &loopback,
        &[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ],
    )?;
    // RBAC's bootstrap policy binds the group system:masters to cluster-admin.
    let admin = ca.sign(
        dir,
        "admin",
        &Subject {
            common_name: "pgshift-admin",
            organization: Some("system:masters"),
        },
        client(),
        &[],
        &[],
    )?;
    // The users the bootstrap policy grants the controller manager's and scheduler's roles to.
    let controller_manager = ca.sign(
        dir,
        "controller-manager",
        &user("system:kube-controller-manager"),
        client(),
        &[],
        &[],
    )?;
    let scheduler = ca.sign(
        dir,
        "scheduler",
        &user("system:kube-scheduler"),
        client(),
        &[],
        &[],
    )?;
    // Serving certificates from the cluster CA (instead of self-signed ones), so that their
    // /healthz can be checked with a verifying client.
    let controller_manager_serving = ca.sign(
        dir,
        "controller-manager-serving",
        &user("kube-controller-manager"),
        server.clone(),
        &loopback,
        &[],
    )?;
    let scheduler_serving = ca.sign(
        dir,
        "scheduler-serving",
        &user("kube-scheduler"),
        server,
        &loopback,
        &[],
    )?;
    let front_proxy_client = front_proxy.sign(
        dir,
        "front-proxy-client",
        &user("front-proxy-client"),
        client(),
        &[],
        &[],
    )?;

    let sa = KeyPair::generate()?;
    let service_account_key = dir.join("sa.key");
    let service_account_pub = dir.join("sa.pub");
    write_private(&service_account_key, &sa.serialize_pem())?;
    write_private(&service_account_pub, &sa.public_key_pem())?;

    Ok(Pki {
        ca: ca_files,
        front_proxy_ca,
        apiserver,
        front_proxy_client,
        admin,
        controller_manager,
        controller_manager_serving,
        scheduler,
        scheduler_serving,
        service_account_key,
        service_account_pub,
    })
}

fn write_pair(dir: &Path, name: &str, cert: &str, key: &str) -> Result<CertFiles> {
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    write_private(&files.cert, cert)?;
    write_private(&files.key, key)?;
    Ok(files)
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}
