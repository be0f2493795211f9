//! A CRI v1 client over vesseld's unix socket.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Both CRI services on one channel. Clients are cheap to clone.
#[derive(Clone)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the unix socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path: PathBuf = path.as_ref().to_owned();
        let shown = path.display().to_string();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::try_from("http://[::1]:0")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .with_context(|| format!("cannot connect to CRI socket {shown}"))?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
        })
    }

    /// PullImage without credentials; returns the image ref (the image id).
    pub async fn pull(&mut self, image: &str) -> Result<String, tonic::Status> {
        self.pull_with_auth(image, None).await
    }

    pub async fn pull_with_auth(
        &mut self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, tonic::Status> {
        let resp = self
            .image
            .pull_image(cri::PullImageRequest {
                image: Some(spec(image)),
                auth,
                sandbox_config: None,
            })
            .await?;
        Ok(resp.into_inner().image_ref)
    }

    /// ListImages, optionally filtered by an image name.
    pub async fn list_images(
        &mut self,
        filter: Option<&str>,
    ) -> Result<Vec<cri::Image>, tonic::Status> {
        let resp = self
            .image
            .list_images(cri::ListImagesRequest {
                filter: filter.map(|f| cri::ImageFilter {
                    image: Some(spec(f)),
                }),
            })
            .await?;
        Ok(resp.into_inner().images)
    }

    /// ImageStatus; `Ok(None)` when the image is absent (CRI's empty response).
    pub async fn image_status(
        &mut self,
        image: &str,
        verbose: bool,
    ) -> Result<
        (
            Option<cri::Image>,
            std::collections::HashMap<String, String>,
        ),
        tonic::Status,
    > {
        let resp = self
            .image
            .image_status(cri::ImageStatusRequest {
                image: Some(spec(image)),
                verbose,
            })
            .await?
            .into_inner();
        Ok((resp.image, resp.info))
    }

    /// The runtime condition of `type` (RuntimeReady, NetworkReady) from Status.
    pub async fn condition(&mut self, r#type: &str) -> anyhow::Result<cri::RuntimeCondition> {
        self.runtime
            .status(cri::StatusRequest { verbose: false })
            .await?
            .into_inner()
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.r#type == r#type))
            .with_context(|| format!("Status has no {type} condition"))
    }

    pub async fn remove_image(&mut self, image: &str) -> Result<(), tonic::Status> {
        self.image
            .remove_image(cri::RemoveImageRequest {
                image: Some(spec(image)),
            })
            .await?;
        Ok(())
    }
}

/// An ImageSpec naming `image`.
pub fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}
