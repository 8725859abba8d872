//! `deploy/` against a real kube-apiserver (`tests/run.sh k8s`): every manifest passes
//! a server-side dry run (`?dryRun=All`: admission and validation run, nothing is
//! stored), after the generated CRDs and the namespace are created for real; the
//! kustomization lists every manifest outside `samples/` and `local/`.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{path::Path, time::Duration};

use fsb_controller::crd::{Sandbox, SandboxPool};
use fsb_tests::k8s::KubeApi;
use kube::CustomResourceExt;
use serde_json::Value;

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// The documents of a YAML file, as JSON.
fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::from_value::<Value>(serde::Deserialize::deserialize(d).unwrap()).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The collection URL of an object.
fn collection(obj: &Value) -> String {
    let api = obj["apiVersion"].as_str().unwrap();
    let kind = obj["kind"].as_str().unwrap();
    let ns = obj["metadata"]["namespace"].as_str();
    let plural = match kind {
        "Namespace" => "namespaces",
        "ServiceAccount" => "serviceaccounts",
        "Service" => "services",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "Deployment" => "deployments",
        "DaemonSet" => "daemonsets",
        "SandboxPool" => "sandboxpools",
        "CustomResourceDefinition" => "customresourcedefinitions",
        other => panic!("no collection known for kind {other}"),
    };
    let prefix = if api == "v1" {
        "/api/v1".to_owned()
    } else {
        format!("/apis/{api}")
    };
    match ns {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}"),
        None => format!("{prefix}/{plural}"),
    }
}

#[tokio::test]
async fn every_manifest_passes_a_server_side_dry_run() {
    let api = KubeApi::from_env().unwrap();
    // The CRDs for real (samples need them served), then wait until they are.
    for crd in [Sandbox::crd(), SandboxPool::crd()] {
        let (code, resp) = api
            .post(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                &serde_json::to_value(&crd).unwrap(),
            )
            .await
            .unwrap();
        assert!(code == 201 || code == 409, "{code} {resp}");
    }
    for doc in documents(&deploy().join("namespace.yaml")) {
        let (code, resp) = api.post(&collection(&doc), &doc).await.unwrap();
        assert!(code == 201 || code == 409, "namespace: {code} {resp}");
    }
    let files = [
        "crds/crds.yaml",
        "rbac/controller.yaml",
        "rbac/janitor.yaml",
        "rbac/users.yaml",
        "controller.yaml",
        "janitor.yaml",
        "samples/pool-runc.yaml",
        "samples/pool-gvisor.yaml",
        "samples/pool-custom-template.yaml",
    ];
    let mut checked = 0;
    for file in files {
        for doc in documents(&deploy().join(file)) {
            let url = format!("{}?dryRun=All", collection(&doc));
            let what = format!("{file}: {} {}", doc["kind"], doc["metadata"]["name"]);
            // CRDs exist already (created above), and so may the user ClusterRoles
            // (k8s_auth applies them for real): a dry-run create then says
            // AlreadyExists, which the API server answers only after validating.
            let ok = |code: u16| {
                code == 201
                    || (code == 409
                        && (doc["kind"] == "CustomResourceDefinition"
                            || doc["kind"] == "ClusterRole"))
            };
            let mut outcome = api.post(&url, &doc).await.unwrap();
            // A just-created CRD may take a moment to serve its kind.
            for _ in 0..50 {
                if outcome.0 != 404 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                outcome = api.post(&url, &doc).await.unwrap();
            }
            assert!(ok(outcome.0), "{what}: {} {}", outcome.0, outcome.1);
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} objects checked");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let kustomization = documents(&deploy().join("kustomization.yaml"));
    let listed: Vec<String> = kustomization[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for file in &listed {
        assert!(
            deploy().join(file).exists(),
            "kustomization lists missing {file}"
        );
    }
    for want in [
        "crds/crds.yaml",
        "namespace.yaml",
        "rbac/controller.yaml",
        "rbac/janitor.yaml",
        "rbac/users.yaml",
        "controller.yaml",
        "janitor.yaml",
    ] {
        assert!(
            listed.iter().any(|f| f == want),
            "kustomization misses {want}"
        );
    }
}
