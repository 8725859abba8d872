//! Per-call authorization of the fast path: what each RPC does in Kubernetes RBAC terms
//! ([`Access`]) and the seam that decides it ([`Authorizer`]).
//!
//! Local mode has no authorizer (the 0600 token file is the whole story, checked by
//! [`crate::TokenCheck`]). Kubernetes mode plugs in the controller's TokenReview +
//! SubjectAccessReview authorizer, so RBAC on `sandboxes.sandbox.fast.io` governs the
//! fast path as it governs kubectl. The check runs in the service, before the gateway
//! does any work, because the namespace is in the message body (an interceptor only
//! sees headers).

use std::fmt;

use futures::future::BoxFuture;
use tonic::{Status, metadata::MetadataMap};

use crate::DEFAULT_NAMESPACE;

/// API group of the Sandbox and SandboxPool resources.
pub const API_GROUP: &str = "sandbox.fast.io";

/// One call in RBAC terms: `verb` on `resource[/subresource]` (in `namespace`, of
/// `name`), like a request to the API server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// `create`, `get`, `list`, `watch`, `update`, `delete`.
    pub verb: &'static str,
    /// `sandboxes` or `sandboxpools`.
    pub resource: &'static str,
    /// `exec` or `log` (as `pods/exec`, `pods/log`), else empty.
    pub subresource: &'static str,
    /// Empty: every namespace (cluster-wide list or watch).
    pub namespace: String,
    /// The object's name; empty for create (RBAC cannot limit create by name), list
    /// and watch.
    pub name: String,
}

impl Access {
    /// `verb` on one sandbox; an empty namespace is the gateway's default namespace.
    pub fn sandbox(verb: &'static str, namespace: &str, name: &str) -> Self {
        Self {
            verb,
            resource: "sandboxes",
            subresource: "",
            namespace: effective(namespace).to_owned(),
            name: name.to_owned(),
        }
    }

    /// Create a sandbox (no name: RBAC `resourceNames` cannot restrict create).
    pub fn create(namespace: &str) -> Self {
        Self::sandbox("create", namespace, "")
    }

    /// `verb` (list or watch) on the sandboxes of `namespace`, or of every namespace
    /// when it is empty (as `kubectl get -A`: cluster-wide rights are needed).
    pub fn collection(verb: &'static str, resource: &'static str, namespace: &str) -> Self {
        Self {
            verb,
            resource,
            subresource: "",
            namespace: namespace.to_owned(),
            name: String::new(),
        }
    }

    /// Exec in a sandbox: `create` on `sandboxes/exec`, as `pods/exec`.
    pub fn exec(namespace: &str, name: &str) -> Self {
        Self {
            subresource: "exec",
            ..Self::sandbox("create", namespace, name)
        }
    }

    /// Read a sandbox's logs: `get` on `sandboxes/log`, as `pods/log`.
    pub fn logs(namespace: &str, name: &str) -> Self {
        Self {
            subresource: "log",
            ..Self::sandbox("get", namespace, name)
        }
    }
}

impl fmt::Display for Access {
    /// As the API server words a refusal: `create resource "sandboxes/exec" in API group
    /// "sandbox.fast.io" in the namespace "a"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} resource \"{}", self.verb, self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        write!(f, "\" in API group \"{API_GROUP}\"")?;
        if self.namespace.is_empty() {
            write!(f, " at the cluster scope")
        } else {
            write!(f, " in the namespace \"{}\"", self.namespace)
        }
    }
}

fn effective(namespace: &str) -> &str {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

/// Decides whether the caller may do an [`Access`]. Errors are the answer as sent:
/// `Unauthenticated` (no or bad credentials), `PermissionDenied` (known caller, not
/// allowed), `Unavailable` (the decision could not be made; never a silent allow).
pub trait Authorizer: Send + Sync + fmt::Debug + 'static {
    /// Authorize `access` for the holder of `token` (the bearer token, if any).
    fn authorize(&self, token: Option<String>, access: Access)
    -> BoxFuture<'_, Result<(), Status>>;
}

/// The bearer token of a call's `authorization` header, if it has one.
pub fn bearer(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_reads_like_the_api_server() {
        assert_eq!(
            Access::exec("a", "s").to_string(),
            "create resource \"sandboxes/exec\" in API group \"sandbox.fast.io\" in the namespace \"a\""
        );
        assert_eq!(
            Access::collection("list", "sandboxes", "").to_string(),
            "list resource \"sandboxes\" in API group \"sandbox.fast.io\" at the cluster scope"
        );
        assert_eq!(Access::create("").namespace, DEFAULT_NAMESPACE);
        assert_eq!(Access::logs("b", "s").verb, "get");
        assert_eq!(Access::logs("b", "s").subresource, "log");
    }

    #[test]
    fn bearer_takes_the_token_only() {
        let mut md = MetadataMap::new();
        assert_eq!(bearer(&md), None);
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&md), None);
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer(&md), None);
        md.insert("authorization", "Bearer t0k".parse().unwrap());
        assert_eq!(bearer(&md).as_deref(), Some("t0k"));
    }
}
