//! A tower layer that makes an acknowledged state change durable: after a CRI call
//! that changes pod or container records returns, it awaits
//! [`StateStore::flush`] before the reply leaves, so the kubelet is never told
//! "done" about a change a crash could still lose. Reads pass straight through and
//! never wait for the disk.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::store::StateStore;

/// The RuntimeService calls that change records in the state store.
const MUTATING: &[&str] = &[
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "UpdateContainerResources",
    "UpdatePodSandboxResources",
];

/// Whether a call to the gRPC `path` must be durable before it is answered.
fn mutates(path: &str) -> bool {
    path.strip_prefix("/runtime.v1.RuntimeService/")
        .is_some_and(|method| MUTATING.contains(&method))
}

#[derive(Clone)]
pub struct DurableLayer {
    store: StateStore,
}

impl DurableLayer {
    pub fn new(store: StateStore) -> Self {
        DurableLayer { store }
    }
}

impl<S> Layer<S> for DurableLayer {
    type Service = Durable<S>;
    fn layer(&self, inner: S) -> Durable<S> {
        Durable {
            inner,
            store: self.store.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Durable<S> {
    inner: S,
    store: StateStore,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Durable<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let store = mutates(req.uri().path()).then(|| self.store.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let Some(store) = store else {
                return Ok(resp);
            };
            // Also after a failed call: it may have recorded part of its work
            // (an unwind that removed a record) before failing.
            match store.flush().await {
                Ok(()) => Ok(resp),
                Err(e) => {
                    tracing::error!(error = %e, "cannot make the call's state change durable");
                    Ok(crate::status::store_status(e).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_state_changing_runtime_calls_wait_for_the_disk() {
        assert!(mutates("/runtime.v1.RuntimeService/RunPodSandbox"));
        assert!(mutates("/runtime.v1.RuntimeService/RemoveContainer"));
        assert!(!mutates("/runtime.v1.RuntimeService/ListContainers"));
        assert!(!mutates("/runtime.v1.RuntimeService/ListPodSandbox"));
        assert!(!mutates("/runtime.v1.RuntimeService/ContainerStatus"));
        assert!(!mutates("/runtime.v1.ImageService/PullImage"));
        assert!(!mutates("/runtime.v1.ImageService/RunPodSandbox"));
    }
}
