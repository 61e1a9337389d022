//! [`EventStream`]: the stream type of every event feed a [`crate::Grid`] offers.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

/// A stream of events of one kind, from [`crate::Grid::membership_events`],
/// [`crate::Grid::partition_events`] or [`crate::Map::listen`].
///
/// It holds a bounded number of recent events a slow reader has not taken (1024, or 4096 for
/// entry listeners); older ones are skipped. It ends once the member has stopped and every event
/// was taken.
pub struct EventStream<T> {
    inner: BroadcastStream<T>,
}

impl<T: Clone + Send + 'static> EventStream<T> {
    pub(crate) fn new(receiver: broadcast::Receiver<T>) -> Self {
        EventStream {
            inner: BroadcastStream::new(receiver),
        }
    }

    /// The next event, or `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<T> {
        futures::StreamExt::next(self).await
    }
}

impl<T: Clone + Send + 'static> futures::Stream for EventStream<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        loop {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => return Poll::Ready(Some(event)),
                // Lagged: the oldest events were dropped; carry on with the rest.
                Poll::Ready(Some(Err(_))) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
