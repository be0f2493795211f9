//! GetContainerEvents: the store's committed state changes as CRI container events.
//!
//! The store calls [`EventBus::publish_change`] with each change in commit order;
//! events go into a `tokio::sync::broadcast` ring, which never blocks the publisher.
//! A subscriber that falls more than [`CAPACITY`] events behind loses its place and
//! its stream ends with an error: the kubelet then relists, as evented PLEG does on
//! any stream error. Pod sandbox events carry the sandbox id as `container_id`, as
//! containerd's do.

use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::clock::now_ns;
use crate::store::{Change, ContainerRecord, ContainerState, PodRecord, PodState};
use crate::views;

/// Events a subscriber may fall behind by before it is disconnected.
pub const CAPACITY: usize = 1024;

type Event = Arc<cri::ContainerEventResponse>;

#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
}

pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

/// The event types a change means, in order ("" id = the pod's own).
fn classify(change: Change<'_>) -> Vec<(cri::ContainerEventType, String)> {
    use cri::ContainerEventType as T;
    match change {
        Change::Pod { old, new } => {
            let id = new.or(old).map(|p| p.id.clone()).unwrap_or_default();
            let state = |p: Option<&PodRecord>| p.map(|p| p.state);
            let mut v = Vec::new();
            match (state(old), state(new)) {
                (None, Some(s)) => {
                    v.push(T::ContainerCreatedEvent);
                    if s == PodState::Ready {
                        v.push(T::ContainerStartedEvent);
                    }
                }
                (Some(PodState::NotReady), Some(PodState::Ready)) => {
                    v.push(T::ContainerStartedEvent)
                }
                (Some(PodState::Ready), Some(PodState::NotReady)) => {
                    v.push(T::ContainerStoppedEvent)
                }
                (Some(_), None) => v.push(T::ContainerDeletedEvent),
                _ => {}
            }
            v.into_iter().map(|t| (t, id.clone())).collect()
        }
        Change::Container { old, new } => {
            let id = new.or(old).map(|c| c.id.clone()).unwrap_or_default();
            let state = |c: Option<&ContainerRecord>| c.map(|c| c.state);
            let t = match (state(old), state(new)) {
                (None, Some(_)) => Some(T::ContainerCreatedEvent),
                (Some(a), Some(ContainerState::Running)) if a != ContainerState::Running => {
                    Some(T::ContainerStartedEvent)
                }
                (Some(a), Some(ContainerState::Exited)) if a != ContainerState::Exited => {
                    Some(T::ContainerStoppedEvent)
                }
                (Some(_), None) => Some(T::ContainerDeletedEvent),
                _ => None,
            };
            t.into_iter().map(|t| (t, id.clone())).collect()
        }
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(CAPACITY)
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        EventBus { tx }
    }

    /// Publishes the events of one committed change. Called with the store locked:
    /// cheap when nobody subscribes, and never waits.
    pub fn publish_change(
        &self,
        change: Change<'_>,
        pod: Option<&PodRecord>,
        containers: &[&ContainerRecord],
    ) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let kinds = classify(change);
        if kinds.is_empty() {
            return;
        }
        let pod_sandbox_status = pod.map(views::pod_status);
        let containers_statuses: Vec<_> = containers
            .iter()
            .map(|c| views::container_status(c))
            .collect();
        let created_at = now_ns();
        for (kind, container_id) in kinds {
            // Send fails only when every subscriber is gone: nothing to do then.
            let _ = self.tx.send(Arc::new(cri::ContainerEventResponse {
                container_id,
                container_event_type: kind as i32,
                created_at,
                pod_sandbox_status: pod_sandbox_status.clone(),
                containers_statuses: containers_statuses.clone(),
            }));
        }
    }

    /// A stream of every event from now on. It ends with ResourceExhausted when the
    /// subscriber falls [`CAPACITY`] events behind (tonic ends a server stream at
    /// its first error).
    pub fn subscribe(&self) -> EventStream {
        let events = BroadcastStream::new(self.tx.subscribe());
        Box::pin(events.map(|ev| match ev {
            Ok(ev) => Ok((*ev).clone()),
            Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::resource_exhausted(format!(
                "the events client fell {n} events behind and was disconnected; \
                 list the pods and containers again and resubscribe"
            ))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{ctr, db, pod};
    use crate::store::StateStore;
    use cri::ContainerEventType as T;

    fn hooked(bus: &EventBus, store: &StateStore) {
        let bus = bus.clone();
        store.observe(Arc::new(move |change, pod, ctrs| {
            bus.publish_change(change, pod, ctrs)
        }));
    }

    async fn next(s: &mut EventStream) -> cri::ContainerEventResponse {
        tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
            .await
            .expect("an event")
            .expect("stream open")
            .expect("not an error")
    }

    #[tokio::test]
    async fn lifecycle_events_arrive_in_order_with_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(db(dir.path())).unwrap();
        let bus = EventBus::default();
        hooked(&bus, &store);
        let mut events = bus.subscribe();

        let mut p = pod("p1", "web", 0);
        p.state = PodState::NotReady;
        store.add_pod(p).unwrap();
        store
            .update_pod("p1", |p| p.state = PodState::Ready)
            .unwrap();
        store.add_container(ctr("c1", "p1", "app", 0)).unwrap();
        store
            .update_container("c1", |c| c.state = ContainerState::Running)
            .unwrap();
        store
            .update_container("c1", |c| c.message = "x".into())
            .unwrap();
        store
            .update_container("c1", |c| c.state = ContainerState::Exited)
            .unwrap();
        store.remove_container("c1").unwrap();
        store
            .update_pod("p1", |p| p.state = PodState::NotReady)
            .unwrap();
        store.remove_pod("p1").unwrap();

        let want = [
            ("p1", T::ContainerCreatedEvent),
            ("p1", T::ContainerStartedEvent),
            ("c1", T::ContainerCreatedEvent),
            ("c1", T::ContainerStartedEvent),
            ("c1", T::ContainerStoppedEvent),
            ("c1", T::ContainerDeletedEvent),
            ("p1", T::ContainerStoppedEvent),
            ("p1", T::ContainerDeletedEvent),
        ];
        let mut last_created = 0;
        for (id, kind) in want {
            let ev = next(&mut events).await;
            assert_eq!(
                (ev.container_id.as_str(), ev.container_event_type),
                (id, kind as i32)
            );
            assert!(ev.created_at >= last_created);
            last_created = ev.created_at;
            let status = ev.pod_sandbox_status.expect("pod status attached");
            assert_eq!(status.id, "p1");
            if id == "c1" && kind != T::ContainerDeletedEvent {
                assert_eq!(ev.containers_statuses.len(), 1);
                assert_eq!(ev.containers_statuses[0].id, "c1");
            }
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_cut_off_and_publishing_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(db(dir.path())).unwrap();
        let bus = EventBus::new(4);
        hooked(&bus, &store);
        let mut stalled = bus.subscribe();
        store.add_pod(pod("p1", "web", 0)).unwrap();
        let started = std::time::Instant::now();
        for i in 0..50 {
            store
                .add_container(ctr(&format!("c{i}"), "p1", &format!("n{i}"), 0))
                .unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let first = stalled.next().await.expect("an item");
        let err = first.expect_err("the laggard gets an error first");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // A fresh subscriber is unaffected.
        let mut fresh = bus.subscribe();
        store.remove_container("c0").unwrap();
        let ev = next(&mut fresh).await;
        assert_eq!(ev.container_event_type, T::ContainerDeletedEvent as i32);
    }

    #[test]
    fn nothing_is_built_without_subscribers() {
        let bus = EventBus::default();
        let p = pod("p1", "web", 0);
        bus.publish_change(
            Change::Pod {
                old: None,
                new: Some(&p),
            },
            Some(&p),
            &[],
        );
        assert_eq!(bus.tx.len(), 0);
    }
}
