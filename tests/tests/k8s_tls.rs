//! TLS on the fast path, end to end with the real binaries: `fsb-controller` against the
//! real API server, and the `fsb` CLI (`--endpoint https://...`, `--ca-file`) as a user
//! runs it.
//!
//! Certificate files (`--tls-cert-file/--tls-key-file`, as from a mounted
//! kubernetes.io/tls Secret; made by openssl, signed by a test CA):
//! - `fsb ls` over https trusting the CA works;
//! - trusting only the system's roots (no `--ca-file`) fails on the certificate;
//! - trusting another CA fails on the certificate;
//! - plaintext http to the TLS port fails;
//! - `--ca-file` with an `http://` endpoint is refused as bad configuration;
//! - files replaced while it runs (a certificate from another CA): within the check
//!   period new connections verify with the new CA and not the old one, and a
//!   connection opened before keeps working.
//!
//! A generated certificate (`--tls-generate`):
//! - the gateway CA's certificate is published in ConfigMap `fsb-gateway-ca` (`ca.crt`
//!   only; the key stays in the Secret, a CA of its own, not the agent CA);
//! - `fsb --ca-file <that>` verifies the served certificate, another CA fails; the
//!   certificate names the Service, loopback and `--tls-san`;
//! - a second start reuses the CA (Secret untouched, same `ca.crt`, old file still
//!   verifies);
//! - a CA replaced in the Secret while it runs (here: deleted, so it makes a new one)
//!   is republished and served from within the check period.
#![cfg(feature = "k8s")]

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use fsb_tests::{
    cluster::{ControllerProcess, free_port, install_crds, namespace},
    k8s::kube_client,
    wait::wait_until,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, api::DeleteParams};

/// A CA (`<name>-ca.crt`) and, signed by it, a certificate for 127.0.0.1 and
/// localhost (`<name>.crt`, `<name>.key`), made with openssl.
fn make_certs(dir: &Path, name: &str) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let (ca_key, ca_crt) = (format!("{name}-ca.key"), format!("{name}-ca.crt"));
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    for out in [&ca_key, &key] {
        let genkey = [
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ];
        run(&[&genkey[..], &[out.as_str()]].concat())?;
    }
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &ca_key,
        "-sha256",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name}-ca"),
        "-out",
        &ca_crt,
    ])?;
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-subj",
        "/CN=fsb-controller",
        "-out",
        &csr,
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        "san.ext",
        "-out",
        &crt,
    ])?;
    Ok(())
}

/// `fsb <args>` with an empty data directory and no token.
async fn fsb(data_dir: &Path, args: &[&str]) -> Result<Output> {
    let bin = std::env::var("FSB_BIN").context("FSB_BIN is set by tests/run.sh")?;
    Ok(tokio::process::Command::new(bin)
        .env_remove("FSB_TOKEN")
        .env_remove("FSB_CA_FILE")
        .env_remove("FSB_ENDPOINT")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .await?)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_fast_path_serves_tls_and_the_cli_verifies_it() -> Result<()> {
    let kube = kube_client().await?;
    install_crds(&kube).await?;
    let ns = format!("tls-{}", &fsb_tests::unique_id()[..8]);
    namespace(&kube, &ns).await?;
    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("k8s-tls-{ns}"));
    std::fs::create_dir_all(&dir)?;
    make_certs(&dir, "server")?;
    make_certs(&dir, "other")?;
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;

    let (fast, agents) = (free_port()?, free_port()?);
    let cert = dir.join("server.crt").display().to_string();
    let key = dir.join("server.key").display().to_string();
    let mut controller = ControllerProcess::spawn(
        &ns,
        fast,
        agents,
        "tls",
        &["--tls-cert-file", &cert, "--tls-key-file", &key],
    )?;

    let https = format!("https://127.0.0.1:{fast}");
    let ca = dir.join("server-ca.crt").display().to_string();
    let trusted = [
        "--endpoint",
        &https,
        "--ca-file",
        &ca,
        "ls",
        "-n",
        &ns,
        "-o",
        "json",
    ];
    let (d, t) = (&data_dir, &trusted);
    let ready = wait_until(
        "fsb ls over TLS",
        Duration::from_secs(30),
        move || async move {
            let out = fsb(d, t).await?;
            Ok(out.status.success().then_some(out))
        },
    )
    .await;
    if let Err(e) = ready {
        bail!(
            "{e:#} (fsb-controller exited: {:?})",
            controller.try_exit()?
        );
    }

    // The system's roots do not know the test CA, nor does another CA.
    let other = dir.join("other-ca.crt").display().to_string();
    for (why, args) in [
        (
            "the system's roots",
            vec!["--endpoint", &https, "ls", "-n", &ns],
        ),
        (
            "another CA",
            vec!["--endpoint", &https, "--ca-file", &other, "ls", "-n", &ns],
        ),
    ] {
        let out = fsb(&data_dir, &args).await?;
        assert!(!out.status.success(), "{why} accepted it: {}", text(&out));
        assert!(
            text(&out).to_lowercase().contains("certificate"),
            "{why}: the error names the certificate: {}",
            text(&out)
        );
    }
    // Plaintext to the TLS port gets nowhere.
    let http = format!("http://127.0.0.1:{fast}");
    let out = fsb(&data_dir, &["--endpoint", &http, "ls", "-n", &ns]).await?;
    assert!(!out.status.success(), "plaintext served: {}", text(&out));
    // A CA file with a plaintext endpoint is a configuration mistake, said as one.
    let out = fsb(
        &data_dir,
        &["--endpoint", &http, "--ca-file", &ca, "ls", "-n", &ns],
    )
    .await?;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--ca-file"), "{}", text(&out));

    controller.kill9().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `fsb ls` at `endpoint` trusting `ca` only: its output.
async fn ls_with(data_dir: &Path, endpoint: &str, ca: &Path, ns: &str) -> Result<Output> {
    let ca = ca.display().to_string();
    fsb(
        data_dir,
        &["--endpoint", endpoint, "--ca-file", &ca, "ls", "-n", ns],
    )
    .await
}

/// Wait until `fsb ls` at `endpoint` trusting `ca` works.
async fn wait_verified(
    data_dir: &Path,
    endpoint: &str,
    ca: &Path,
    ns: &str,
    what: &str,
    timeout: Duration,
) -> Result<()> {
    wait_until(what, timeout, || async {
        let out = ls_with(data_dir, endpoint, ca, ns).await?;
        if out.status.success() {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("{}", text(&out)))
        }
    })
    .await
}

/// `fsb ls` at `endpoint` trusting `ca` fails, on the certificate.
async fn assert_refused(
    data_dir: &Path,
    endpoint: &str,
    ca: &Path,
    ns: &str,
    why: &str,
) -> Result<()> {
    let out = ls_with(data_dir, endpoint, ca, ns).await?;
    assert!(!out.status.success(), "{why} accepted it: {}", text(&out));
    assert!(
        text(&out).to_lowercase().contains("certificate"),
        "{why}: the error names the certificate: {}",
        text(&out)
    );
    Ok(())
}

/// A per-test directory under the run directory.
fn test_dir(ns: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("k8s-tls-{ns}"));
    std::fs::create_dir_all(dir.join("data"))?;
    Ok(dir)
}

/// Replace `to` by `from`'s content with a rename, as an update that is never seen
/// half-written.
fn replace(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

#[tokio::test]
async fn renewed_certificate_files_are_served_without_a_restart() -> Result<()> {
    let kube = kube_client().await?;
    install_crds(&kube).await?;
    let ns = format!("tlsre-{}", &fsb_tests::unique_id()[..8]);
    namespace(&kube, &ns).await?;
    let dir = test_dir(&ns)?;
    let data_dir = dir.join("data");
    make_certs(&dir, "first")?;
    make_certs(&dir, "second")?;
    let (cert, key) = (dir.join("serving.crt"), dir.join("serving.key"));
    replace(&dir.join("first.crt"), &cert)?;
    replace(&dir.join("first.key"), &key)?;

    let (fast, agents) = (free_port()?, free_port()?);
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let mut controller = ControllerProcess::spawn(
        &ns,
        fast,
        agents,
        "tls-reload",
        &[
            "--tls-cert-file",
            &cert_arg,
            "--tls-key-file",
            &key_arg,
            "--tls-reload-seconds",
            "1",
        ],
    )?;
    let https = format!("https://127.0.0.1:{fast}");
    let (first_ca, second_ca) = (dir.join("first-ca.crt"), dir.join("second-ca.crt"));
    let up = wait_verified(
        &data_dir,
        &https,
        &first_ca,
        &ns,
        "fsb ls over TLS (first certificate)",
        Duration::from_secs(30),
    )
    .await;
    if let Err(e) = up {
        bail!(
            "{e:#} (fsb-controller exited: {:?})",
            controller.try_exit()?
        );
    }
    assert_refused(&data_dir, &https, &second_ca, &ns, "the second CA, before").await?;

    // A connection opened now, trusting the first CA only.
    let channel = tonic::transport::Channel::from_shared(https.clone())?
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&first_ca)?),
        ))?
        .connect()
        .await?;
    let mut open = fsb_proto::fastpath::v1::fast_path_client::FastPathClient::new(channel);
    let list = fsb_proto::fastpath::v1::ListRequest {
        namespace: ns.clone(),
        ..Default::default()
    };
    open.list(list.clone()).await?;

    // The renewal: both files replaced, by a certificate of another CA.
    replace(&dir.join("second.crt"), &cert)?;
    replace(&dir.join("second.key"), &key)?;
    wait_verified(
        &data_dir,
        &https,
        &second_ca,
        &ns,
        "the second certificate served",
        Duration::from_secs(10),
    )
    .await?;
    assert_refused(&data_dir, &https, &first_ca, &ns, "the first CA, after").await?;
    // The connection from before keeps its certificate (a new one would not verify).
    open.list(list).await?;
    assert!(controller.try_exit()?.is_none(), "the controller restarted");

    controller.kill9().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `ca.crt` of the ConfigMap publishing the gateway CA, once there.
async fn published_ca(maps: &Api<ConfigMap>) -> Result<String> {
    wait_until(
        "ConfigMap fsb-gateway-ca",
        Duration::from_secs(30),
        || async {
            let Some(m) = maps.get_opt("fsb-gateway-ca").await? else {
                return Ok(None);
            };
            let data = m.data.unwrap_or_default();
            assert_eq!(
                data.keys().collect::<Vec<_>>(),
                ["ca.crt"],
                "only the certificate is published"
            );
            Ok(data.get("ca.crt").cloned())
        },
    )
    .await
}

/// The subject alternative names of the certificate served at 127.0.0.1:`port` (openssl).
fn served_names(port: u16) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -alpn h2 </dev/null 2>/dev/null \
             | openssl x509 -noout -ext subjectAltName"
        ))
        .output()?;
    if !out.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test]
async fn a_generated_certificate_is_published_verified_and_kept() -> Result<()> {
    let kube = kube_client().await?;
    install_crds(&kube).await?;
    let ns = format!("tlsgen-{}", &fsb_tests::unique_id()[..8]);
    namespace(&kube, &ns).await?;
    let dir = test_dir(&ns)?;
    let data_dir = dir.join("data");
    make_certs(&dir, "other")?;
    let other_ca = dir.join("other-ca.crt");

    let (fast, agents) = (free_port()?, free_port()?);
    let flags = [
        "--tls-generate",
        "--tls-san",
        "fsb.example.test,10.9.8.7",
        "--tls-reload-seconds",
        "1",
    ];
    let mut controller = ControllerProcess::spawn(&ns, fast, agents, "tls-gen", &flags)?;
    let maps: Api<ConfigMap> = Api::namespaced(kube.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
    let ca_pem = match published_ca(&maps).await {
        Ok(c) => c,
        Err(e) => bail!(
            "{e:#} (fsb-controller exited: {:?})",
            controller.try_exit()?
        ),
    };
    let ca_file = dir.join("gateway-ca.crt");
    std::fs::write(&ca_file, &ca_pem)?;

    // The key is in the Secret only, and the CA is not the agents'.
    let secret = secrets.get("fsb-gateway-ca").await?;
    let data = secret.data.clone().unwrap_or_default();
    assert_eq!(
        data.get("ca.crt").map(|b| b.0.clone()),
        Some(ca_pem.clone().into_bytes())
    );
    assert!(data.contains_key("ca.key"));
    let agent_ca = secrets.get("fsb-agent-ca").await?;
    assert_ne!(
        agent_ca
            .data
            .unwrap_or_default()
            .get("ca.crt")
            .map(|b| b.0.clone()),
        Some(ca_pem.clone().into_bytes()),
        "the gateway CA is not the agent CA"
    );

    for endpoint in [
        format!("https://127.0.0.1:{fast}"),
        format!("https://localhost:{fast}"),
    ] {
        wait_verified(
            &data_dir,
            &endpoint,
            &ca_file,
            &ns,
            "fsb ls over TLS with the published CA",
            Duration::from_secs(30),
        )
        .await?;
        assert_refused(&data_dir, &endpoint, &other_ca, &ns, "another CA").await?;
    }
    let names = served_names(fast)?;
    for want in [
        format!("DNS:fsb-controller.{ns}.svc,"),
        format!("DNS:fsb-controller.{ns}.svc.cluster.local,"),
        "DNS:localhost,".to_owned(),
        "IP Address:127.0.0.1,".to_owned(),
        "DNS:fsb.example.test,".to_owned(),
        "IP Address:10.9.8.7".to_owned(),
    ] {
        assert!(names.contains(&want), "{want} missing from {names}");
    }

    // A second start reuses the CA: the Secret is untouched, the published CA the same,
    // and the file users fetched before still verifies.
    controller.kill9().await?;
    let mut controller = ControllerProcess::spawn(&ns, fast, agents, "tls-gen", &flags)?;
    let https = format!("https://127.0.0.1:{fast}");
    let again = wait_verified(
        &data_dir,
        &https,
        &ca_file,
        &ns,
        "fsb ls over TLS after a restart, with the CA fetched before",
        Duration::from_secs(30),
    )
    .await;
    if let Err(e) = again {
        bail!(
            "{e:#} (fsb-controller exited: {:?})",
            controller.try_exit()?
        );
    }
    let after = secrets.get("fsb-gateway-ca").await?;
    assert_eq!(
        after.metadata.resource_version, secret.metadata.resource_version,
        "the CA Secret was rewritten"
    );
    assert_eq!(
        published_ca(&maps).await?,
        ca_pem,
        "the published CA changed"
    );

    // The CA replaced while it runs (deleted: it makes a new one): republished, and new
    // connections get a certificate from it, within the check period.
    secrets
        .delete("fsb-gateway-ca", &DeleteParams::default())
        .await?;
    let new_pem = wait_until(
        "a new gateway CA published",
        Duration::from_secs(10),
        || async {
            let pem = published_ca(&maps).await?;
            Ok((pem != ca_pem).then_some(pem))
        },
    )
    .await?;
    let new_file = dir.join("gateway-ca-2.crt");
    std::fs::write(&new_file, &new_pem)?;
    wait_verified(
        &data_dir,
        &https,
        &new_file,
        &ns,
        "the certificate of the new CA served",
        Duration::from_secs(10),
    )
    .await?;
    assert_refused(&data_dir, &https, &ca_file, &ns, "the replaced CA").await?;
    assert!(controller.try_exit()?.is_none(), "the controller restarted");

    controller.kill9().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
