//! The maintenance window (`[maintenance] window = "Sat 02:00-04:00"` in
//! the cluster spec, UTC): when the leader reboots, by itself, the nodes
//! that report needing it. Pure: the caller gives the time.
//!
//! The format: days, a space, `HH:MM-HH:MM`. Days are three-letter names
//! (`Mon` .. `Sun`), ranges (`Mon-Fri`) and lists of both (`Sat,Sun`), or
//! `daily`. An end at or before the start runs past midnight into the next
//! day (`Sat 23:00-01:00` ends Sunday 01:00). A window is at most 24 h.
//!
//! **The rule for starting** ([`MaintenanceWindow::may_start`]): the
//! leader starts a reboot rollout of one node at a time, and only when the
//! time left in the window covers the longest that node may take (the
//! drain, reboot and health step timeouts of `[rollout]`, 20 min by
//! default): no reboot the leader starts is still running past the
//! window's end, unless a step outlives its timeout (the node then fails
//! the rollout, which stays for an operator as any failed rollout does).

use std::time::Duration;

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MINUTES_A_DAY: u32 = 24 * 60;

/// A parsed window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// Days it starts on, Monday first.
    days: [bool; 7],
    /// Minutes after midnight UTC.
    start: u32,
    /// 1 ..= a day.
    length: u32,
}

fn day(name: &str) -> Option<usize> {
    DAY_NAMES.iter().position(|d| d.eq_ignore_ascii_case(name))
}

fn minutes(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl std::str::FromStr for MaintenanceWindow {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "maintenance.window {text:?}: {why} (expected days and UTC times, e.g. \
                 \"Sat 02:00-04:00\", \"Mon-Fri 01:00-03:00\", \"Sat,Sun 23:00-01:00\", \
                 \"daily 03:00-04:00\")"
            )
        };
        let (days_text, times) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("no time range"))?;
        let mut days = [false; 7];
        if days_text.eq_ignore_ascii_case("daily") {
            days = [true; 7];
        } else {
            for part in days_text.split(',') {
                let (from, to) = part.split_once('-').unwrap_or((part, part));
                let (Some(from), Some(to)) = (day(from), day(to)) else {
                    return Err(bad(&format!("unknown day in {part:?} (Mon .. Sun)")));
                };
                // Mon-Fri, or Fri-Mon across the week's end.
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
        let (start, end) = times
            .trim()
            .split_once('-')
            .ok_or_else(|| bad("the times must be HH:MM-HH:MM"))?;
        let (Some(start), Some(end)) = (minutes(start.trim()), minutes(end.trim())) else {
            return Err(bad("the times must be HH:MM-HH:MM, 00:00 to 23:59"));
        };
        let length = (end + MINUTES_A_DAY - start - 1) % MINUTES_A_DAY + 1;
        Ok(Self {
            days,
            start,
            length,
        })
    }
}

impl MaintenanceWindow {
    /// If `now_unix_ms` falls inside the window, the time left in it.
    pub fn remaining(&self, now_unix_ms: u64) -> Option<Duration> {
        let minute_ms = 60_000u64;
        let day_ms = u64::from(MINUTES_A_DAY) * minute_ms;
        let today = now_unix_ms / day_ms;
        // The window that started today, or the one yesterday that runs
        // past midnight.
        for start_day in [today, today.saturating_sub(1)] {
            // 1970-01-01 was a Thursday (index 3).
            let weekday = ((start_day + 3) % 7) as usize;
            if !self.days[weekday] {
                continue;
            }
            let start = start_day * day_ms + u64::from(self.start) * minute_ms;
            let end = start + u64::from(self.length) * minute_ms;
            if (start..end).contains(&now_unix_ms) {
                return Some(Duration::from_millis(end - now_unix_ms));
            }
        }
        None
    }

    /// Whether a reboot that may take up to `longest` may start at
    /// `now_unix_ms` (see the module docs).
    pub fn may_start(&self, now_unix_ms: u64, longest: Duration) -> bool {
        self.remaining(now_unix_ms)
            .is_some_and(|left| left >= longest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-05 was a Saturday; unix ms at `hh:mm` UTC, `days` later.
    fn at(days: u64, hh: u64, mm: u64) -> u64 {
        let saturday = 20_792 * 86_400_000u64;
        saturday + days * 86_400_000 + (hh * 60 + mm) * 60_000
    }

    fn window(text: &str) -> MaintenanceWindow {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_reference_day_is_a_saturday() {
        // 2026-12-05T00:00:00Z.
        assert_eq!(at(0, 0, 0) / 1000, 1_796_428_800);
    }

    #[test]
    fn windows_parse_and_bad_ones_say_why() {
        let w = window("Sat 02:00-04:00");
        assert_eq!(w.remaining(at(0, 1, 59)), None);
        assert_eq!(w.remaining(at(0, 2, 0)), Some(Duration::from_secs(7200)));
        assert_eq!(w.remaining(at(0, 3, 30)), Some(Duration::from_secs(1800)));
        assert_eq!(w.remaining(at(0, 4, 0)), None);
        assert_eq!(w.remaining(at(1, 3, 0)), None, "Sunday");
        assert_eq!(w.remaining(at(7, 3, 0)), Some(Duration::from_secs(3600)));
        // Past midnight into Sunday.
        let late = window("sat 23:00-01:00");
        assert_eq!(
            late.remaining(at(1, 0, 30)),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            late.remaining(at(0, 0, 30)),
            None,
            "Saturday 00:30 is Friday's"
        );
        // Ranges across the week's end, lists, daily.
        let weekend = window("Fri-Mon,Wed 01:00-02:00");
        let open: Vec<bool> = (0..7)
            .map(|d| weekend.remaining(at(d, 1, 30)).is_some())
            .collect();
        // Sat Sun Mon Tue Wed Thu Fri
        assert_eq!(open, [true, true, true, false, true, false, true]);
        assert!(window("daily 03:00-03:01").remaining(at(3, 3, 0)).is_some());
        // A whole day.
        assert!(window("Sat 05:00-05:00").remaining(at(1, 4, 59)).is_some());
        for (text, why) in [
            ("Sat", "no time range"),
            ("Sat 2:00-04:00", "HH:MM-HH:MM"),
            ("Sat 02:00-24:00", "00:00 to 23:59"),
            ("Sat 02:00", "HH:MM-HH:MM"),
            ("Caturday 02:00-04:00", "unknown day"),
            ("Mon-Fry 02:00-04:00", "unknown day"),
        ] {
            let e = text.parse::<MaintenanceWindow>().expect_err(text);
            assert!(
                e.contains(why) && e.contains("e.g. \"Sat 02:00-04:00\""),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn a_reboot_starts_only_with_time_for_it_left() {
        let w = window("Sat 02:00-04:00");
        let longest = Duration::from_secs(20 * 60);
        assert!(!w.may_start(at(0, 1, 50), longest), "before");
        assert!(w.may_start(at(0, 2, 0), longest));
        assert!(w.may_start(at(0, 3, 40), longest), "exactly the time left");
        assert!(
            !w.may_start(at(0, 3, 41), longest),
            "it would run past 04:00"
        );
        assert!(!w.may_start(at(0, 4, 0), longest), "after");
    }
}
