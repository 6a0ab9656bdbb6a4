//! Awaiting durability without blocking a thread (feature `async`): the
//! records are in the pending batch when `append_async` returns; the future
//! completes when the background flusher's sync covers them. No runtime is
//! assumed: the flusher wakes the task's `Waker`.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::Result;
use crate::flush::Waiter;

/// The future of [`Queue::append_async`](crate::Queue::append_async) and
/// [`Queue::append_batch_async`](crate::Queue::append_batch_async): resolves
/// to the records' offsets once they are as durable as asked.
///
/// The records were handed over when the call returned, so dropping the
/// future does not withdraw them; it only stops waiting.
#[derive(Debug)]
#[must_use = "the records are appended, but not known to be durable until the future completes"]
pub struct AppendFuture {
    range: Range<u64>,
    state: State,
}

#[derive(Debug)]
enum State {
    Ready(Option<Result<()>>),
    Waiting(Arc<Waiter>),
}

impl AppendFuture {
    pub(crate) fn ready(result: Result<Range<u64>>) -> AppendFuture {
        match result {
            Ok(range) => AppendFuture { range, state: State::Ready(Some(Ok(()))) },
            Err(e) => AppendFuture { range: 0..0, state: State::Ready(Some(Err(e))) },
        }
    }

    pub(crate) fn waiting(range: Range<u64>, waiter: Arc<Waiter>) -> AppendFuture {
        AppendFuture { range, state: State::Waiting(waiter) }
    }
}

impl Future for AppendFuture {
    type Output = Result<Range<u64>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let outcome = match &mut this.state {
            State::Ready(r) => r.take().unwrap_or(Err(crate::Error::Poisoned)),
            State::Waiting(w) => match w.poll(cx.waker()) {
                Some(r) => r,
                None => return Poll::Pending,
            },
        };
        this.state = State::Ready(None);
        Poll::Ready(outcome.map(|()| this.range.clone()))
    }
}

/// The future of [`Queue::wait_visible_async`](crate::Queue::wait_visible_async):
/// resolves (to the visible watermark) once a record at `offset` is visible to
/// readers, woken by the append that publishes it; no thread waits.
#[derive(Debug)]
#[must_use = "a future does nothing unless awaited"]
pub struct VisibleFuture {
    log: Arc<crate::log::Log>,
    offset: u64,
}

impl VisibleFuture {
    pub(crate) fn new(log: Arc<crate::log::Log>, offset: u64) -> VisibleFuture {
        VisibleFuture { log, offset }
    }
}

impl Future for VisibleFuture {
    type Output = u64;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let (log, offset) = (&self.log, self.offset);
        let visible = log.visible();
        if visible > offset {
            return Poll::Ready(visible);
        }
        // Registered before the re-check, so an append in between still wakes us.
        if log.tail.register(cx.waker(), || log.visible() > offset) {
            return Poll::Ready(log.visible());
        }
        Poll::Pending
    }
}
