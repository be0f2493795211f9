//! A tower layer that logs every CRI call with its method and latency.
//!
//! It sits under tonic, so it also sees calls to RPCs that return Unimplemented.
//! The gRPC status is read from the response headers, where tonic puts it for
//! error responses ("trailers-only"); successful unary calls carry it in the
//! trailers, so a missing header means the call succeeded.
//!
//! Every call is logged at debug. A failure is also logged at warn (error for
//! Internal, Unknown and DataLoss) with its message, which names the object;
//! NotFound and Unimplemented stay at debug: the kubelet asks for gone objects and
//! polls unimplemented stats routinely.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

#[derive(Clone, Copy, Debug, Default)]
pub struct CallLogLayer;

impl<S> Layer<S> for CallLogLayer {
    type Service = CallLog<S>;
    fn layer(&self, inner: S) -> CallLog<S> {
        CallLog { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CallLog<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // "/runtime.v1.ImageService/PullImage" -> "ImageService/PullImage"
        let method = req
            .uri()
            .path()
            .trim_start_matches("/runtime.v1.")
            .to_owned();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
            match &result {
                Ok(resp) => {
                    let code = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32)
                        .unwrap_or(tonic::Code::Ok);
                    log_call(&method, latency_ms, code, resp.headers());
                    crate::metrics::get().cri_call(&method, code, start.elapsed());
                }
                Err(e) => {
                    tracing::warn!(method = %method, latency_ms, error = %e, "CRI call failed in transport")
                }
            }
            result
        })
    }
}

fn log_call(method: &str, latency_ms: f64, code: tonic::Code, headers: &http::HeaderMap) {
    use tonic::Code;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    match code {
        Code::Ok | Code::NotFound | Code::Unimplemented => {
            tracing::debug!(method = %method, latency_ms, code = ?code, %message, "CRI call")
        }
        Code::Internal | Code::Unknown | Code::DataLoss => {
            tracing::error!(method = %method, latency_ms, code = ?code, %message, "CRI call failed")
        }
        _ => {
            tracing::warn!(method = %method, latency_ms, code = ?code, %message, "CRI call failed")
        }
    }
}
