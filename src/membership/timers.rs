//! The one ordered timer queue of the membership task.
//!
//! foca asks for timer events with a delay and must get them back in deadline order; a tokio task
//! per timer would deliver them out of order under load. This queue is pure: the driver asks for
//! the next deadline, sleeps until then, and pops what is due.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use tokio::time::Instant;

/// Timers ordered by deadline, then by submission order for equal deadlines.
pub(crate) struct TimerQueue<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
}

struct Entry<T> {
    at: Instant,
    seq: u64,
    timer: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<T> TimerQueue<T> {
    pub(crate) fn new() -> Self {
        TimerQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }

    /// Schedules `timer` to fire `after` from `now`.
    pub(crate) fn schedule(&mut self, now: Instant, after: Duration, timer: T) {
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at: now + after,
            seq: self.seq,
            timer,
        }));
    }

    /// The earliest deadline, if any timer is pending.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// Removes and returns the earliest timer whose deadline is at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_deadline()? <= now {
            self.heap.pop().map(|Reverse(e)| e.timer)
        } else {
            None
        }
    }

    /// Number of pending timers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_deadline_then_submission_order() {
        let now = Instant::now();
        let mut q = TimerQueue::new();
        q.schedule(now, Duration::from_millis(30), "c");
        q.schedule(now, Duration::from_millis(10), "a");
        q.schedule(now, Duration::from_millis(10), "b");
        q.schedule(now, Duration::from_millis(50), "d");
        assert_eq!(q.next_deadline(), Some(now + Duration::from_millis(10)));
        assert_eq!(q.pop_due(now), None);
        let later = now + Duration::from_millis(30);
        let fired: Vec<_> = std::iter::from_fn(|| q.pop_due(later)).collect();
        assert_eq!(fired, ["a", "b", "c"]);
        assert_eq!(q.len(), 1);
    }
}
