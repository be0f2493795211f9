//! The image as reported to the CRI, and the auth it is pulled with.

use crate::ImageError;

/// Registry credentials, from the CRI `AuthConfig`.
#[derive(Default, Clone)]
pub struct RegistryAuth {
    /// User name for Basic auth.
    pub username: Option<String>,
    /// Password for Basic auth.
    pub password: Option<String>,
    /// `base64("user:pass")`, used when `username` is unset.
    pub auth: Option<String>,
    /// OAuth2 refresh token issued by the registry's token server.
    pub identity_token: Option<String>,
    /// Bearer token sent as is.
    pub registry_token: Option<String>,
}

impl std::fmt::Debug for RegistryAuth {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "***"),
            )
            .field(
                "registry_token",
                &self.registry_token.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// A pulled, unpacked image.
#[derive(Clone, Debug)]
pub struct Image {
    /// `sha256:<hex>` of the image config.
    pub id: String,
    /// Normalized tags, e.g. `docker.io/library/busybox:latest`.
    pub repo_tags: Vec<String>,
    /// `docker.io/library/busybox@sha256:<manifest or index digest>`.
    pub repo_digests: Vec<String>,
    /// Sum of the compressed layer sizes.
    pub size: u64,
    /// The config's `User` (`""` if unset).
    pub user: String,
    /// Chain ids of the layers, bottom to top.
    pub chain_ids: Vec<String>,
    /// The raw OCI image config.
    pub config_json: Vec<u8>,
    /// Exempt from image garbage collection by the kubelet.
    pub pinned: bool,
}

impl Image {
    fn user_part(&self) -> &str {
        self.user.split(':').next().unwrap_or_default()
    }

    /// The user part of `user` when it is numeric.
    pub fn uid(&self) -> Option<i64> {
        self.user_part().parse().ok()
    }

    /// The user part of `user` when it is a name, else `""`.
    pub fn username(&self) -> String {
        match self.uid() {
            Some(_) => String::new(),
            None => self.user_part().to_owned(),
        }
    }

    /// The parsed image config.
    pub fn config(&self) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
        serde_json::from_slice(&self.config_json)
            .map_err(|e| ImageError::Store(format!("image {} config: {e}", self.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_user(user: &str) -> Image {
        Image {
            id: "sha256:x".into(),
            repo_tags: vec![],
            repo_digests: vec![],
            size: 0,
            user: user.into(),
            chain_ids: vec![],
            config_json: br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"User":"1000"}}"#.to_vec(),
            pinned: false,
        }
    }

    #[test]
    fn user_splits_into_uid_or_name() {
        assert_eq!(with_user("1000").uid(), Some(1000));
        assert_eq!(with_user("1000:1000").uid(), Some(1000));
        assert_eq!(with_user("1000").username(), "");
        assert_eq!(with_user("nobody:nogroup").uid(), None);
        assert_eq!(with_user("nobody:nogroup").username(), "nobody");
        assert_eq!(with_user("").uid(), None);
        assert_eq!(with_user("").username(), "");
        let cfg = with_user("").config().unwrap();
        assert_eq!(
            cfg.config().as_ref().unwrap().user().as_deref(),
            Some("1000")
        );
    }
}
