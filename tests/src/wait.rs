//! Polling with a deadline: how tests wait for something to become true without
//! sleeping a fixed time.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;

const FIRST_INTERVAL: Duration = Duration::from_millis(2);
const MAX_INTERVAL: Duration = Duration::from_millis(100);

/// Calls `probe` until it returns `Ok(Some(value))`, then returns the value.
///
/// `Ok(None)` means "not yet"; an `Err` is also retried (a service may not answer
/// yet) and is reported if the deadline passes. The interval starts at 2 ms and
/// doubles up to 100 ms. `what` names the condition in the timeout error.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = FIRST_INTERVAL;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(match last_error {
                Some(err) => err.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(MAX_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn returns_the_value_once_the_probe_succeeds() {
        let calls = AtomicU32::new(0);
        let got = wait_until("third call", Duration::from_secs(1), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 2 {
                anyhow::bail!("transient")
            }
            Ok((n >= 3).then_some(n))
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_the_condition_and_last_error() {
        let err = wait_until::<(), _, _>("the impossible", Duration::from_millis(50), || async {
            anyhow::bail!("still broken")
        })
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("waiting for the impossible"), "{msg}");
        assert!(msg.contains("still broken"), "{msg}");
    }
}
