//! The CRD YAML in `deploy/crds/` is what the Rust types generate (drift test), and the
//! generated schema carries the validation the API server must enforce. Regenerate
//! with `FSB_WRITE_CRDS=1 cargo test -p fsb-controller --test crds`.

#![allow(clippy::unwrap_used)]

use fsb_controller::crd::{Sandbox, SandboxPool, crds_yaml};
use kube::CustomResourceExt;
use serde_json::Value;

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds/crds.yaml")
}

#[test]
fn deploy_crds_match_the_types() {
    let generated = crds_yaml().unwrap();
    if std::env::var_os("FSB_WRITE_CRDS").is_some() {
        std::fs::write(path(), &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(path()).unwrap_or_default();
    assert!(
        on_disk == generated,
        "deploy/crds/crds.yaml is stale: run FSB_WRITE_CRDS=1 cargo test -p fsb-controller --test crds"
    );
}

fn schema(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let v = serde_json::to_value(crd).unwrap();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn sandbox_requires_a_non_empty_image_and_pool_and_valid_ports() {
    let crd = Sandbox::crd();
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["sbx".to_owned()][..])
    );
    let s = schema(&crd);
    let spec = &s["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        required.contains(&"image") && required.contains(&"poolRef"),
        "{required:?}"
    );
    assert_eq!(spec["properties"]["image"]["minLength"], 1);
    assert_eq!(spec["properties"]["poolRef"]["minLength"], 1);
    let port = &spec["properties"]["exposedPorts"]["items"];
    assert_eq!(
        (port["minimum"].as_f64(), port["maximum"].as_f64()),
        (Some(1.0), Some(65535.0)),
        "{port}"
    );
    let policy = &spec["properties"]["failurePolicy"]["enum"];
    assert_eq!(
        policy,
        &serde_json::json!(["Manual", "AutoRecreate"]),
        "{policy}"
    );
    assert_eq!(
        spec["properties"]["envs"]["items"]["required"],
        serde_json::json!(["name"])
    );
    assert_eq!(
        spec["properties"]["recoveryTimeoutSeconds"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert!(
        crd.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some()
    );
}

#[test]
fn pool_sizes_are_ordered_and_its_runtime_immutable() {
    let crd = SandboxPool::crd();
    let text = serde_json::to_string(&schema(&crd)).unwrap();
    for rule in [
        "self.poolMin <= self.poolMax",
        "self.bufferMin <= self.bufferMax",
        "self == oldSelf",
    ] {
        assert!(text.contains(rule), "missing CEL rule {rule}");
    }
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["sbxpool".to_owned()][..])
    );
}
