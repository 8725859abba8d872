//! fsb-controller: Kubernetes mode.
//!
//! Role (issue 5, in progress): the durable record of sandboxes in Kubernetes and the
//! reconcilers that drive agent pools. Today: [`crd`], the `Sandbox` and `SandboxPool`
//! custom resources as Rust types; the CRD YAML in `deploy/crds/` is generated from
//! them ([`crd::crds_yaml`]) and a test fails if it drifts.
//!
//! Invariants of the schema: `image` and `poolRef` are required and non-empty
//! (seed-review item 12); ports are 1..65535 (item 11); enums are closed; a pool's
//! minimums never exceed its maximums and its runtime cannot change (CEL rules, checked
//! by the API server).

pub mod agents;
pub mod crd;
pub mod identity;
pub mod leader;
pub mod pool;
pub mod rbac;
pub mod run;
pub mod sandboxes;
pub mod serving;
pub mod store;
pub mod supervisor;
pub mod tls;
