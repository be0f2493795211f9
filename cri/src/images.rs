//! CRI ImageService on top of `vessel_image::ImageStore`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};
use vessel_image::{Image, ImageError, ImageStore, RegistryAuth};
use vessel_storage::scratch::ScratchDisks;

use crate::status::image_status;

/// Who uses an image (by id), if anyone: removing it would pull the layers from
/// under that container.
pub type ImageUsers = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub struct ImageSvc {
    store: ImageStore,
    users: ImageUsers,
    /// The pods' scratch disks: the containers' writable layers on this node.
    scratch: ScratchDisks,
}

impl ImageSvc {
    pub fn new(store: ImageStore, users: ImageUsers, scratch: ScratchDisks) -> Self {
        ImageSvc {
            store,
            users,
            scratch,
        }
    }

    /// Runs a synchronous store call off the async workers (it may walk or delete
    /// directories).
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(ImageStore) -> Result<T, ImageError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| Status::internal(format!("image store task failed: {e}")))?
            .map_err(|e| image_status(&e))
    }

    async fn resolve(&self, name: String) -> Result<Option<Image>, Status> {
        self.blocking(move |s| s.resolve(&name)).await
    }
}

fn spec_image(spec: Option<&cri::ImageSpec>) -> Option<&str> {
    spec.map(|s| s.image.as_str()).filter(|s| !s.is_empty())
}

fn required_image(spec: Option<&cri::ImageSpec>) -> Result<String, Status> {
    spec_image(spec)
        .map(str::to_owned)
        .ok_or_else(|| Status::invalid_argument("image spec is missing an image name"))
}

fn auth_from(a: Option<&cri::AuthConfig>) -> RegistryAuth {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    a.map(|a| RegistryAuth {
        username: opt(&a.username),
        password: opt(&a.password),
        auth: opt(&a.auth),
        identity_token: opt(&a.identity_token),
        registry_token: opt(&a.registry_token),
    })
    .unwrap_or_default()
}

fn to_cri(image: &Image) -> cri::Image {
    cri::Image {
        id: image.id.clone(),
        repo_tags: image.repo_tags.clone(),
        repo_digests: image.repo_digests.clone(),
        size: image.size,
        uid: image.uid().map(|value| cri::Int64Value { value }),
        username: image.username(),
        spec: Some(cri::ImageSpec {
            image: image.id.clone(),
            ..Default::default()
        }),
        pinned: image.pinned,
    }
}

/// The `info` entry of a verbose ImageStatus: the image as JSON, with its OCI config.
fn verbose_info(image: &Image) -> Result<String, Status> {
    let config: serde_json::Value = serde_json::from_slice(&image.config_json).map_err(|e| {
        Status::internal(format!(
            "stored image config of {} is not JSON: {e}",
            image.id
        ))
    })?;
    let info = serde_json::json!({
        "id": image.id,
        "repoTags": image.repo_tags,
        "repoDigests": image.repo_digests,
        "size": image.size,
        "user": image.user,
        "chainIDs": image.chain_ids,
        "pinned": image.pinned,
        "imageSpec": config,
    });
    Ok(info.to_string())
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ImageService for ImageSvc {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> R<cri::ListImagesResponse> {
        let filter = req
            .get_ref()
            .filter
            .as_ref()
            .and_then(|f| spec_image(f.image.as_ref()))
            .map(str::to_owned);
        let images = match filter {
            // A filter names one image; resolving it accepts ids, tags and digests alike.
            Some(name) => self.resolve(name).await?.into_iter().collect(),
            None => self.blocking(|s| s.list()).await?,
        };
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> R<cri::ImageStatusResponse> {
        let req = req.into_inner();
        let name = required_image(req.image.as_ref())?;
        // CRI: an absent image is an empty response, not an error.
        let Some(image) = self.resolve(name).await? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if req.verbose {
            info.insert("info".to_owned(), verbose_info(&image)?);
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(to_cri(&image)),
            info,
        }))
    }

    async fn pull_image(&self, req: Request<cri::PullImageRequest>) -> R<cri::PullImageResponse> {
        let req = req.into_inner();
        let reference = required_image(req.image.as_ref())?;
        let auth = auth_from(req.auth.as_ref());
        let started = std::time::Instant::now();
        // Spawned so that a client hanging up does not cancel a pull half-way; the
        // image lands anyway and the client's retry finds it.
        let store = self.store.clone();
        let r = reference.clone();
        let pulled = tokio::spawn(async move { store.pull(&r, &auth).await })
            .await
            .map_err(|e| Status::internal(format!("pull task failed: {e}")))?;
        crate::metrics::get().image_pull(started.elapsed(), pulled.is_ok());
        match pulled {
            Ok(image) => {
                tracing::info!(
                    reference = %reference,
                    image_id = %image.id,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "pulled image"
                );
                Ok(Response::new(cri::PullImageResponse {
                    image_ref: image.id,
                }))
            }
            Err(e) => {
                let status = image_status(&e);
                if status.code() == tonic::Code::Internal {
                    tracing::error!(reference = %reference, error = %e, "pull failed");
                } else {
                    tracing::warn!(reference = %reference, error = %e, "pull failed");
                }
                Err(status)
            }
        }
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> R<cri::RemoveImageResponse> {
        let name = required_image(req.get_ref().image.as_ref())?;
        let log_name = name.clone();
        let users = self.users.clone();
        let removed = self
            .blocking(move |s| s.remove_unless_used(&name, |id| users(id)))
            .await
            .inspect_err(|e| {
                tracing::warn!(image = %log_name, error = %e.message(), "remove failed");
            })?;
        // CRI: removing an absent image succeeds.
        tracing::info!(image = %log_name, removed, "remove image");
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> R<cri::ImageFsInfoResponse> {
        let usage = self.blocking(|s| s.fs_usage()).await?;
        let scratch = self.scratch.clone();
        let containers = tokio::task::spawn_blocking(move || scratch_usage(&scratch))
            .await
            .map_err(|e| Status::internal(format!("scratch usage task failed: {e}")))??;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs_usage(
                timestamp,
                &usage.mountpoint,
                usage.used_bytes,
                usage.inodes_used,
            )],
            container_filesystems: vec![fs_usage(
                timestamp,
                &containers.0,
                containers.1.used_bytes,
                containers.1.inodes_used,
            )],
        }))
    }
}

fn fs_usage(
    timestamp: i64,
    mountpoint: &std::path::Path,
    used_bytes: u64,
    inodes_used: u64,
) -> cri::FilesystemUsage {
    cri::FilesystemUsage {
        timestamp,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: mountpoint.display().to_string(),
        }),
        used_bytes: Some(cri::UInt64Value { value: used_bytes }),
        inodes_used: Some(cri::UInt64Value { value: inodes_used }),
    }
}

/// Where the scratch disks live (the mount holding their dir, or its nearest
/// existing parent before the first pod) and what they take there: blocks the
/// guests wrote, counted on the host file, never read from the guest.
fn scratch_usage(
    scratch: &ScratchDisks,
) -> Result<(std::path::PathBuf, vessel_storage::scratch::ScratchUsage), Status> {
    let usage = scratch
        .usage()
        .map_err(|e| Status::internal(format!("scratch disk usage: {e}")))?;
    let mountpoint = crate::scratch::scratch_mountpoint(scratch.dir()).map_err(|e| {
        Status::internal(format!("mount point of {}: {e}", scratch.dir().display()))
    })?;
    Ok((mountpoint, usage))
}
