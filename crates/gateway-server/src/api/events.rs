//! A cluster's events: `GET /api/v1/clusters/{name}/events` as one JSON answer or, with
//! `?follow`, as a stream of server-sent events that reads the backend until the cluster ends.

use super::http::follow_flag;
use super::{ApiError, ApiResult, AppState};
use crate::auth::User;
use crate::clusters::ClusterService;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use std::sync::Arc;

/// `GET /api/v1/clusters/{name}/events`: the cluster's events as JSON, or with `?follow` as a
/// stream of server-sent events (`event: cluster-event`, one JSON event per `data:` line) that
/// starts with the history and ends once the cluster has finished and every event was sent.
pub(super) async fn cluster_events(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let events = state.clusters.events(&user, &name).await?;
    if !follow_flag(req.uri().query()) {
        return Ok(Json(gateway_model::ClusterEvents { events }).into_response());
    }
    let Some(slot) = FollowerSlot::take(&state.event_followers, &user.name) else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{MAX_FOLLOWERS_PER_USER} event streams are open for {}; close one first",
                user.name
            ),
        ));
    };
    let follow = EventFollower {
        _slot: slot,
        clusters: state.clusters.clone(),
        user,
        name,
        queue: events.into(),
        last: None,
        finished: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        let sse = axum::response::sse::Event::default()
            .event("cluster-event")
            .json_data(&event)
            .ok()?;
        Some((Ok::<_, std::convert::Infallible>(sse), f))
    });
    let mut response = axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response();
    // Proxies in front must pass events on as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// How often a followed cluster's events are read again.
const EVENT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// `?follow` streams one user may have open at once (each costs a backend read a second).
const MAX_FOLLOWERS_PER_USER: usize = 8;

/// One of a user's open `?follow` streams; given back when the stream ends or the client goes.
struct FollowerSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    user: String,
}

impl FollowerSlot {
    /// A slot for `user`, unless they have [`MAX_FOLLOWERS_PER_USER`] already.
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        user: &str,
    ) -> Option<FollowerSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user.to_string()).or_default();
        if *n >= MAX_FOLLOWERS_PER_USER {
            return None;
        }
        *n += 1;
        Some(FollowerSlot {
            counts: counts.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// The state of one `?follow` stream: events read but not yet sent, and the last one sent.
struct EventFollower {
    _slot: FollowerSlot,
    clusters: Arc<ClusterService>,
    user: User,
    name: String,
    queue: std::collections::VecDeque<gateway_model::ClusterEvent>,
    last: Option<gateway_model::ClusterEvent>,
    finished: bool,
}

impl EventFollower {
    /// The next event to send; `None` ends the stream (the cluster finished and everything was
    /// sent, or it is gone or no longer this user's to see).
    async fn next(&mut self) -> Option<gateway_model::ClusterEvent> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                self.last = Some(event.clone());
                return Some(event);
            }
            if self.finished {
                return None;
            }
            tokio::time::sleep(EVENT_POLL).await;
            // Whether it has finished is read before its events: events a backend writes
            // before a cluster's status turns final are then in this read.
            self.finished = self.clusters.has_finished(&self.name).await;
            let events = self.clusters.events(&self.user, &self.name).await.ok()?;
            self.queue.extend(events_after(events, self.last.as_ref()));
        }
    }
}

/// The events that came after `last` (all of them if `last` is not among them any more).
fn events_after(
    events: Vec<gateway_model::ClusterEvent>,
    last: Option<&gateway_model::ClusterEvent>,
) -> Vec<gateway_model::ClusterEvent> {
    let Some(last) = last else { return events };
    match events.iter().rposition(|e| e == last) {
        Some(i) => events[i + 1..].to_vec(),
        None => events.into_iter().filter(|e| e.time >= last.time).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_has_a_bounded_number_of_event_streams() {
        let counts = Arc::default();
        let slots: Vec<_> = (0..MAX_FOLLOWERS_PER_USER)
            .map(|_| FollowerSlot::take(&counts, "alice").unwrap())
            .collect();
        assert!(FollowerSlot::take(&counts, "alice").is_none());
        assert!(FollowerSlot::take(&counts, "bob").is_some(), "per user");
        drop(slots);
        assert!(FollowerSlot::take(&counts, "alice").is_some());
        assert!(
            counts.lock().unwrap().is_empty(),
            "closed streams leave nothing"
        );
    }

    #[test]
    fn a_follower_sends_what_came_after_the_last_event_it_sent() {
        use gateway_model::{ClusterEvent, EventType};
        let e = |t: i64, r: &str| ClusterEvent::new(t, EventType::Normal, r, "", "gateway");
        let all = vec![
            e(1, "Created"),
            e(2, "Running"),
            e(2, "ScaleRequested"),
            e(3, "Stopped"),
        ];
        assert_eq!(events_after(all.clone(), None), all);
        assert_eq!(events_after(all.clone(), Some(&all[1])), all[2..].to_vec());
        assert!(events_after(all.clone(), Some(&all[3])).is_empty());
        // The last one sent was dropped from a bounded history: everything not older.
        assert_eq!(
            events_after(all[2..].to_vec(), Some(&e(2, "Running"))),
            all[2..].to_vec()
        );
        assert!(follow_flag(Some("follow")));
        assert!(follow_flag(Some("follow=1")));
        assert!(follow_flag(Some("x=2&follow=true")));
        assert!(!follow_flag(Some("follow=0")));
        assert!(!follow_flag(None));
    }
}
