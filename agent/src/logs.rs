//! `stewardctl logs`: the agent reads its host's journal for one
//! Steward-managed unit and sends it back through its session.
//!
//! What can be read is fixed ([`LOG_UNITS`], checked again here whatever
//! the coordinator says) and the only program run is `journalctl` with
//! arguments built from a validated [`LogQuery`]: no command execution, no
//! other files. Bounds: lines are cut at [`MAX_LOG_LINE`] bytes (a longer
//! one is never held whole in memory), chunks carry at most
//! [`MAX_LOG_CHUNK`] lines, at most [`MAX_RATE`] lines a second go out,
//! and a session runs at most [`MAX_REQUESTS`] readers at once. A reader
//! stops when it is cancelled or its session ends (`journalctl` is killed
//! with it).

use std::process::Stdio;
use std::time::Duration;

use steward_proto::domain::{LogChunk, LogQuery, LOG_UNITS, MAX_LOG_CHUNK, MAX_LOG_LINE};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

/// Readers one session runs at once.
pub const MAX_REQUESTS: usize = 4;
/// Lines a second one reader sends at most.
pub const MAX_RATE: usize = 1000;
/// How long lines wait to be sent together.
const BATCH: Duration = Duration::from_millis(100);

/// The journalctl arguments for `query`, or why it cannot be run.
pub fn journalctl_args(query: &LogQuery) -> Result<Vec<String>, String> {
    if !LOG_UNITS.contains(&query.unit.as_str()) {
        return Err(format!("unit {:?} is not one Steward manages", query.unit));
    }
    let mut args = vec![
        "--no-pager".to_owned(),
        "--output=short-iso".to_owned(),
        format!("--unit={}.service", query.unit),
        format!("--lines={}", query.lines),
    ];
    if query.since_s > 0 {
        args.push(format!("--since=-{}s", query.since_s));
    }
    if query.follow {
        args.push("--follow".to_owned());
    }
    Ok(args)
}

/// One line of at most [`MAX_LOG_LINE`] bytes (the rest of a longer one is
/// read and dropped, and the line says how much was cut); `None` at the
/// end.
async fn capped_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<String>> {
    let mut kept = Vec::new();
    let mut total = 0usize;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            if total == 0 {
                return Ok(None);
            }
            break;
        }
        let (part, ends) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = MAX_LOG_LINE.saturating_sub(kept.len());
        kept.extend_from_slice(&part[..part.len().min(room)]);
        total += part.len();
        let used = ends.unwrap_or(buf.len());
        reader.consume(used);
        if ends.is_some() {
            break;
        }
    }
    let mut line = String::from_utf8_lossy(&kept).into_owned();
    if total > kept.len() {
        line.push_str(&format!(" …[cut: {} more bytes]", total - kept.len()));
    }
    Ok(Some(line))
}

/// Reads the journal for request `id` and sends its lines to `out`, then a
/// last chunk with `done` (and the error, if any).
pub async fn read_journal(id: u64, query: LogQuery, out: mpsc::Sender<LogChunk>) {
    let end = |error: Option<String>| LogChunk {
        id,
        lines: Vec::new(),
        done: true,
        error,
    };
    let args = match journalctl_args(&query) {
        Ok(a) => a,
        Err(e) => {
            let _ = out.send(end(Some(e))).await;
            return;
        }
    };
    let child = tokio::process::Command::new("journalctl")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = out
                .send(end(Some(format!("cannot run journalctl: {e}"))))
                .await;
            return;
        }
    };
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = out
            .send(end(Some("journalctl has no output pipes".into())))
            .await;
        return;
    };
    let mut reader = BufReader::new(stdout);
    let mut batch: Vec<String> = Vec::new();
    let mut sent_this_second = 0usize;
    let mut second = tokio::time::Instant::now();
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        let line = tokio::select! {
            line = capped_line(&mut reader) => line,
            _ = sleep_until(flush_at) => {
                flush_at = None;
                if !send_batch(id, &mut batch, &out).await {
                    return;
                }
                continue;
            }
        };
        match line {
            Ok(Some(line)) => {
                batch.push(line);
                flush_at.get_or_insert_with(|| tokio::time::Instant::now() + BATCH);
                if batch.len() >= MAX_LOG_CHUNK {
                    flush_at = None;
                    sent_this_second += batch.len();
                    if !send_batch(id, &mut batch, &out).await {
                        return;
                    }
                    // The rate bound: a full second's worth sent, wait for
                    // the next second.
                    if sent_this_second >= MAX_RATE {
                        tokio::time::sleep_until(second + Duration::from_secs(1)).await;
                    }
                    if second.elapsed() >= Duration::from_secs(1) {
                        second = tokio::time::Instant::now();
                        sent_this_second = 0;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = send_batch(id, &mut batch, &out).await;
                let _ = out
                    .send(end(Some(format!("reading journalctl: {e}"))))
                    .await;
                return;
            }
        }
    }
    if !send_batch(id, &mut batch, &out).await {
        return;
    }
    let status = child.wait().await;
    let mut err = Vec::new();
    let _ = (&mut stderr).take(4096).read_to_end(&mut err).await;
    let error = match status {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!(
            "journalctl {s}: {}",
            String::from_utf8_lossy(&err).trim()
        )),
        Err(e) => Some(format!("journalctl: {e}")),
    };
    let _ = out.send(end(error)).await;
}

async fn send_batch(id: u64, batch: &mut Vec<String>, out: &mpsc::Sender<LogChunk>) -> bool {
    if batch.is_empty() {
        return true;
    }
    let chunk = LogChunk {
        id,
        lines: std::mem::take(batch),
        done: false,
        error: None,
    };
    out.send(chunk).await.is_ok()
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_managed_units_and_bounded_arguments() {
        let q = LogQuery::new("haproxy.service", 600, true, 50).expect("query");
        assert_eq!(
            journalctl_args(&q).expect("args"),
            [
                "--no-pager",
                "--output=short-iso",
                "--unit=haproxy.service",
                "--lines=50",
                "--since=-600s",
                "--follow"
            ]
        );
        assert!(LogQuery::new("sshd", 0, false, 10).is_err());
        assert!(LogQuery::new("haproxy; rm -rf /", 0, false, 10).is_err());
        assert!(LogQuery::new("haproxy", 0, false, 0).is_err());
        let forged = LogQuery {
            unit: "../../etc/shadow".into(),
            since_s: 0,
            follow: false,
            lines: 1,
        };
        assert!(journalctl_args(&forged).is_err());
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_say_so() {
        let long = "x".repeat(MAX_LOG_LINE * 3);
        let text = format!("short\n{long}\nlast");
        let mut reader = BufReader::with_capacity(512, text.as_bytes());
        assert_eq!(
            capped_line(&mut reader).await.expect("read").as_deref(),
            Some("short")
        );
        let cut = capped_line(&mut reader).await.expect("read").expect("line");
        assert!(cut.starts_with(&"x".repeat(MAX_LOG_LINE)));
        assert!(
            cut.ends_with(&format!(" …[cut: {} more bytes]", MAX_LOG_LINE * 2)),
            "{}",
            &cut[MAX_LOG_LINE..]
        );
        assert_eq!(
            capped_line(&mut reader).await.expect("read").as_deref(),
            Some("last")
        );
        assert_eq!(capped_line(&mut reader).await.expect("read"), None);
    }
}
