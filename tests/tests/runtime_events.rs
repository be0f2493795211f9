//! GetContainerEvents end to end: a pod and container lifecycle arrives in order
//! with statuses attached, and a subscriber that never reads neither delays other
//! calls nor stays connected once it has fallen behind.

mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use tokio::sync::mpsc;
use vessel_tests::cri::CriClient;

use cri::ContainerEventType as T;

/// Failed RunPodSandbox calls in the burst: 2 events each, more than the 1024 a
/// subscriber may fall behind plus what the HTTP/2 buffers hold.
const BURST: usize = 700;

async fn subscribe(c: &mut CriClient) -> tonic::Streaming<cri::ContainerEventResponse> {
    c.runtime
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner()
}

/// A subscriber on its own connection with small HTTP/2 windows, so that what it
/// does not read backs up into vesseld quickly.
async fn stalled_subscriber(
    socket: &std::path::Path,
) -> tonic::Streaming<cri::ContainerEventResponse> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:0")
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect");
    cri::runtime_service_client::RuntimeServiceClient::new(channel)
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner()
}

/// Forwards every event of `stream` until it ends.
fn forward(mut stream: tonic::Streaming<cri::ContainerEventResponse>) -> Events {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    if tx.send(Ok(ev)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

type Events = mpsc::UnboundedReceiver<Result<cri::ContainerEventResponse, tonic::Status>>;

async fn next_any(rx: &mut Events) -> cri::ContainerEventResponse {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an event within 30 s")
        .expect("stream open")
        .expect("no stream error")
}

/// The next event about `ids`, skipping others.
async fn next_about(rx: &mut Events, ids: &[&str]) -> cri::ContainerEventResponse {
    loop {
        let ev = next_any(rx).await;
        if ids.contains(&ev.container_id.as_str()) {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_in_order_and_a_stalled_client_delays_nothing() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    // Each on its own connection: one reads, one never does.
    let mut reader = d.client().await.unwrap();
    let mut events = forward(subscribe(&mut reader).await);
    let mut stalled = stalled_subscriber(d.socket()).await;

    let pod_cfg = pod_config("events", &d.dir().join("logs/events"));
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let ctr = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("ev", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: ctr.clone(),
            timeout: 10,
        })
        .await
        .expect("StopContainer");
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .expect("RemoveContainer");
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
    remove_pod(&mut c, &pod).await;

    let want = [
        (&pod, T::ContainerCreatedEvent),
        (&pod, T::ContainerStartedEvent),
        (&ctr, T::ContainerCreatedEvent),
        (&ctr, T::ContainerStartedEvent),
        (&ctr, T::ContainerStoppedEvent),
        (&ctr, T::ContainerDeletedEvent),
        (&pod, T::ContainerStoppedEvent),
        (&pod, T::ContainerDeletedEvent),
    ];
    for (id, kind) in want {
        let ev = next_about(&mut events, &[&pod, &ctr]).await;
        assert_eq!(
            (&ev.container_id, ev.container_event_type),
            (id, kind as i32),
            "{ev:?}"
        );
        let ps = ev.pod_sandbox_status.as_ref().expect("pod status attached");
        assert_eq!(ps.id, pod);
        if id == &ctr && kind == T::ContainerStartedEvent {
            assert_eq!(ev.containers_statuses.len(), 1);
            assert_eq!(
                ev.containers_statuses[0].state,
                cri::ContainerState::ContainerRunning as i32
            );
        }
        if id == &pod && kind == T::ContainerStartedEvent {
            assert_eq!(ps.state, cri::PodSandboxState::SandboxReady as i32);
        }
    }

    // A burst of events (each failed RunPodSandbox is a CREATED and a DELETED,
    // each event ~16 KiB with the pod's annotation) past what the stalled client's
    // connection and its queue in vesseld can hold: calls stay fast, the reader
    // keeps up, the staller is cut off.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let bulk = "x".repeat(16 * 1024);
    for i in 0..BURST {
        let t = Instant::now();
        let mut cfg = pod_config(&format!("burst-{i}"), &d.dir().join("logs/burst"));
        cfg.annotations.insert("bulk".into(), bulk.clone());
        run_pod(&mut c, &cfg, "broken").await.unwrap_err();
        slowest = slowest.max(t.elapsed());
    }
    eprintln!(
        "{BURST} failing RunPodSandbox with a stalled events client: {:?}, slowest {slowest:?}",
        started.elapsed()
    );
    assert!(slowest < Duration::from_secs(5), "a call took {slowest:?}");
    // The reader got them all, in pairs.
    for _ in 0..BURST {
        let created = next_any(&mut events).await;
        let deleted = next_any(&mut events).await;
        assert_eq!(created.container_id, deleted.container_id);
        assert_eq!(
            (created.container_event_type, deleted.container_event_type),
            (
                T::ContainerCreatedEvent as i32,
                T::ContainerDeletedEvent as i32
            )
        );
    }

    let cut_off = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stalled.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stalled stream ended without an error"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the stalled client is disconnected");
    assert_eq!(
        cut_off.code(),
        tonic::Code::ResourceExhausted,
        "{cut_off:?}"
    );
    assert!(cut_off.message().contains("behind"), "{cut_off:?}");

    drop(events);
    assert_no_leaks(&d);
}
