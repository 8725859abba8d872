//! Image references: parsed with the distribution grammar and normalized the way
//! Docker and containerd do, so `busybox`, `library/busybox` and
//! `docker.io/library/busybox:latest` are one key for placement affinity and inventory.

use std::{fmt, sync::Arc};

use crate::spec::SpecError;

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DOMAIN: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;

/// A normalized image reference: `domain/path[:tag][@digest]`, with a tag of
/// `latest` added when neither tag nor digest was given.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    full: Arc<str>,
    /// End of the domain within `full`.
    domain_end: usize,
    /// End of `domain/path` within `full`.
    name_end: usize,
    /// Range of the tag, if any.
    tag: Option<(usize, usize)>,
    /// Start of the digest (after '@'), if any.
    digest_start: Option<usize>,
}

impl ImageRef {
    /// Parse and normalize; `field` names the input in errors (e.g. `spec.image`).
    pub fn parse(field: &str, input: &str) -> Result<Self, SpecError> {
        let err = |why: String| {
            SpecError::new(field, format!("invalid image reference {input:?}: {why}"))
        };
        if input.is_empty() {
            return Err(SpecError::new(field, "must not be empty"));
        }
        if input.trim() != input || input.contains(char::is_whitespace) {
            return Err(err("must not contain whitespace".into()));
        }

        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                check_digest(d).map_err(|why| err(why.into()))?;
                (r, Some(d))
            }
            None => (input, None),
        };
        // A ':' after the last '/' starts the tag; earlier ones belong to a domain port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            check_tag(t).map_err(|why| err(why.into()))?;
        }
        if name.is_empty() {
            return Err(err("repository name is empty".into()));
        }

        let (domain, path) = split_domain(name);
        if let Some(d) = domain {
            check_domain(d).map_err(|why| err(why.into()))?;
        }
        for component in path.split('/') {
            check_path_component(component).map_err(err)?;
        }

        let domain = match domain {
            None | Some(LEGACY_DOMAIN) => DEFAULT_DOMAIN,
            Some(d) => d,
        };
        let official = domain == DEFAULT_DOMAIN && !path.contains('/');
        let mut full = String::with_capacity(input.len() + 24);
        full.push_str(domain);
        let domain_end = full.len();
        full.push('/');
        if official {
            full.push_str(OFFICIAL_PREFIX);
        }
        full.push_str(path);
        let name_end = full.len();
        if full.len() > MAX_NAME_LEN {
            return Err(err(format!(
                "repository name longer than {MAX_NAME_LEN} characters"
            )));
        }
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some(DEFAULT_TAG),
            (None, Some(_)) => None,
        };
        let tag_range = tag.map(|t| {
            full.push(':');
            let start = full.len();
            full.push_str(t);
            (start, full.len())
        });
        let digest_start = digest.map(|d| {
            full.push('@');
            let start = full.len();
            full.push_str(d);
            start
        });
        Ok(Self {
            full: Arc::from(full),
            domain_end,
            name_end,
            tag: tag_range,
            digest_start,
        })
    }

    /// The normalized reference, e.g. `docker.io/library/busybox:latest`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Registry host (and port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn domain(&self) -> &str {
        &self.full[..self.domain_end]
    }

    /// Repository path within the registry, e.g. `library/busybox`.
    pub fn path(&self) -> &str {
        &self.full[self.domain_end + 1..self.name_end]
    }

    /// `domain/path`, without tag or digest.
    pub fn name(&self) -> &str {
        &self.full[..self.name_end]
    }

    /// The tag, if any (always present unless pinned by digest only).
    pub fn tag(&self) -> Option<&str> {
        self.tag.map(|(s, e)| &self.full[s..e])
    }

    /// The digest, e.g. `sha256:...`, if pinned.
    pub fn digest(&self) -> Option<&str> {
        self.digest_start.map(|s| &self.full[s..])
    }
}

impl TryFrom<String> for ImageRef {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        Self::parse("image", &s)
    }
}

impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.full.to_string()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({})", &*self.full)
    }
}

/// The first component is a domain when it looks like a host: it has a '.' or a ':'
/// (port), is `localhost`, or has uppercase letters (repository paths cannot).
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn check_domain(domain: &str) -> Result<(), &'static str> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("registry port must be a number");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Err("registry host is not a valid host name");
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn check_path_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("repository path has an empty component".into());
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("repository name {c:?} must be lowercase"));
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(format!(
            "repository component {c:?} must start and end with a letter or digit"
        ));
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return Err(format!(
                "repository component {c:?} has an invalid separator {sep:?}"
            ));
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn check_tag(t: &str) -> Result<(), &'static str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    if b.is_empty() || b.len() > 128 {
        return Err("tag must be 1 to 128 characters");
    }
    if !word(b[0]) || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-') {
        return Err(
            "tag may hold only letters, digits, '_', '.' and '-', not starting with '.' or '-'",
        );
    }
    Ok(())
}

fn check_digest(d: &str) -> Result<(), &'static str> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err("digest must be ALGORITHM:HEX");
    };
    match algo {
        "sha256" if hex.len() == 64 => {}
        "sha512" if hex.len() == 128 => {}
        "sha256" | "sha512" => return Err("digest has the wrong length"),
        _ => return Err("digest algorithm must be sha256 or sha512"),
    }
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("digest must be lowercase hex");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageRef::parse("image", s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_short_names_normalize() {
        let want = "docker.io/library/busybox:latest";
        for s in [
            "busybox",
            "busybox:latest",
            "library/busybox",
            "docker.io/busybox",
            "docker.io/library/busybox:latest",
            "index.docker.io/library/busybox",
        ] {
            assert_eq!(norm(s), want, "{s}");
        }
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
    }

    #[test]
    fn other_registries_keep_their_domain() {
        let r = ImageRef::parse("image", "127.0.0.1:5000/team/app:1.2").unwrap();
        assert_eq!(r.domain(), "127.0.0.1:5000");
        assert_eq!(r.path(), "team/app");
        assert_eq!(r.tag(), Some("1.2"));
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("ghcr.io/o/r"), "ghcr.io/o/r:latest");
        assert_eq!(norm("localhost:5000/app"), "localhost:5000/app:latest");
    }

    #[test]
    fn digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse("image", &format!("busybox@{d}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.as_str(), format!("docker.io/library/busybox@{d}"));
        let both = ImageRef::parse("image", &format!("busybox:1@{d}")).unwrap();
        assert_eq!(both.tag(), Some("1"));
    }

    #[test]
    fn invalid_references_name_the_field() {
        for bad in [
            "",
            " busybox",
            "Busybox",
            "busy box",
            "busybox:",
            "busybox:-x",
            "a//b",
            "a/",
            "-a",
            "a@sha256:12",
            "a@md5:abcd",
            "host:port/x",
            "a__-b",
        ] {
            let err = ImageRef::parse("spec.image", bad).unwrap_err();
            assert_eq!(err.field(), "spec.image", "{bad:?} gave {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn normalization_is_idempotent(s in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}(:[a-z0-9]{1,6})?") {
            let once = ImageRef::parse("image", &s).unwrap();
            let twice = ImageRef::parse("image", once.as_str()).unwrap();
            proptest::prop_assert_eq!(once, twice);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = ImageRef::parse("image", &s);
        }
    }
}
