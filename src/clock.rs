//! Time behind a narrow trait, so the simulator drives the same code on a virtual clock
//! (style guide §2). Only [`SystemClock`] reads the operating system's time.

use std::fmt;
use std::ops::{Add, Sub};

use std::time::Duration;

use async_trait::async_trait;

/// A point in time: the distance from the clock's epoch (the UNIX epoch for [`SystemClock`], the start
/// of the scenario for the simulator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub Duration);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(Duration::ZERO);

    pub fn from_millis(ms: u64) -> Self {
        Timestamp(Duration::from_millis(ms))
    }

    pub fn as_millis(self) -> u64 {
        self.0.as_millis() as u64
    }

    /// Time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0 + d)
    }
}

impl Sub<Timestamp> for Timestamp {
    type Output = Duration;
    fn sub(self, rhs: Timestamp) -> Duration {
        self.since(rhs)
    }
}

impl fmt::Display for Timestamp {
    /// Seconds with millisecond precision, e.g. `90.500s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0.as_secs(), self.0.subsec_millis())
    }
}

/// The source of time. Implementations must be cheap to call and thread-safe.
///
/// Contract: `now()` never goes backwards; `sleep(d)` returns once `now()` has advanced by at least `d`.
/// A virtual clock may complete `sleep` at once by advancing itself.
#[async_trait]
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
    async fn sleep(&self, d: Duration);
}

/// Wall-clock time (UNIX epoch) and tokio timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place allowed to read the OS clock
    fn now(&self) -> Timestamp {
        Timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        )
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}

/// A virtual clock: `sleep` advances it instantly. For unit tests and benches that need no runtime
/// (the simulator and the test harness use [`TokioClock`]).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct ManualClock {
    now: std::sync::Mutex<Timestamp>,
}

#[cfg(any(test, feature = "testing"))]
impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: std::sync::Mutex::new(start),
        }
    }

    /// Moves the clock forward to `t` (never backwards).
    pub fn set(&self, t: Timestamp) {
        let mut now = self.now.lock().expect("clock lock");
        if t > *now {
            *now = t;
        }
    }

    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        *now = *now + d;
    }
}

#[cfg(any(test, feature = "testing"))]
#[async_trait]
impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().expect("clock lock")
    }

    async fn sleep(&self, d: Duration) {
        self.advance(d)
    }
}

/// Proof that the code holding it runs on tokio's paused clock: only [`paused_runtime`] makes one.
/// [`Driver::advance_to`](crate::driver::Driver::advance_to) moves that clock by hand (tokio
/// refuses to on a running clock), so it asks for one: a caller on a real clock does not compile.
#[derive(Clone, Copy, Debug)]
pub struct PausedClock {
    _made_by_paused_runtime: (),
}

/// A current-thread runtime whose clock starts paused (the simulator, the test harness), and the
/// [`PausedClock`] that says so.
pub fn paused_runtime() -> std::io::Result<(tokio::runtime::Runtime, PausedClock)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    Ok((
        rt,
        PausedClock {
            _made_by_paused_runtime: (),
        },
    ))
}

/// Time from tokio's clock, starting at `base`. Under a runtime started with paused time
/// (`start_paused(true)`) this is a virtual clock that tokio advances to the next timer whenever
/// every task waits: the simulator uses it so concurrent processings, backoffs and timeouts
/// interleave in time order exactly as in a real server.
#[derive(Debug)]
pub struct TokioClock {
    epoch: tokio::time::Instant,
    base: Timestamp,
}

impl TokioClock {
    /// Must be called inside a tokio runtime with the time driver enabled.
    pub fn new(base: Timestamp) -> Self {
        TokioClock {
            epoch: tokio::time::Instant::now(),
            base,
        }
    }

    /// The tokio instant at which this clock reads `t` (the epoch if `t` is before the base).
    pub fn instant_at(&self, t: Timestamp) -> tokio::time::Instant {
        self.epoch + t.since(self.base)
    }
}

#[async_trait]
impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base + self.epoch.elapsed()
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}
