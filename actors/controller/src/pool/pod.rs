//! The agent pod a pool runs: its template (the pool's `agentTemplate` or a default),
//! the environment the reconciler injects, labels, owner and template hash.

use std::collections::BTreeMap;

use fsb_core::{
    capability::CapabilityDrop,
    labels::{LABEL_APP, LABEL_APP_AGENT, LABEL_POOL},
};
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodTemplateSpec, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::{POD_TEMPLATE_HASH_ANNOTATION, PoolConfig, PoolError};
use crate::crd::{RuntimeName, SandboxPool};

/// Host paths the default template mounts at the same place: containerd's socket and
/// state (the agent drives the node's containerd), sandbox logs, the runtimes' state.
pub const HOST_PATHS: [&str; 4] = [
    "/run/containerd",
    "/var/lib/containerd",
    "/var/log/fast-sandbox",
    "/run/fast-sandbox",
];

/// The agent's `--drop-capability` list, canonical names comma-separated.
pub const DROP_CAPABILITIES_ENV: &str = "FSB_DROP_CAPABILITIES";
/// Name of the agent container in the default template.
pub const AGENT_CONTAINER: &str = "agent";
/// Volume of the pool's TLS Secret in agent pods.
pub const TLS_VOLUME: &str = "fsb-agent-tls";
/// Where the agent container finds it (`FSB_TLS_DIR`).
pub const TLS_MOUNT_PATH: &str = "/var/run/fast-sandbox/tls";

/// The template used when a pool names none: one privileged agent container on the
/// host network with the host paths it needs.
pub fn default_template(config: &PoolConfig) -> Result<PodTemplateSpec, PoolError> {
    let volumes: Vec<_> = HOST_PATHS
        .iter()
        .enumerate()
        .map(|(i, path)| {
            serde_json::json!({
                "name": format!("host-{i}"),
                "hostPath": {"path": path, "type": "DirectoryOrCreate"},
            })
        })
        .collect();
    let mounts: Vec<_> = HOST_PATHS
        .iter()
        .enumerate()
        .map(|(i, path)| serde_json::json!({"name": format!("host-{i}"), "mountPath": path}))
        .collect();
    Ok(serde_json::from_value(serde_json::json!({
        "spec": {
            "hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": AGENT_CONTAINER,
                "image": config.agent_image,
                "securityContext": {"privileged": true},
                "ports": [{"name": "agent", "containerPort": config.agent_port}],
                // The kubelet's gRPC probe speaks no TLS; with TLS on, the port
                // accepting connections is what "ready" can mean.
                "readinessProbe": if config.ca.is_some() {
                    serde_json::json!({"tcpSocket": {"port": config.agent_port}})
                } else {
                    serde_json::json!({"grpc": {"port": config.agent_port}})
                },
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    }))?)
}

fn field_ref(path: &str) -> Option<EnvVarSource> {
    Some(EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            api_version: None,
        }),
        ..EnvVarSource::default()
    })
}

fn runtime_name(runtime: RuntimeName) -> &'static str {
    match runtime {
        RuntimeName::Runc => "runc",
        RuntimeName::Crun => "crun",
        RuntimeName::Gvisor => "gvisor",
    }
}

/// The environment the reconciler sets on the first container; it replaces entries of
/// the same names a template may carry, so a template cannot lie about its identity.
pub fn agent_env(pool: &SandboxPool, config: &PoolConfig) -> Vec<EnvVar> {
    let literal = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    };
    let from = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: field_ref(path),
    };
    vec![
        from("FSB_AGENT_ID", "metadata.uid"),
        from("FSB_POD_UID", "metadata.uid"),
        from("FSB_POD_NAME", "metadata.name"),
        from("FSB_NAMESPACE", "metadata.namespace"),
        from("FSB_NODE_NAME", "spec.nodeName"),
        from("FSB_ADVERTISE_HOST", "status.podIP"),
        literal("FSB_POOL", pool.name_any()),
        literal(
            "FSB_CAPACITY",
            pool.spec.max_sandboxes_per_pod.max(1).to_string(),
        ),
        literal(
            "FSB_DEFAULT_RUNTIME",
            runtime_name(pool.spec.runtime).to_owned(),
        ),
        literal("FSB_CONTROLLER", config.controller_url.clone()),
        literal("FSB_LISTEN", format!("0.0.0.0:{}", config.agent_port)),
        // `warmImages` as the agent's `--warm IMAGE=N` list (in the pool's runtime).
        literal(
            "FSB_WARM",
            pool.spec
                .warm_images
                .iter()
                .filter(|w| w.count > 0)
                .map(|w| format!("{}={}", w.image, w.count))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]
}

/// The capabilities the pool takes from its sandboxes (`sandboxSecurity.capabilities`):
/// an unknown name in `drop`, or anything in `add`, is refused naming the field.
pub fn dropped_capabilities(pool: &SandboxPool) -> Result<CapabilityDrop, PoolError> {
    let Some(policy) = pool
        .spec
        .sandbox_security
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
    else {
        return Ok(CapabilityDrop::default());
    };
    if !policy.add.is_empty() {
        return Err(PoolError::InvalidSecurity(format!(
            "sandboxSecurity.capabilities.add: {:?}: sandboxes cannot gain capabilities \
             beyond the default set; only drop is supported",
            policy.add
        )));
    }
    CapabilityDrop::parse(&policy.drop)
        .map_err(|e| PoolError::InvalidSecurity(format!("sandboxSecurity.capabilities.drop: {e}")))
}

/// The pool's effective template (env injected, labels set) and its hash: any change of
/// the template, the capacity, the runtime or the controller's settings changes it.
pub fn rendered_template(
    pool: &SandboxPool,
    config: &PoolConfig,
) -> Result<(PodTemplateSpec, String), PoolError> {
    let mut template = match &pool.spec.agent_template {
        Some(t) => t.clone(),
        None => default_template(config)?,
    };
    let spec = template
        .spec
        .as_mut()
        .ok_or(PoolError::InvalidTemplate("agentTemplate.spec is missing"))?;
    let first = spec
        .containers
        .first_mut()
        .ok_or(PoolError::InvalidTemplate("agentTemplate has no container"))?;
    let dropped = dropped_capabilities(pool)?;
    let mut injected = agent_env(pool, config);
    // Only when set: pools without a policy keep their template hash (no rollout).
    if !dropped.is_empty() {
        injected.push(EnvVar {
            name: DROP_CAPABILITIES_ENV.to_owned(),
            value: Some(dropped.to_arg()),
            value_from: None,
        });
    }
    if config.ca.is_some() {
        injected.push(EnvVar {
            name: "FSB_TLS_DIR".to_owned(),
            value: Some(TLS_MOUNT_PATH.to_owned()),
            value_from: None,
        });
        let mounts = first.volume_mounts.get_or_insert_with(Vec::new);
        mounts.retain(|m| m.name != TLS_VOLUME && m.mount_path != TLS_MOUNT_PATH);
        mounts.push(VolumeMount {
            name: TLS_VOLUME.to_owned(),
            mount_path: TLS_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let mut env: Vec<EnvVar> = first
        .env
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !injected.iter().any(|i| i.name == e.name))
        .collect();
    env.extend(injected);
    first.env = Some(env);
    if config.ca.is_some() {
        let volumes = spec.volumes.get_or_insert_with(Vec::new);
        volumes.retain(|v| v.name != TLS_VOLUME);
        volumes.push(Volume {
            name: TLS_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(super::tls_secret_name(&pool.name_any())),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL_APP.to_owned(), LABEL_APP_AGENT.to_owned());
    labels.insert(LABEL_POOL.to_owned(), pool.name_any());
    let bytes = serde_json::to_vec(&template)?;
    let hash = hex::encode(&Sha256::digest(&bytes)[..8]);
    Ok((template, hash))
}

/// The controller ownerReference naming `pool` (on its pods and its TLS Secret).
pub fn owner_of(pool: &SandboxPool) -> Result<OwnerReference, PoolError> {
    Ok(OwnerReference {
        api_version: SandboxPool::api_version(&()).into_owned(),
        kind: SandboxPool::kind(&()).into_owned(),
        name: pool.name_any(),
        uid: pool.uid().ok_or(PoolError::MissingField("metadata.uid"))?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// A new agent pod of `pool` from its rendered template: named `<pool>-<random>` by the
/// API server, owned by the pool (garbage collection removes it with the pool).
pub fn agent_pod(
    pool: &SandboxPool,
    template: &PodTemplateSpec,
    hash: &str,
) -> Result<Pod, PoolError> {
    let owner = owner_of(pool)?;
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", pool.name_any()));
    meta.namespace = pool.namespace();
    meta.owner_references = Some(vec![owner]);
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(POD_TEMPLATE_HASH_ANNOTATION.to_owned(), hash.to_owned());
    Ok(Pod {
        metadata: meta,
        spec: template.spec.clone(),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crd::{CapabilityPolicy, PoolCapacity, SandboxPoolSpec, SandboxSecurity, WarmImage};

    fn pool(per_pod: u32, template: Option<PodTemplateSpec>) -> SandboxPool {
        let mut p = SandboxPool::new(
            "web",
            SandboxPoolSpec {
                capacity: PoolCapacity::default(),
                max_sandboxes_per_pod: per_pod,
                runtime: RuntimeName::Gvisor,
                warm_images: vec![
                    WarmImage {
                        image: "docker.io/library/busybox:1".into(),
                        count: 4,
                    },
                    WarmImage {
                        image: "none".into(),
                        count: 0,
                    },
                ],
                agent_template: template,
                sandbox_security: None,
            },
        );
        p.metadata.namespace = Some("team-a".into());
        p.metadata.uid = Some("pool-uid".into());
        p
    }

    fn config() -> PoolConfig {
        PoolConfig::new("example/fsb-agent:1", "http://fsb-controller:7371")
    }

    fn env_of(t: &PodTemplateSpec) -> Vec<EnvVar> {
        t.spec.as_ref().unwrap().containers[0].env.clone().unwrap()
    }

    #[test]
    fn the_default_template_is_a_privileged_host_network_agent() {
        let (t, _) = rendered_template(&pool(3, None), &config()).unwrap();
        let spec = t.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("example/fsb-agent:1"));
        assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
        let mounts: Vec<_> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, HOST_PATHS);
    }

    #[test]
    fn the_reconciler_injects_identity_capacity_runtime_and_controller() {
        let (t, _) = rendered_template(&pool(3, None), &config()).unwrap();
        let env = env_of(&t);
        let get = |n: &str| env.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(get("FSB_CAPACITY").value.as_deref(), Some("3"));
        assert_eq!(
            get("FSB_WARM").value.as_deref(),
            Some("docker.io/library/busybox:1=4")
        );
        assert_eq!(get("FSB_DEFAULT_RUNTIME").value.as_deref(), Some("gvisor"));
        assert_eq!(get("FSB_POOL").value.as_deref(), Some("web"));
        assert_eq!(get("FSB_LISTEN").value.as_deref(), Some("0.0.0.0:5758"));
        assert_eq!(
            get("FSB_CONTROLLER").value.as_deref(),
            Some("http://fsb-controller:7371")
        );
        let field = |n: &str| get(n).value_from.unwrap().field_ref.unwrap().field_path;
        assert_eq!(field("FSB_AGENT_ID"), "metadata.uid");
        assert_eq!(field("FSB_POD_UID"), "metadata.uid");
        assert_eq!(field("FSB_POD_NAME"), "metadata.name");
        assert_eq!(field("FSB_NAMESPACE"), "metadata.namespace");
        assert_eq!(field("FSB_NODE_NAME"), "spec.nodeName");
        assert_eq!(field("FSB_ADVERTISE_HOST"), "status.podIP");
    }

    fn with_caps(drop: &[&str], add: &[&str]) -> SandboxPool {
        let mut p = pool(1, None);
        p.spec.sandbox_security = Some(SandboxSecurity {
            capabilities: Some(CapabilityPolicy {
                drop: drop.iter().map(|s| s.to_string()).collect(),
                add: add.iter().map(|s| s.to_string()).collect(),
            }),
        });
        p
    }

    #[test]
    fn a_pool_drop_list_reaches_the_agent_canonical_and_only_when_set() {
        let env_value = |p: &SandboxPool| {
            let (t, hash) = rendered_template(p, &config()).unwrap();
            let v = env_of(&t)
                .into_iter()
                .find(|e| e.name == DROP_CAPABILITIES_ENV)
                .map(|e| e.value.unwrap());
            (v, hash)
        };
        let (none, plain_hash) = env_value(&pool(1, None));
        assert_eq!(none, None, "no policy, no variable");
        let (empty, empty_hash) = env_value(&with_caps(&[], &[]));
        assert_eq!(empty, None);
        assert_eq!(empty_hash, plain_hash, "an empty policy changes no pod");
        let (v, hash) = env_value(&with_caps(&["net_bind_service", "CAP_CHOWN", "CHOWN"], &[]));
        assert_eq!(v.as_deref(), Some("CAP_CHOWN,CAP_NET_BIND_SERVICE"));
        assert_ne!(hash, plain_hash, "a new policy rolls the pool's pods");
        let (_, same) = env_value(&with_caps(&["CHOWN", "Net_Bind_Service"], &[]));
        assert_eq!(same, hash, "another spelling of one policy is one template");
    }

    #[test]
    fn unknown_or_added_capabilities_are_refused_naming_the_field() {
        let err = rendered_template(&with_caps(&["CHOWN", "NOT_A_CAP"], &[]), &config())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid sandboxSecurity: sandboxSecurity.capabilities.drop: ")
                && err.contains("\"NOT_A_CAP\""),
            "{err}"
        );
        let err = rendered_template(&with_caps(&[], &["SYS_ADMIN"]), &config())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sandboxSecurity.capabilities.add: ") && err.contains("SYS_ADMIN"),
            "{err}"
        );
    }

    #[test]
    fn the_schema_pattern_accepts_what_the_parser_accepts() {
        let re = regex::Regex::new(&crate::crd::capability_pattern()).unwrap();
        for ok in [
            "ALL",
            "all",
            "CAP_CHOWN",
            "chown",
            "Net_Raw",
            "CAP_CHECKPOINT_RESTORE",
        ] {
            assert!(re.is_match(ok), "{ok}");
            assert!(fsb_core::capability::canonical(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "CAP_ALL",
            "NOPE",
            "CAP_",
            "xCHOWN",
            "CHOWNx",
            "CAP_CAP_CHOWN",
        ] {
            assert!(!re.is_match(bad), "{bad}");
            assert!(fsb_core::capability::canonical(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_template_keeps_its_own_env_but_not_our_names() {
        let t: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "metadata": {"labels": {"team": "a", "app": "other"}},
            "spec": {"containers": [{"name": "x", "image": "i", "env": [
                {"name": "RUST_LOG", "value": "debug"},
                {"name": "FSB_CAPACITY", "value": "999"},
            ]}]}
        }))
        .unwrap();
        let (t, _) = rendered_template(&pool(2, Some(t)), &config()).unwrap();
        let env = env_of(&t);
        assert_eq!(env[0].name, "RUST_LOG");
        let caps: Vec<_> = env.iter().filter(|e| e.name == "FSB_CAPACITY").collect();
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].value.as_deref(), Some("2"));
        let labels = t.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["app"], "sandbox-agent");
        assert_eq!(labels["team"], "a");
        assert_eq!(labels["fast-sandbox.io/pool"], "web");
    }

    #[test]
    fn the_hash_changes_with_the_template_and_the_capacity_only() {
        let (_, a) = rendered_template(&pool(2, None), &config()).unwrap();
        let (_, b) = rendered_template(&pool(2, None), &config()).unwrap();
        let (_, c) = rendered_template(&pool(3, None), &config()).unwrap();
        let mut other = config();
        other.agent_image = "example/fsb-agent:2".into();
        let (_, d) = rendered_template(&pool(2, None), &other).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn a_pod_is_owned_by_its_pool_and_carries_the_hash() {
        let p = pool(1, None);
        let (t, hash) = rendered_template(&p, &config()).unwrap();
        let pod = agent_pod(&p, &t, &hash).unwrap();
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("web-"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "SandboxPool");
        assert_eq!(owner.api_version, "sandbox.fast.io/v1alpha1");
        assert_eq!(owner.uid, "pool-uid");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[POD_TEMPLATE_HASH_ANNOTATION],
            hash
        );
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()["app"],
            "sandbox-agent"
        );
    }

    #[test]
    fn with_the_ca_the_pool_secret_is_mounted_and_named_to_the_agent() {
        let mut c = config();
        c.ca = Some(std::sync::Arc::new(
            crate::tls::Ca::generate("test CA").unwrap(),
        ));
        let t: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "x", "image": "i"}]}
        }))
        .unwrap();
        for template in [None, Some(t)] {
            let (t, _) = rendered_template(&pool(1, template), &c).unwrap();
            let spec = t.spec.as_ref().unwrap();
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == TLS_VOLUME)
                .unwrap();
            let secret = volume.secret.as_ref().unwrap();
            assert_eq!(secret.secret_name.as_deref(), Some("web-agent-tls"));
            let first = &spec.containers[0];
            let mount = first
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == TLS_VOLUME)
                .unwrap();
            assert_eq!(mount.mount_path, TLS_MOUNT_PATH);
            assert_eq!(mount.read_only, Some(true));
            let env = env_of(&t);
            let dir = env.iter().find(|e| e.name == "FSB_TLS_DIR").unwrap();
            assert_eq!(dir.value.as_deref(), Some(TLS_MOUNT_PATH));
        }
        // Without the CA, nothing of it.
        let (t, _) = rendered_template(&pool(1, None), &config()).unwrap();
        assert!(env_of(&t).iter().all(|e| e.name != "FSB_TLS_DIR"));
        let probe = t.spec.as_ref().unwrap().containers[0]
            .readiness_probe
            .clone()
            .unwrap();
        assert!(probe.grpc.is_some());
    }

    #[test]
    fn a_template_without_containers_is_refused() {
        let t: PodTemplateSpec =
            serde_json::from_value(serde_json::json!({"spec": {"containers": []}})).unwrap();
        assert!(matches!(
            rendered_template(&pool(1, Some(t)), &config()),
            Err(PoolError::InvalidTemplate(_))
        ));
    }
}
