//! Wall-clock time as the pipeline records it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time, epoch milliseconds (0 on a clock set before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_reads_after_2020_and_moves_forward() {
        let a = super::now_ms();
        let b = super::now_ms();
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(b >= a);
    }
}
