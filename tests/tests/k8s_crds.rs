//! The CRDs against a real kube-apiserver + etcd (`tests/run.sh k8s`, which exports
//! FSB_K8S_SERVER, FSB_K8S_CA, FSB_K8S_TOKEN): the generated `deploy/crds/crds.yaml`
//! installs and becomes Established, and the API server itself rejects what
//! `reference-behaviour.md` says it must (seed-review items 11 and 12): a Sandbox with
//! missing or empty `image` or `poolRef`, an unknown `failurePolicy`, an env entry
//! without `name`, a port of 0 or 65536; port 65535 and a pool that does not exist are
//! accepted. A SandboxPool whose poolMin exceeds poolMax is rejected, and its runtime
//! cannot be changed.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::Duration;

use fsb_controller::crd::{Sandbox, SandboxPool};
use fsb_tests::{k8s::KubeApi as Api, wait_until};
use kube::CustomResourceExt;
use serde_json::{Value, json};

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";

/// Install both CRDs (idempotent) and wait until they serve.
async fn install(api: &Api) {
    for crd in [Sandbox::crd(), SandboxPool::crd()] {
        let body = serde_json::to_value(&crd).unwrap();
        let (code, resp) = api.post(CRDS, &body).await.unwrap();
        assert!(
            code == 201 || code == 409,
            "installing {}: {code} {resp}",
            crd.metadata.name.as_deref().unwrap_or("")
        );
        let name = crd.metadata.name.clone().unwrap();
        wait_until("CRD established", Duration::from_secs(30), || {
            let name = name.clone();
            async move {
                let (_, v) = api
                    .send(reqwest::Method::GET, &format!("{CRDS}/{name}"), None)
                    .await?;
                let established = v["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Established" && c["status"] == "True");
                Ok(established.then_some(()))
            }
        })
        .await
        .unwrap();
    }
}

async fn namespace(api: &Api) -> String {
    let ns = format!("crd-{}", &fsb_tests::unique_id()[..8]);
    let (code, resp) = api
        .post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{resp}");
    ns
}

fn sandbox(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "sandbox.fast.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": spec,
    })
}

#[tokio::test]
async fn the_api_server_enforces_the_sandbox_schema() {
    let api = Api::from_env().unwrap();
    install(&api).await;
    let ns = namespace(&api).await;
    let path = format!("/apis/sandbox.fast.io/v1alpha1/namespaces/{ns}/sandboxes");
    let valid = json!({"image": "busybox", "poolRef": "default"});
    let with = |patch: Value| {
        let mut spec = valid.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                spec.as_object_mut().unwrap().remove(k);
            } else {
                spec[k] = v.clone();
            }
        }
        spec
    };
    let rejected = [
        ("no-image", with(json!({"image": null})), "image"),
        ("empty-image", with(json!({"image": ""})), "image"),
        ("no-pool", with(json!({"poolRef": null})), "poolRef"),
        ("empty-pool", with(json!({"poolRef": ""})), "poolRef"),
        (
            "bad-policy",
            with(json!({"failurePolicy": "Sometimes"})),
            "failurePolicy",
        ),
        (
            "env-no-name",
            with(json!({"envs": [{"value": "x"}]})),
            "name",
        ),
        (
            "port-zero",
            with(json!({"exposedPorts": [0]})),
            "exposedPorts",
        ),
        (
            "port-high",
            with(json!({"exposedPorts": [65536]})),
            "exposedPorts",
        ),
        (
            "recovery-zero",
            with(json!({"recoveryTimeoutSeconds": 0})),
            "recoveryTimeoutSeconds",
        ),
    ];
    for (name, spec, field) in rejected {
        let (code, resp) = api.post(&path, &sandbox(name, spec)).await.unwrap();
        assert_eq!(code, 422, "{name} must be rejected: {resp}");
        let message = resp["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{name}: the message names {field}: {message}"
        );
    }
    // Port 65535 and a pool that does not exist are accepted (the pool is the
    // controller's business: the Sandbox stays Pending with a condition).
    let (code, resp) = api
        .post(
            &path,
            &sandbox(
                "ok",
                with(json!({"exposedPorts": [65535], "poolRef": "no-such-pool"})),
            ),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{resp}");
    assert_eq!(
        resp["spec"]["failurePolicy"], "Manual",
        "defaults apply: {resp}"
    );
    assert_eq!(
        resp["spec"]["recoveryTimeoutSeconds"], 60,
        "defaults apply: {resp}"
    );
}

#[tokio::test]
async fn the_api_server_enforces_pool_sizes_and_an_immutable_runtime() {
    let api = Api::from_env().unwrap();
    install(&api).await;
    let ns = namespace(&api).await;
    let path = format!("/apis/sandbox.fast.io/v1alpha1/namespaces/{ns}/sandboxpools");
    let pool = |name: &str, min: u32, max: u32, runtime: &str| {
        json!({
            "apiVersion": "sandbox.fast.io/v1alpha1",
            "kind": "SandboxPool",
            "metadata": {"name": name},
            "spec": {"capacity": {"poolMin": min, "poolMax": max}, "runtime": runtime},
        })
    };
    let (code, resp) = api
        .post(&path, &pool("inverted", 3, 1, "runc"))
        .await
        .unwrap();
    assert_eq!(code, 422, "{resp}");
    assert!(
        resp["message"]
            .as_str()
            .unwrap_or_default()
            .contains("poolMin must not exceed poolMax"),
        "{resp}"
    );
    let (code, resp) = api.post(&path, &pool("p", 1, 2, "runc")).await.unwrap();
    assert_eq!(code, 201, "{resp}");
    assert_eq!(resp["spec"]["maxSandboxesPerPod"], 1, "default: {resp}");
    let mut changed = resp.clone();
    changed["spec"]["runtime"] = json!("gvisor");
    let (code, resp) = api
        .send(reqwest::Method::PUT, &format!("{path}/p"), Some(&changed))
        .await
        .unwrap();
    assert_eq!(code, 422, "{resp}");
    assert!(
        resp["message"]
            .as_str()
            .unwrap_or_default()
            .contains("runtime is immutable"),
        "{resp}"
    );
}
