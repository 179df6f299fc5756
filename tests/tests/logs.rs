//! `stewardctl logs NODE` (issue 16): a node's journal for a unit Steward
//! manages, read by the node's agent and streamed through its session, on
//! a machine booting real systemd and journald.
//!
//! Checked: the agent's own journal comes back; a unit Steward does not
//! manage is refused before anything runs; an agent certificate is refused
//! (admin only); a 20 KB journal line is cut at 4 KiB and says so; `--follow`
//! prints new entries as they are written, and Ctrl-C (SIGINT) ends it —
//! on the node too: no `journalctl` is left running there.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use steward_tests::bin;
use steward_tests::converge_bed::{poll, Clock, ConvergeBed};
use steward_tests::nspawn::{Machine, MachineOptions};

/// Writes `text` to the journal as the output of a transient unit called
/// `unit` (so `journalctl -u unit` finds it), and waits until it is there.
fn journal_line(m: &Machine, unit: &str, text: &str) {
    m.sh(&format!(
        "systemd-run --quiet --wait --unit={unit} -p StandardOutput=journal sh -c 'printf \"%s\\n\" \"{text}\"'"
    ));
}

/// How many `journalctl` processes run in `m`. A process may end between
/// the listing and its `cat` (the last `cat`'s failure would be the
/// loop's status), so the loop's status is not the answer.
fn journalctls(m: &Machine) -> usize {
    m.sh("for p in /proc/[0-9]*; do cat $p/comm 2>/dev/null; done; true")
        .lines()
        .filter(|l| l.trim() == "journalctl")
        .count()
}

#[test]
fn logs_reads_a_nodes_journal_through_its_session() {
    let clock = Clock::start();
    let bed = ConvergeBed::start_machines("logs", vec![("n1", MachineOptions::default())]);
    let m = bed.machine("n1");
    clock.say("machine booted, agent connected");

    // The agent's own journal (the default unit).
    let out = bed.cluster.ctl(&["logs", "n1", "-n", "50"]);
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("agent starting") || out.stdout.contains("session open"),
        "the agent's journal did not come back:\n{}",
        out.stdout
    );

    // Only units Steward manages; refused before anything is asked.
    let out = bed.cluster.ctl(&["logs", "n1", "--unit", "ssh"]);
    assert!(!out.ok());
    assert!(
        out.stderr.contains("not one Steward manages"),
        "{}",
        out.stderr
    );

    // Admin only: the node's own certificate is refused.
    let urls = bed.cluster.coordinator_urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let out = bed.cluster.ctl_as("n1", &urls, &["logs", "n1"]);
    assert!(!out.ok(), "an agent certificate read logs:\n{}", out.stdout);
    assert!(out.stderr.contains("admin"), "{}", out.stderr);

    // A huge line is cut at 4 KiB, and says how much was cut.
    let huge = format!("huge-start-{}-huge-end", "x".repeat(20_000));
    journal_line(m, "containerd", &huge);
    let out = bed.cluster.ctl(&["logs", "n1", "--unit", "containerd"]);
    assert!(out.ok(), "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("huge-start-"))
        .unwrap_or_else(|| {
            panic!(
                "no huge line in:\n{}",
                &out.stdout[..out.stdout.len().min(2000)]
            )
        });
    assert!(!line.contains("huge-end"), "the line was not cut");
    assert!(
        line.contains("…[cut: ") && line.len() < 4096 + 64,
        "{} bytes",
        line.len()
    );
    clock.say(format!(
        "a 20 KB journal line came back as {} bytes",
        line.len()
    ));

    // --follow: new entries as they come; SIGINT ends it, on the node too.
    let pki = bed.cluster.pki();
    // Through `env --default-signal=INT` (which execs it, same pid): a
    // test run started in the background of a non-interactive shell
    // inherits SIGINT ignored, and so would stewardctl, as an operator's
    // never does.
    let mut cmd = Command::new("env");
    cmd.arg("--default-signal=INT")
        .arg(bin("stewardctl"))
        .args(["logs", "n1", "--unit", "containerd", "--follow", "-n", "20"])
        .env("STEWARD_ENDPOINTS", urls.join(","))
        .env("STEWARD_CA", pki.join("ca.crt"))
        .env("STEWARD_CERT", pki.join("admin.crt"))
        .env("STEWARD_KEY", pki.join("admin.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut follower = cmd.spawn().expect("stewardctl logs --follow");
    let stdout = follower.stdout.take().expect("stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("--follow never printed {needle:?}: {e}"),
            }
        }
    };
    wait_for("huge-start-");
    poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "journalctl --follow running on the node",
        || match journalctls(m) {
            0 => Err("none".to_owned()),
            n => Ok(n),
        },
    );
    let written = Instant::now();
    journal_line(m, "containerd", "follow-marker-1");
    wait_for("follow-marker-1");
    clock.say(format!(
        "--follow printed a new entry {:?} after it was written",
        written.elapsed()
    ));
    let follower_pid = nix::unistd::Pid::from_raw(follower.id() as i32);
    nix::sys::signal::kill(follower_pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = follower.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stewardctl ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "interrupted, yet {status}");
    poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "no journalctl left on the node after Ctrl-C",
        || match journalctls(m) {
            0 => Ok(()),
            n => Err(format!("{n} running")),
        },
    );
    clock.say("Ctrl-C ended the follow, and journalctl on the node with it");
    // The session lives on: the node is still healthy and answers again.
    let out = bed
        .cluster
        .ctl(&["logs", "n1", "--unit", "containerd", "-n", "5"]);
    assert!(
        out.ok() && out.stdout.contains("follow-marker-1"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}
