//! A stream's outgoing responses, between its task and the gRPC body.
//!
//! Every response carries the full state of its type, so a response that has
//! not left yet is worthless once a newer one for the same type exists: it is
//! replaced in place. A client that reads slowly therefore gets the newest
//! snapshot next, never a backlog of stale full sets, and the queue holds at
//! most one response per type. Responses for distinct types wait for room, so a
//! client that never reads holds only its own task.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
use tokio_stream::Stream;
use tonic::Status;

use super::response::DiscoveryResponse;

/// The sending half, owned by the stream's task.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving half: the body of the gRPC response.
#[derive(Debug)]
pub struct Outgoing {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when the reader took a response or went away.
    room: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<DiscoveryResponse>,
    reader: Option<Waker>,
    reader_gone: bool,
    writer_gone: bool,
    /// Ends the stream with this error once the queue is drained, instead of OK.
    final_status: Option<Status>,
}

/// What became of a queued response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Added at the end.
    Added,
    /// Took the place of an unsent response of the same type.
    Replaced,
}

/// The reader went away (the client disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A queue holding at most `capacity` responses of distinct types.
pub fn channel(capacity: usize) -> (Outbox, Outgoing) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        room: Notify::new(),
        capacity: capacity.max(1),
    });
    (Outbox { shared: shared.clone() }, Outgoing { shared })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Outbox {
    /// Queues `response`, replacing an unsent one of the same type; waits while
    /// the queue is full of other types.
    pub async fn send(&self, response: DiscoveryResponse) -> Result<Queued, Closed> {
        let mut response = Some(response);
        loop {
            let room = self.shared.room.notified();
            if let Some(queued) = self.try_send(&mut response)? {
                return Ok(queued);
            }
            room.await;
        }
    }

    /// Queues the response unless the queue is full; `None` leaves it in `response`.
    fn try_send(&self, response: &mut Option<DiscoveryResponse>) -> Result<Option<Queued>, Closed> {
        let mut state = self.shared.lock();
        if state.reader_gone {
            return Err(Closed);
        }
        let Some(next) = response.take() else { return Ok(None) };
        let queued = match state.queue.iter().position(|r| r.type_url == next.type_url) {
            Some(stale) => {
                state.queue[stale] = next;
                Queued::Replaced
            }
            None if state.queue.len() < self.shared.capacity => {
                state.queue.push_back(next);
                Queued::Added
            }
            None => {
                *response = Some(next);
                return Ok(None);
            }
        };
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
        Ok(Some(queued))
    }
}

impl Outbox {
    /// Ends the stream with `status` (after what is queued) rather than with OK.
    pub fn close_with(self, status: Status) {
        let mut state = self.shared.lock();
        state.final_status = Some(status);
        drop(state);
        // Drop marks the writer gone and wakes the reader.
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.writer_gone = true;
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }
}

impl Stream for Outgoing {
    type Item = Result<DiscoveryResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.shared.lock();
        if let Some(response) = state.queue.pop_front() {
            drop(state);
            self.shared.room.notify_one();
            return Poll::Ready(Some(Ok(response)));
        }
        if state.writer_gone {
            return Poll::Ready(state.final_status.take().map(Err));
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
        self.shared.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn response(type_url: &str, nonce: &str) -> DiscoveryResponse {
        DiscoveryResponse { type_url: type_url.into(), nonce: nonce.into(), ..Default::default() }
    }

    async fn next_nonce(out: &mut Outgoing) -> Option<String> {
        out.next().await.map(|r| r.unwrap().nonce)
    }

    #[tokio::test]
    async fn an_unsent_response_is_replaced_by_a_newer_one_of_its_type() {
        let (tx, mut rx) = channel(4);
        assert_eq!(tx.send(response("se", "1")).await, Ok(Queued::Added));
        assert_eq!(tx.send(response("vs", "2")).await, Ok(Queued::Added));
        assert_eq!(tx.send(response("se", "3")).await, Ok(Queued::Replaced));
        assert_eq!(tx.send(response("se", "4")).await, Ok(Queued::Replaced));
        drop(tx);
        assert_eq!(next_nonce(&mut rx).await.as_deref(), Some("4"), "keeps its place, newest content");
        assert_eq!(next_nonce(&mut rx).await.as_deref(), Some("2"));
        assert_eq!(next_nonce(&mut rx).await, None, "ends once the writer is gone and the queue is empty");
    }

    #[tokio::test]
    async fn a_stream_closed_with_an_error_ends_with_it_after_what_is_queued() {
        let (tx, mut rx) = channel(4);
        tx.send(response("se", "1")).await.unwrap();
        tx.close_with(Status::resource_exhausted("limit"));
        assert_eq!(next_nonce(&mut rx).await.as_deref(), Some("1"));
        let end = rx.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::ResourceExhausted);
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn distinct_types_wait_for_room() {
        let (tx, mut rx) = channel(2);
        tx.send(response("a", "1")).await.unwrap();
        tx.send(response("b", "2")).await.unwrap();
        let blocked = tx.send(response("c", "3"));
        tokio::pin!(blocked);
        assert!(futures_poll_once(blocked.as_mut()).await.is_none(), "full: the third type waits");
        // A replacement never waits.
        assert_eq!(tx.send(response("a", "4")).await, Ok(Queued::Replaced));
        assert_eq!(next_nonce(&mut rx).await.as_deref(), Some("4"));
        assert_eq!(blocked.await, Ok(Queued::Added));
        assert_eq!(next_nonce(&mut rx).await.as_deref(), Some("2"));
        assert_eq!(next_nonce(&mut rx).await.as_deref(), Some("3"));
    }

    #[tokio::test]
    async fn a_gone_reader_fails_sends_and_wakes_a_waiting_writer() {
        let (tx, rx) = channel(1);
        tx.send(response("a", "1")).await.unwrap();
        let blocked = tx.send(response("b", "2"));
        tokio::pin!(blocked);
        assert!(futures_poll_once(blocked.as_mut()).await.is_none());
        drop(rx);
        assert_eq!(blocked.await, Err(Closed));
        assert_eq!(tx.send(response("a", "3")).await, Err(Closed));
    }

    /// Polls a future once: `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match Pin::new(&mut f).poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}
