//! `stewardctl completion bash|zsh|fish` (issue 16): the scripts parse in
//! the real shells, and bash and fish complete subcommands, node ids and
//! VIP names from a live cluster (real etcd, a coordinator, two agents),
//! with global options before the subcommand, and quietly complete nothing
//! when no coordinator answers.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steward_tests::{bin, eventually, Cluster};

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn script(shell: &str) -> String {
    let out = Command::new(bin("stewardctl"))
        .args(["completion", shell])
        .output()
        .expect("stewardctl completion");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs `shell -c script` with the cluster's connection settings (or
/// `endpoints` instead); returns (stdout, stderr).
fn run(cluster: &Cluster, endpoints: Option<&str>, shell: &str, script: &str) -> (String, String) {
    let pki = cluster.pki();
    let urls = cluster.coordinator_urls().join(",");
    // `stewardctl` must be the one under test, found on PATH like a user's.
    let path = format!(
        "{}:{}",
        bin("stewardctl").parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(shell)
        .args(["-c", script])
        .env("PATH", path)
        .env("STEWARD_ENDPOINTS", endpoints.unwrap_or(&urls))
        .env("STEWARD_CA", pki.join("ca.crt"))
        .env("STEWARD_CERT", pki.join("admin.crt"))
        .env("STEWARD_KEY", pki.join("admin.key"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{shell}: {e}"));
    assert!(
        out.status.success(),
        "{shell} -c failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn words(text: &str) -> Vec<String> {
    let mut w: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    w.sort();
    w
}

#[test]
fn scripts_parse_in_every_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (shell, check) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let path = dir.path().join(format!("stewardctl.{shell}"));
        std::fs::write(&path, script(shell)).expect("write");
        assert!(
            on_path(check),
            "{check} is not installed (scripts/deps.sh installs it)"
        );
        let out = Command::new(check)
            .arg("-n")
            .arg(&path)
            .output()
            .expect("run shell");
        assert!(
            out.status.success(),
            "{check} -n rejects the {shell} script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bash_and_fish_complete_names_from_the_cluster() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    cluster.start_agent("node-a");
    cluster.start_agent("node-b");
    eventually(Duration::from_secs(15), "two nodes listed", || {
        (cluster.nodes().len() == 2).then_some(())
    });
    let set = cluster.ctl(&[
        "vip",
        "set",
        "front",
        "--address",
        "198.18.0.100/24",
        "--candidate",
        "node-a",
        // node-a has no lb role, so it never binds this VIP; it only has
        // to exist to be completed.
        "--interface",
        "lo",
    ]);
    assert!(set.ok(), "{}", set.stderr);

    let bash = |words_before: &str, cword: usize, endpoints: Option<&str>| {
        let script = format!(
            "source <(stewardctl completion bash)\n\
             COMP_WORDS=({words_before}); COMP_CWORD={cword}; COMP_LINE=\"${{COMP_WORDS[*]}}\"\n\
             _stewardctl_names stewardctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        run(&cluster, endpoints, "bash", &script)
    };
    // Subcommands, statically.
    let (out, _) = bash("stewardctl vi", 1, None);
    assert_eq!(words(&out), ["vip"]);
    // Node ids from the cluster, also after global options.
    let (out, err) = bash("stewardctl node show ''", 3, None);
    assert_eq!(words(&out), ["node-a", "node-b"], "stderr: {err}");
    let (out, _) = bash("stewardctl -o json role add node-b", 5, None);
    assert_eq!(words(&out), ["node-b"]);
    let (out, _) = bash("stewardctl logs ''", 2, None);
    assert_eq!(words(&out), ["node-a", "node-b"]);
    // VIP names.
    let (out, _) = bash("stewardctl vip move ''", 3, None);
    assert_eq!(words(&out), ["front"]);
    // No coordinator: nothing, silently, soon.
    let dead = format!("https://127.0.0.1:{}", steward_tests::free_port());
    let started = Instant::now();
    let (out, err) = bash("stewardctl node show ''", 3, Some(&dead));
    assert!(out.trim().is_empty(), "{out}");
    assert!(err.trim().is_empty(), "completion wrote errors: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // fish completes the same names with its own engine.
    let (out, err) = run(
        &cluster,
        None,
        "fish",
        "stewardctl completion fish | source; complete -C 'stewardctl node show '",
    );
    let names: Vec<String> = out
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_owned())
        .filter(|n| n.starts_with("node-"))
        .collect();
    assert_eq!(names, ["node-a", "node-b"], "fish said:\n{out}{err}");
}
