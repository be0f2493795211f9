//! Image references and Docker-style normalization.
//!
//! Parsing follows the distribution/reference grammar (via `oci_spec`'s parser); on
//! top of it short names are expanded the way Docker does (`busybox` →
//! `docker.io/library/busybox:latest`).

use oci_client::Reference;

use crate::ImageError;

/// A parsed, fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (and port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/busybox`.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// The pinned manifest digest, if any (`sha256:<hex>`).
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalizes `s`.
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: s.to_owned(),
            reason,
        };
        if s.trim() != s || s.is_empty() {
            return Err(invalid("empty or surrounded by whitespace".into()));
        }
        let r = Reference::try_from(s).map_err(|e| invalid(e.to_string()))?;
        // Docker refuses repository names that look like image ids: they would be
        // confused with ids everywhere a name or an id is accepted.
        // oci_spec takes an uppercase first component ("Library/x") as part of the
        // repository under docker.io, which the grammar forbids (and which then does
        // not parse again once printed): refuse it, as Docker does.
        if r.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository names must be lowercase".into()));
        }
        let last = r.repository().rsplit('/').next().unwrap_or_default();
        if last.len() == 64 && last.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "repository name must not be a 64-character hex string".into(),
            ));
        }
        if let Some(d) = r.digest() {
            let hex = d.split_once(':').map(|(_, h)| h).unwrap_or_default();
            if !d.starts_with("sha256:") || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!("unsupported digest {d:?}")));
            }
        }
        Ok(ImageRef {
            registry: r.registry().to_owned(),
            repository: r.repository().to_owned(),
            tag: r.tag().map(str::to_owned),
            digest: r.digest().map(|d| d.to_ascii_lowercase()),
        })
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tagged name (`registry/repository:tag`), if the reference has a tag.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// The name pinned to `digest` (`registry/repository@digest`).
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// What the registry is asked for: the digest when pinned, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Normalize a Docker-style reference: `busybox` → `docker.io/library/busybox:latest`.
pub fn normalize_reference(s: &str) -> Result<String, ImageError> {
    Ok(ImageRef::parse(s)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Found by the fuzz test: accepted, then printed as a reference that is not.
    #[test]
    fn uppercase_repositories_are_refused() {
        for s in ["libRary/busybox:1.36", "Library/busybox", "library/buSybox"] {
            assert!(ImageRef::parse(s).is_err(), "{s}");
        }
        // An uppercase registry host is a host, not a repository.
        let r = ImageRef::parse("Registry.Example:5000/app").unwrap();
        assert_eq!(r.repository, "app");
    }

    #[test]
    fn short_names_expand_like_docker() {
        for (input, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("user/app", "docker.io/user/app:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("quay.io/coreos/etcd:v3", "quay.io/coreos/etcd:v3"),
            ("localhost/app", "localhost/app:latest"),
            ("127.0.0.1:5000/app:1", "127.0.0.1:5000/app:1"),
            ("reg.example:5000/a/b/c", "reg.example:5000/a/b/c:latest"),
        ] {
            assert_eq!(normalize_reference(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn digests_are_kept_and_pin_the_object() {
        let r = ImageRef::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.object(), D);
        assert_eq!(r.tagged(), None);

        let r = ImageRef::parse(&format!("127.0.0.1:5000/x/y:v1@{D}")).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "x/y");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.object(), D);
        assert_eq!(r.with_digest(D), format!("127.0.0.1:5000/x/y@{D}"));
    }

    #[test]
    fn malformed_references_are_invalid() {
        for bad in [
            "",
            " busybox",
            "Busybox",
            "busybox:",
            "busybox@sha256:abc",
            "busybox@md5:0123456789abcdef0123456789abcdef",
            "a//b",
            "-leading/dash",
            "busybox:tag with space",
            "reg:5000/:x",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let err = ImageRef::parse(bad).expect_err(bad);
            assert!(
                matches!(err, ImageError::InvalidReference { .. }),
                "{bad}: {err:?}"
            );
            assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        }
    }
}
