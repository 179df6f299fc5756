//! A bounded load client for the VIP tests: one HTTP request per interval
//! tick for a given duration (at least one request), each on a fresh TCP
//! connection with connect and read timeouts, each in its own thread so a
//! request hanging on a dead host does not hold back the next tick (at most
//! timeout/interval + 1 are in flight); then prints one JSON object:
//!
//!     {"requests":N,"failed":N,"longest_outage_ms":F,
//!      "outages":[[start_ms,end_ms],...],"backends":{"be1":N,...}}
//!
//! An outage is a run of consecutive failed requests (in the order they
//! were sent), from the start of the first failed one to the start of the
//! next successful one (or the end of the run); times are ms since the
//! client started, so the resolution is the interval. `backends` counts the
//! (trimmed) bodies of successful answers. Exits 0 whenever it ran (the
//! caller judges), 2 on bad arguments. Also in the object: `last_ok`
//! (whether the last request succeeded) and `duration_ms` (the run's length).
//!
//!     vip-client --target IP:PORT --duration-ms N [--interval-ms 10] [--timeout-ms 200]

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::exit;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: vip-client --target IP:PORT --duration-ms N [--interval-ms 10] [--timeout-ms 200]";

fn usage_error(msg: &str) -> ! {
    eprintln!("vip-client: {msg}\n{USAGE}");
    exit(2);
}

struct Args {
    target: SocketAddr,
    duration: Duration,
    interval: Duration,
    timeout: Duration,
}

fn parse_args() -> Args {
    let mut target = None;
    let mut duration = None;
    let mut interval = Duration::from_millis(10);
    let mut timeout = Duration::from_millis(200);
    let mut args = std::env::args().skip(1);
    let ms = |flag: &str, v: Option<String>, min: u64| -> Duration {
        let v = v.unwrap_or_else(|| usage_error(&format!("{flag} needs a value")));
        match v.parse::<u64>() {
            Ok(n) if n >= min => Duration::from_millis(n),
            _ => usage_error(&format!("{flag} {v:?}: not a whole number >= {min}")),
        }
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--target" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage_error("--target needs a value"));
                target = Some(
                    v.parse::<SocketAddr>()
                        .unwrap_or_else(|_| usage_error(&format!("--target {v:?}: not IP:PORT"))),
                );
            }
            "--duration-ms" => duration = Some(ms("--duration-ms", args.next(), 0)),
            "--interval-ms" => interval = ms("--interval-ms", args.next(), 1),
            "--timeout-ms" => timeout = ms("--timeout-ms", args.next(), 1),
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    match (target, duration) {
        (Some(target), Some(duration)) => Args {
            target,
            duration,
            interval,
            timeout,
        },
        _ => usage_error("--target and --duration-ms are required"),
    }
}

/// One request; `Some(body)` if the answer is `HTTP/1.x 200`.
fn request(target: SocketAddr, timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
        .ok()?;
    let deadline = Instant::now() + timeout;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if answer.len() > 1 << 20 {
            break;
        }
    }
    let ok = answer.len() >= 12
        && answer.starts_with(b"HTTP/1.")
        && answer[7].is_ascii_digit()
        && &answer[8..12] == b" 200";
    if !ok {
        return None;
    }
    let text = String::from_utf8_lossy(&answer);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Some(body.trim().to_owned())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn main() {
    let args = parse_args();
    let start = Instant::now();
    let end = start + args.duration;
    // (sent at, ms since start; the answer's body if it was a 200)
    let results: std::sync::Mutex<Vec<(f64, Option<String>)>> = Default::default();
    std::thread::scope(|scope| {
        let mut next = start;
        loop {
            let at = ms(Instant::now() - start);
            let results = &results;
            let (target, timeout) = (args.target, args.timeout);
            scope.spawn(move || {
                let answer = request(target, timeout);
                results.lock().expect("results").push((at, answer));
            });
            // Next tick on the grid; ticks missed while waiting are skipped.
            let now = Instant::now();
            while next <= now {
                next += args.interval;
            }
            if next >= end {
                if now < end {
                    std::thread::sleep(end - now);
                }
                break;
            }
            std::thread::sleep(next - now);
        }
    });
    let finished = ms(start.elapsed());
    let mut results = results.into_inner().expect("results");
    results.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut failed = 0u64;
    let mut backends: BTreeMap<String, u64> = BTreeMap::new();
    let mut outages: Vec<(f64, f64)> = Vec::new();
    let mut outage_start: Option<f64> = None;
    for (at, answer) in &results {
        match answer {
            Some(body) => {
                *backends.entry(body.clone()).or_default() += 1;
                if let Some(s) = outage_start.take() {
                    outages.push((s, *at));
                }
            }
            None => {
                failed += 1;
                outage_start.get_or_insert(*at);
            }
        }
    }
    let last_ok = results.last().is_some_and(|(_, a)| a.is_some());
    if let Some(s) = outage_start.take() {
        outages.push((s, finished));
    }
    let longest = outages.iter().map(|(s, e)| e - s).fold(0.0, f64::max);
    let report = serde_json::json!({
        "requests": results.len(),
        "failed": failed,
        "longest_outage_ms": longest,
        "outages": outages.iter().map(|(s, e)| [*s, *e]).collect::<Vec<_>>(),
        "backends": backends,
        "last_ok": last_ok,
        "duration_ms": finished,
    });
    println!("{report}");
}
