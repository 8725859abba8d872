//! TLS on the fast path, end to end with the real binaries: `fsb-controller
//! --tls-cert-file/--tls-key-file` (as from a mounted kubernetes.io/tls Secret; the
//! certificate made by openssl, signed by a test CA) against the real API server, and
//! the `fsb` CLI (`--endpoint https://...`, `--ca-file`) as a user runs it.
//!
//! - `fsb ls` over https trusting the CA works;
//! - trusting only the system's roots (no `--ca-file`) fails on the certificate;
//! - trusting another CA fails on the certificate;
//! - plaintext http to the TLS port fails;
//! - `--ca-file` with an `http://` endpoint is refused as bad configuration.
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
