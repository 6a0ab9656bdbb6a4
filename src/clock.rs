//! Time as walq reads it: the system clock, or a [`ManualClock`] that tests
//! move by hand. Record timestamps, ack deadlines, nack delays and retention
//! by age all read the queue's clock, so every time-driven behaviour can be
//! tested in milliseconds. Waits with a timeout (`poll`, `fetch`) still
//! measure their timeout in real time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A clock that moves only when told to, for tests of time-driven behaviour
/// (ack wait, nack delay, retention by age). Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// let clock = walq::ManualClock::new(1_700_000_000_000);
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::builder(dir.path()).clock(&clock).open()?;
/// let offset = queue.append(b"x")?;
/// clock.advance(Duration::from_secs(60));
/// let mut reader = queue.read_from(offset)?;
/// assert_eq!(reader.next()?.unwrap().timestamp_ms(), 1_700_000_000_000);
/// assert_eq!(clock.now_ms(), 1_700_000_060_000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `unix_ms` milliseconds since the Unix epoch.
    pub fn new(unix_ms: u64) -> ManualClock {
        ManualClock { ms: Arc::new(AtomicU64::new(unix_ms)) }
    }

    /// The time, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.ms.fetch_add(by.as_millis().min(u64::MAX as u128) as u64, Ordering::SeqCst);
    }

    /// Sets the clock (it may also move backwards, as real clocks sometimes do).
    pub fn set_ms(&self, unix_ms: u64) {
        self.ms.store(unix_ms, Ordering::SeqCst);
    }
}

/// The clock a queue reads.
#[derive(Debug, Clone, Default)]
pub(crate) enum Clock {
    #[default]
    System,
    Manual(ManualClock),
}

impl Clock {
    /// Milliseconds since the Unix epoch (0 if the system clock is before it).
    pub(crate) fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            Clock::Manual(m) => m.now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::Manual(ManualClock::new(5));
        assert_eq!(c.now_ms(), 5);
        if let Clock::Manual(m) = &c {
            m.advance(Duration::from_millis(10));
            assert_eq!(c.now_ms(), 15);
            m.set_ms(3);
        }
        assert_eq!(c.now_ms(), 3);
        assert!(Clock::System.now_ms() > 1_600_000_000_000);
    }
}
