//! A small supervisor: runs a loop, and when it returns an error, panics or ends,
//! starts it again after a backoff (doubling up to a cap, reset after a run that
//! lasted), counting restarts. Errors that make a loop's state untrustworthy are
//! returned by the loop and so lead to a fresh start from the source of truth
//! (seed-review item 15), never a silent "log and continue".

use std::{
    fmt::Display,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Restart counts per supervised loop.
#[derive(Debug, Default)]
pub struct Restarts {
    counts: dashmap::DashMap<&'static str, Arc<AtomicU64>>,
}

impl Restarts {
    /// Restarts of `name` so far.
    pub fn get(&self, name: &str) -> u64 {
        self.counts
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn counter(&self, name: &'static str) -> Arc<AtomicU64> {
        self.counts.entry(name).or_default().clone()
    }
}

/// Backoff between restarts.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// Run `make()` forever in a task, restarting it as described above. Restarts are
/// also counted in `fsb_supervisor_restarts_total{loop=name}`.
pub fn supervise<F, Fut, E>(
    name: &'static str,
    restarts: &Restarts,
    backoff: Backoff,
    make: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let counter = restarts.counter(name);
    tokio::spawn(async move {
        let mut delay = backoff.min;
        loop {
            let started = Instant::now();
            // Its own task, so a panic is caught as a JoinError, not the supervisor's end.
            match tokio::spawn(make()).await {
                Ok(Ok(())) => tracing::warn!(task = name, "loop ended; restarting"),
                Ok(Err(e)) => tracing::warn!(task = name, error = %e, "loop failed; restarting"),
                Err(e) => tracing::error!(task = name, error = %e, "loop panicked; restarting"),
            }
            counter.fetch_add(1, Ordering::Relaxed);
            fsb_telemetry::metrics().supervisor_restarts.inc(name);
            if started.elapsed() > backoff.max {
                delay = backoff.min;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(backoff.max);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failing_loop_is_restarted_with_backoff_and_counted() {
        let restarts = Restarts::default();
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let task = supervise(
            "flaky",
            &restarts,
            Backoff {
                min: Duration::from_millis(5),
                max: Duration::from_millis(20),
            },
            move || {
                let r = r.clone();
                async move {
                    let n = r.fetch_add(1, Ordering::Relaxed);
                    if n == 1 {
                        panic!("second run panics");
                    }
                    if n < 4 {
                        return Err("boom");
                    }
                    std::future::pending::<()>().await;
                    Ok(())
                }
            },
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::Relaxed) < 5 {
            assert!(Instant::now() < deadline, "the loop was not restarted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            restarts.get("flaky"),
            4,
            "four ends (one a panic), four restarts"
        );
        assert_eq!(restarts.get("other"), 0);
        assert_eq!(
            fsb_telemetry::metrics().supervisor_restarts.get("flaky"),
            4,
            "exported as fsb_supervisor_restarts_total{{loop=\"flaky\"}}"
        );
        task.abort();
    }
}
