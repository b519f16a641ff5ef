//! Passive health (outlier ejection): the decision as a pure function, applied to an
//! endpoint's counters by the caller.

use std::time::Duration;

use weir_policies::model::OutlierDetection;

/// Longest ejection, however often an endpoint was ejected before.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What to do after a result from an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving; the counter of consecutive failures becomes this.
    Keep { consecutive_failures: u32 },
    /// Eject for this long; reset the counter.
    Eject(Duration),
}

/// Decides after one response (`failed`: a 5xx, or no response at all).
/// `ejected_now` and `cluster_size` enforce `max_ejection_percent`; `times_ejected` lengthens
/// each ejection of a repeat offender.
pub fn judge(
    cfg: &OutlierDetection,
    failed: bool,
    consecutive_failures: u32,
    times_ejected: u32,
    ejected_now: usize,
    cluster_size: usize,
) -> Verdict {
    if !failed {
        return Verdict::Keep {
            consecutive_failures: 0,
        };
    }
    let consecutive_failures = consecutive_failures.saturating_add(1);
    let allowed = (cluster_size * cfg.max_ejection_percent as usize).div_ceil(100);
    if consecutive_failures >= cfg.consecutive_5xx && ejected_now < allowed {
        let factor = times_ejected.saturating_add(1);
        Verdict::Eject(
            cfg.base_ejection_time
                .saturating_mul(factor)
                .min(MAX_EJECTION),
        )
    } else {
        Verdict::Keep {
            consecutive_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let c = cfg();
        assert_eq!(
            judge(&c, true, 0, 0, 0, 4),
            Verdict::Keep {
                consecutive_failures: 1
            }
        );
        assert_eq!(
            judge(&c, true, 1, 0, 0, 4),
            Verdict::Keep {
                consecutive_failures: 2
            }
        );
        assert_eq!(
            judge(&c, true, 2, 0, 0, 4),
            Verdict::Eject(Duration::from_secs(10))
        );
        assert_eq!(
            judge(&c, false, 2, 0, 0, 4),
            Verdict::Keep {
                consecutive_failures: 0
            }
        );
    }

    #[test]
    fn repeat_offenders_stay_out_longer_up_to_a_cap() {
        let c = cfg();
        assert_eq!(
            judge(&c, true, 2, 2, 0, 4),
            Verdict::Eject(Duration::from_secs(30))
        );
        assert_eq!(judge(&c, true, 2, 100, 0, 4), Verdict::Eject(MAX_EJECTION));
    }

    #[test]
    fn max_ejection_percent_keeps_capacity() {
        let c = cfg();
        // 50% of 4 is 2: a third ejection is refused.
        assert_eq!(
            judge(&c, true, 2, 0, 1, 4),
            Verdict::Eject(Duration::from_secs(10))
        );
        assert_eq!(
            judge(&c, true, 2, 0, 2, 4),
            Verdict::Keep {
                consecutive_failures: 3
            }
        );
        // A single endpoint at 50% can still be ejected (rounded up).
        assert_eq!(
            judge(&c, true, 2, 0, 0, 1),
            Verdict::Eject(Duration::from_secs(10))
        );
    }
}
