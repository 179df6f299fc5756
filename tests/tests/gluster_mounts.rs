//! Gluster volumes reach the Kubernetes workers (issue 17), end to end on
//! nspawn machines booting systemd, with real glusterd, the real FUSE
//! client (`/dev/fuse` bound into every machine) and **STAND-IN
//! KUBERNETES PACKAGES** (tests/src/standins.rs: `kubectl` records its
//! arguments and what it reads on stdin; no Kubernetes runs).
//!
//! ```text
//!   b1   gluster-brick + k8s-control-plane (runs kubeadm init and kubectl)
//!   b2   gluster-brick
//!   b3   gluster-brick
//!   w1   k8s-worker + lb (the VIP `api`, the Kubernetes endpoint)
//!   w2   k8s-worker
//! ```
//!
//! Volume `data`, replica 3, `mount_on` left at its default (k8s-worker).
//! Steps, in one bed:
//! 1. Both workers mount it through the agent: `glusterfs-client`
//!    installed by apt-get, `mnt-steward-gluster-data.mount` enabled and
//!    active with b1 as the volfile server and b2:b3 as backups, a
//!    `fuse.glusterfs` mount; the brick nodes mount nothing.
//! 2. A file written on w1 is read on w2 and lies in all three bricks.
//! 3. The PersistentVolume: the stand-in kubectl on b1 was called with
//!    `apply -f -` and read a manifest whose node affinity is exactly
//!    [w1, w2]; `stewardctl gluster pv data` prints the same manifest.
//! 4. b1 (the first volfile server and a brick) goes silent (its cable
//!    pulled): both workers still write and read (after GlusterFS's own
//!    ping timeout for the first call).
//! 5. w2's FUSE client is frozen (SIGSTOP): the agent finds the mount
//!    hung (two probes of 60 s without an answer), detaches and remounts it
//!    (from the backup volfile servers, b1 being still silent), says so,
//!    and the file reads again. Neither worker was remounted in step 4.
//! 6. b1 back; the agent on w1 restarted: the very same FUSE client
//!    process keeps the mount.
//! 7. The spec drops the volume while a process on w2 holds a file open
//!    on it: w1's mount goes, w2's stays with the reason in its converge
//!    report; once the process ends, w2's goes too.
//!
//! Needs root, systemd-nspawn, etcd, `/dev/fuse`, and `cargo build
//! --workspace --bins` first. The first run builds a local repository with
//! these machines' packages (from the host's Debian mirror).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use steward_tests::converge_bed::{
    has_settled, poll, report_resources, secs, Clock, ConvergeBed, Findings, AGENT_UNIT,
};
use steward_tests::nspawn::{Machine, MachineOptions};
use steward_tests::standins::{
    build_kubernetes_standins, parse_kubectl_calls, KUBECTL_CALLS_LOG, KUBECTL_STDIN_DIR,
};

const VERSION: &str = "1.31.2-1.1";
const STANDIN_REPO: &str = "/srv/kubernetes-standin";
const PACKAGES: &[&str] = &[
    "haproxy",
    "procps",
    "containerd",
    "glusterfs-server",
    "glusterfs-client",
];
const BRICKS: [&str; 3] = ["b1", "b2", "b3"];
const WORKERS: [&str; 2] = ["w1", "w2"];
const VOLUME: &str = "data";
const POINT: &str = "/mnt/steward/gluster/data";
const UNIT: &str = "mnt-steward-gluster-data.mount";
const BRICK: &str = "/data/glusterfs/data/brick1/brick";
const BOUND: Duration = Duration::from_secs(300);
const MOUNT_RESOURCES: &[&str] = &[
    "packages:glusterfs-client",
    "unit:mnt-steward-gluster-data.mount",
    "mount-check:/mnt/steward/gluster/data",
    "stale-mounts:gluster",
];

fn spec(vip: &str, with_volume: bool) -> String {
    let volume = if with_volume {
        format!("[[gluster.volume]]\nname = \"{VOLUME}\"\nreplica = 3\n")
    } else {
        String::new()
    };
    format!(
        r#"# Gluster mounts, Kubernetes with STAND-IN packages
[[vip]]
name = "api"
address = "{vip}"
check = "haproxy"

[kubernetes]
version = "{VERSION}"
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"

[kubernetes.repository]
url = "file:{STANDIN_REPO}"
suite = "./"

{volume}
[nodes.b1]
roles = ["gluster-brick", "k8s-control-plane"]

[nodes.b2]
roles = ["gluster-brick"]

[nodes.b3]
roles = ["gluster-brick"]

[nodes.w1]
roles = ["k8s-worker", "lb"]

[nodes.w2]
roles = ["k8s-worker"]
"#
    )
}

/// `SOURCE FSTYPE` of what is mounted at the mount point, if anything.
fn mounted(m: &Machine) -> Option<String> {
    let out = m.exec(&["findmnt", "-n", "-o", "SOURCE,FSTYPE", POINT]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Runs `script` in `m` under `timeout`; its output and how long it took.
fn timed(m: &Machine, script: &str, limit: Duration) -> (Result<String, String>, Duration) {
    let t = Instant::now();
    let out = m.exec(&["timeout", &limit.as_secs().to_string(), "sh", "-c", script]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result = if out.status.success() {
        Ok(text)
    } else {
        Err(format!("`{script}` ({}): {}", out.status, text.trim()))
    };
    (result, t.elapsed())
}

/// Writes `content` to `name` on the volume through `m`'s mount and reads
/// it back; must work within `limit`. Returns how long it took.
fn write_and_read(m: &Machine, name: &str, content: &str, limit: Duration) -> Duration {
    let (r, took) = timed(
        m,
        &format!("echo {content} > {POINT}/{name} && cat {POINT}/{name}"),
        limit,
    );
    let text = r.unwrap_or_else(|e| panic!("{}: write and read {name}: {e}", m.name()));
    assert_eq!(text.trim(), content, "{}: read back {name}", m.name());
    took
}

/// `name` read through `m`'s mount within `limit`.
fn read(m: &Machine, name: &str, limit: Duration) -> (Result<String, String>, Duration) {
    let (r, took) = timed(m, &format!("cat {POINT}/{name}"), limit);
    (r.map(|t| t.trim().to_owned()), took)
}

fn brick_file(m: &Machine, name: &str) -> Option<String> {
    std::fs::read_to_string(m.root().join(BRICK.trim_start_matches('/')).join(name))
        .ok()
        .map(|t| t.trim().to_owned())
}

/// The FUSE client serving the mount in `m`: (host pid, command line);
/// panics if there is more than one.
fn fuse_client(bed: &ConvergeBed, m: &Machine) -> Option<(u32, String)> {
    let mut all = fuse_clients(bed, m);
    assert!(all.len() <= 1, "{}: FUSE clients {all:?}", m.name());
    all.pop()
}

/// Every FUSE client process of the mount point in `m`.
fn fuse_clients(bed: &ConvergeBed, m: &Machine) -> Vec<(u32, String)> {
    bed.processes_in(m, &["glusterfs"])
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(POINT))
        .collect()
}

fn resource<'a>(report: &'a Value, id: &str) -> Option<&'a Value> {
    report_resources(report)
        .into_iter()
        .find(|r| r["id"].as_str() == Some(id))
}

/// The `values:` of a PersistentVolume manifest's node affinity.
fn affinity(manifest: &str) -> Vec<String> {
    manifest
        .split_once("values:\n")
        .map(|(_, rest)| {
            rest.lines()
                .map_while(|l| l.trim().strip_prefix("- "))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn gluster_volumes_are_mounted_on_the_workers_and_published_to_kubernetes() {
    let clock = Clock::start();
    let findings = Findings::default();
    eprintln!(
        "\n*** STAND-IN KUBERNETES: kubeadm, kubelet and kubectl here are fakes that record \
         their calls (tests/src/standins.rs); GlusterFS and its FUSE client are real. ***\n"
    );
    let repo = tempfile::Builder::new()
        .prefix("steward-k8s-standin-")
        .tempdir()
        .expect("tempdir");
    build_kubernetes_standins(repo.path(), &[VERSION]);
    let machines: Vec<(&str, MachineOptions)> = BRICKS
        .iter()
        .chain(WORKERS.iter())
        .map(|n| {
            (
                *n,
                MachineOptions::default()
                    .packages(PACKAGES)
                    .bind_ro(repo.path(), STANDIN_REPO)
                    .bind("/dev/fuse", "/dev/fuse"),
            )
        })
        .collect();
    let mut bed = ConvergeBed::start_machines("gluster-mounts", machines);
    bed.dump_units = ["glusterd.service", UNIT, "kubelet.service"]
        .map(String::from)
        .to_vec();
    let vip = format!("{}/{}", bed.vip, bed.net.prefix_len());
    let ip = |n: &str| bed.machine(n).ip().to_string();
    clock.say(format!(
        "bed up: {}",
        bed.lbs
            .iter()
            .map(|m| format!("{} {}", m.name(), m.ip()))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // ---- 1. the workers mount the volume
    let out = bed.apply_spec(&spec(&vip, true));
    let t1 = Instant::now();
    clock.say(format!("step 1: applied:\n{}", out.stdout.trim()));
    for w in WORKERS {
        let m = bed.machine(w);
        let source = poll(
            BOUND,
            Duration::from_secs(1),
            &format!("{w}: {POINT} mounted"),
            || mounted(m).ok_or_else(|| format!("nothing at {POINT}")),
        );
        clock.say(format!(
            "{w}: {POINT} mounted ({source}) {} after the apply",
            secs(t1.elapsed())
        ));
        assert_eq!(source, format!("{}:/{VOLUME} fuse.glusterfs", ip("b1")));
        let report = bed.settled(&findings, w, BOUND, has_settled(MOUNT_RESOURCES));
        clock.say(format!("{w}: converged ({})", report["counts"]));
        let unit = bed
            .read_file(m, &format!("/etc/systemd/system/{UNIT}"))
            .expect("the mount unit file");
        for line in [
            format!("What={}:/{VOLUME}", ip("b1")),
            format!("Where={POINT}"),
            "Type=glusterfs".to_owned(),
            format!(
                "Options=_netdev,backup-volfile-servers={}:{}",
                ip("b2"),
                ip("b3")
            ),
            "After=network-online.target".to_owned(),
            "WantedBy=remote-fs.target".to_owned(),
        ] {
            assert!(
                unit.lines().any(|l| l == line),
                "{w}: no {line:?} in\n{unit}"
            );
        }
        assert_eq!(
            bed.exec_text(m, &["systemctl", "is-enabled", UNIT]).trim(),
            "enabled"
        );
        assert_eq!(bed.unit_state(m, UNIT), "active");
        let history = bed
            .read_file(m, "/var/log/apt/history.log")
            .unwrap_or_default();
        assert!(
            history
                .lines()
                .any(|l| l.starts_with("Commandline: apt-get install")
                    && l.contains("glusterfs-client")),
            "{w}: glusterfs-client not installed by apt-get:\n{history}"
        );
    }
    for b in BRICKS {
        let report = bed.settled(&findings, b, BOUND, |_| Ok(()));
        assert!(
            resource(&report, "unit:mnt-steward-gluster-data.mount").is_none(),
            "{b} is no worker but plans the mount"
        );
        assert_eq!(mounted(bed.machine(b)), None, "{b} mounted the volume");
    }
    eprintln!(
        "---- stewardctl node show w1 ----\n{}",
        bed.node_table("w1")
    );

    // ---- 2. written on w1, read on w2, in every brick
    let (w1, w2) = (bed.machine("w1"), bed.machine("w2"));
    write_and_read(w1, "one.txt", "one", Duration::from_secs(30));
    let (r, _) = read(w2, "one.txt", Duration::from_secs(30));
    assert_eq!(r.as_deref(), Ok("one"), "w2 reads what w1 wrote");
    for b in BRICKS {
        let m = bed.machine(b);
        poll(
            Duration::from_secs(20),
            Duration::from_millis(200),
            &format!("{b}: one.txt in its brick"),
            || match brick_file(m, "one.txt") {
                Some(t) if t == "one" => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    clock.say("step 2: one.txt written on w1 is read on w2 and lies in the bricks of b1 b2 b3");

    // ---- 3. the PersistentVolume, applied by kubectl on b1
    let b1 = bed.machine("b1");
    let stdin_dir = b1.root().join(KUBECTL_STDIN_DIR.trim_start_matches('/'));
    // Applied once the cluster is up; again once b1 reported the volume's
    // capacity (the manifest changed), whichever comes first.
    let read_applied = || -> Vec<String> {
        (1..)
            .map(|n| std::fs::read_to_string(stdin_dir.join(format!("{n}.yaml"))))
            .map_while(Result::ok)
            .collect()
    };
    let manifests = poll(
        BOUND,
        Duration::from_secs(1),
        "b1: kubectl apply -f - of a PersistentVolume with the volume's capacity",
        || {
            let all = read_applied();
            match all.last() {
                Some(last)
                    if last.contains("capacity-source: \"gluster volume status detail\"") =>
                {
                    Ok(all)
                }
                Some(last) => Err(format!("last applied:\n{last}")),
                None => Err("nothing applied yet".into()),
            }
        },
    );
    let applied = manifests.last().expect("one at least").clone();
    clock.say(format!(
        "step 3: kubectl on b1 read {} manifest(s), the last {} after the apply",
        manifests.len(),
        secs(t1.elapsed())
    ));
    let calls = parse_kubectl_calls(
        &bed.read_file(b1, KUBECTL_CALLS_LOG)
            .expect("the stand-in kubectl's call log"),
    )
    .expect("parse the kubectl calls");
    let applies: Vec<_> = calls
        .iter()
        .filter(|c| c.argv.iter().any(|a| a == "apply"))
        .collect();
    eprintln!("kubectl calls on b1: {calls:#?}\nlast applied manifest:\n{applied}");
    assert_eq!(
        applies.len(),
        manifests.len(),
        "one kubectl apply per manifest: {calls:#?}"
    );
    for a in &applies {
        assert_eq!(
            a.argv,
            [
                "--kubeconfig",
                "/etc/kubernetes/admin.conf",
                "apply",
                "-f",
                "-"
            ]
        );
    }
    for m in &manifests {
        assert_eq!(affinity(m), ["w1", "w2"], "node affinity:\n{m}");
    }
    for line in [
        "kind: PersistentVolume",
        "  name: gluster-data",
        "    - ReadWriteMany",
        &format!("    path: {POINT}"),
        "            - key: kubernetes.io/hostname",
    ] {
        assert!(
            applied.lines().any(|l| l == line),
            "no {line:?} in\n{applied}"
        );
    }
    // The capacity against the bricks' file system, measured here (gluster
    // prints one decimal of its unit).
    let storage: u64 = applied
        .lines()
        .find_map(|l| l.trim().strip_prefix("storage: "))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no storage in bytes:\n{applied}"));
    let df = b1.sh(&format!("df -B1 --output=size {BRICK} | tail -1"));
    let disk: u64 = df.trim().parse().expect("df size");
    let off = storage.abs_diff(disk) as f64 / disk as f64;
    clock.say(format!(
        "PV capacity {storage} bytes; the bricks' file system {disk} bytes ({:.2}% apart)",
        off * 100.0
    ));
    assert!(off < 0.05, "capacity {storage} vs the bricks' {disk}");
    let printed = bed.ctl_ok(&["gluster", "pv", VOLUME]).stdout;
    assert_eq!(
        printed, applied,
        "stewardctl gluster pv prints what was applied"
    );
    let json: Value =
        serde_json::from_str(&bed.ctl_ok(&["gluster", "pv", VOLUME, "-o", "json"]).stdout)
            .expect("gluster pv -o json");
    assert_eq!(json["nodes"], serde_json::json!(["w1", "w2"]));
    let missing = bed.cluster.ctl(&["gluster", "pv", "nope"]);
    assert!(
        !missing.ok() && missing.stderr.contains("unknown Gluster volume"),
        "{missing:?}"
    );
    let operator = bed.settled(
        &findings,
        "b1",
        BOUND,
        has_settled(&["command:gluster-pv-data"]),
    );
    eprintln!(
        "b1: {}",
        resource(&operator, "command:gluster-pv-data").expect("the PV task")
    );

    // ---- 4. b1 goes silent: the workers keep reading and writing
    let clients: Vec<Option<u32>> = WORKERS
        .iter()
        .map(|w| fuse_client(&bed, bed.machine(w)).map(|(pid, _)| pid))
        .collect();
    b1.link_down();
    let t4 = Instant::now();
    clock.say("step 4: b1 (brick, first volfile server) cable pulled");
    for (i, w) in WORKERS.iter().enumerate() {
        let m = bed.machine(w);
        let name = format!("silent-{w}.txt");
        // The first call waits out GlusterFS's ping timeout (42 s).
        let took = write_and_read(m, &name, &format!("from-{w}"), Duration::from_secs(120));
        clock.say(format!(
            "{w}: wrote and read {name} in {} with b1 silent",
            secs(took)
        ));
        let other = bed.machine(WORKERS[1 - i]);
        let (r, took) = read(other, &name, Duration::from_secs(120));
        assert_eq!(r, Ok(format!("from-{w}")), "{} reads {name}", other.name());
        clock.say(format!("{}: read {name} in {}", other.name(), secs(took)));
    }
    for w in WORKERS {
        let took = write_and_read(bed.machine(w), "again.txt", w, Duration::from_secs(10));
        clock.say(format!("{w}: a second write and read took {}", secs(took)));
    }
    for b in ["b2", "b3"] {
        assert_eq!(
            brick_file(bed.machine(b), "silent-w2.txt").as_deref(),
            Some("from-w2")
        );
    }
    assert_eq!(brick_file(b1, "silent-w2.txt"), None, "b1 was silent");
    let after: Vec<Option<u32>> = WORKERS
        .iter()
        .map(|w| fuse_client(&bed, bed.machine(w)).map(|(pid, _)| pid))
        .collect();
    assert_eq!(
        after, clients,
        "a worker's mount was remounted while a brick node was silent"
    );
    clock.say(format!(
        "both workers kept reading and writing with b1 silent ({} in all)",
        secs(t4.elapsed())
    ));

    // ---- 5. a hung FUSE client is found and remounted
    let (frozen, cmd) = fuse_client(&bed, w2).expect("w2's FUSE client");
    eprintln!("w2 FUSE client: {frozen} {cmd}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(frozen as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP w2's FUSE client");
    let t5 = Instant::now();
    clock.say(format!("step 5: w2's FUSE client (pid {frozen}) frozen"));
    let remounted = poll(
        // Two probes of 60 s without an answer, and the retry between.
        Duration::from_secs(300),
        Duration::from_secs(1),
        "w2: a new FUSE client serving the mount",
        || {
            let all = fuse_clients(&bed, w2);
            match all.iter().find(|(pid, _)| *pid != frozen) {
                Some((pid, _)) => Ok(*pid),
                None => Err(format!("clients {all:?}")),
            }
        },
    );
    clock.say(format!(
        "w2: remounted by the agent (new client pid {remounted}) {} after the freeze",
        secs(t5.elapsed())
    ));
    let (r, took) = read(w2, "one.txt", Duration::from_secs(120));
    assert_eq!(r.as_deref(), Ok("one"), "w2 reads through the new mount");
    poll(
        Duration::from_secs(10),
        Duration::from_millis(200),
        "w2: the frozen client ended by the agent",
        || match fuse_clients(&bed, w2)
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>()
        {
            // The mount helper's first process forks the daemon: compare
            // with the frozen one, not the first new pid seen.
            pids if pids.len() == 1 && pids[0] != frozen => Ok(()),
            pids => Err(format!("clients {pids:?}")),
        },
    );
    clock.say(format!(
        "w2: one.txt read through the new mount in {}",
        secs(took)
    ));
    let journal = w2.journal(AGENT_UNIT);
    let said = journal
        .lines()
        .filter(|l| l.contains("remounting"))
        .collect::<Vec<_>>();
    assert!(
        !said.is_empty(),
        "w2's agent did not log the remount:\n{journal}"
    );
    eprintln!("w2 agent: {}", said.join("\n"));
    // What the report said about it (a changed resource, then ok again).
    let report = bed.node_json("w2").expect("node show w2");
    eprintln!(
        "w2: {}",
        resource(&report["converge"], "mount-check:/mnt/steward/gluster/data")
            .cloned()
            .unwrap_or_default()
    );

    // ---- 6. b1 back; the agent restarted on w1 leaves the mount alone
    b1.link_up();
    let (client, _) = fuse_client(&bed, w1).expect("w1's FUSE client");
    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    w1.sh(&format!("systemctl restart {AGENT_UNIT}"));
    let t6 = Instant::now();
    clock.say(format!("step 6: b1 back; {AGENT_UNIT} restarted on w1"));
    // A report of the restarted agent's own run.
    let report = bed.settled(&findings, "w1", BOUND, |r| {
        has_settled(MOUNT_RESOURCES)(r)?;
        match r["finished"].as_u64() {
            Some(t) if t > restarted_ms => Ok(()),
            other => Err(format!(
                "last run finished at {other:?}, before the restart"
            )),
        }
    });
    clock.say(format!(
        "w1: agent back and converged in {} ({})",
        secs(t6.elapsed()),
        report["counts"]
    ));
    assert_eq!(
        fuse_client(&bed, w1).map(|(pid, _)| pid),
        Some(client),
        "the agent's restart replaced w1's FUSE client"
    );
    let mount_check = resource(&report, "mount-check:/mnt/steward/gluster/data").unwrap();
    assert_eq!(mount_check["status"], "ok", "{mount_check}");
    let (r, _) = read(w1, "one.txt", Duration::from_secs(30));
    assert_eq!(r.as_deref(), Ok("one"));

    // ---- 7. the spec drops the volume; open files keep w2's mount
    let holder = "steward-test-holder";
    w2.sh(&format!(
        "systemd-run --unit={holder} sh -c 'exec 3<{POINT}/one.txt; exec sleep 600'"
    ));
    poll(
        Duration::from_secs(10),
        Duration::from_millis(200),
        "w2: the holder has one.txt open",
        || {
            // Seen from inside: the mount is in the machine's namespace.
            let out = w2.exec(&[
                "sh",
                "-c",
                &format!(
                    "pid=$(systemctl show -p MainPID --value {holder}); readlink /proc/$pid/fd/3"
                ),
            ]);
            let link = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if link == format!("{POINT}/one.txt") {
                Ok(())
            } else {
                Err(format!("fd 3: {link:?}"))
            }
        },
    );
    let out = bed.apply_spec(&spec(&vip, false));
    let t7 = Instant::now();
    clock.say(format!(
        "step 7: volume {VOLUME} dropped from the spec (a process on w2 holds a file open):\n{}",
        out.stdout.trim()
    ));
    poll(
        BOUND,
        Duration::from_secs(1),
        "w1: unmounted",
        || match mounted(w1) {
            None => Ok(()),
            Some(s) => Err(format!("still mounted: {s}")),
        },
    );
    assert!(
        bed.read_file(w1, &format!("/etc/systemd/system/{UNIT}"))
            .is_none(),
        "w1: the mount unit is still there"
    );
    clock.say(format!(
        "w1: unmounted and its unit removed in {}",
        secs(t7.elapsed())
    ));
    let refused = poll(
        BOUND,
        Duration::from_secs(1),
        "w2: the removal refused in its report",
        || {
            let view = bed.node_json("w2")?;
            let r = resource(&view["converge"], "stale-mounts:gluster")
                .cloned()
                .ok_or("no stale-mounts:gluster yet")?;
            if r["status"] == "failed" && r["detail"].as_str().unwrap_or("").contains("open") {
                Ok(r)
            } else {
                Err(format!("{r}"))
            }
        },
    );
    clock.say(format!("w2: {}", refused["detail"]));
    assert!(
        refused["detail"].as_str().unwrap_or("").contains("sleep"),
        "the reason names the process: {refused}"
    );
    assert!(mounted(w2).is_some(), "w2 unmounted under an open file");
    let view = bed.node_json("w2").expect("node show w2");
    let held_up: Vec<&Value> = report_resources(&view["converge"])
        .into_iter()
        .filter(|r| r["status"] == "skipped")
        .collect();
    assert!(
        held_up.is_empty(),
        "the refused unmount holds up other resources: {held_up:?}"
    );
    eprintln!(
        "---- stewardctl node show w2 ----\n{}",
        bed.node_table("w2")
    );
    w2.sh(&format!("systemctl stop {holder}"));
    poll(
        BOUND,
        Duration::from_secs(1),
        "w2: unmounted",
        || match mounted(w2) {
            None => Ok(()),
            Some(s) => Err(format!("still mounted: {s}")),
        },
    );
    let report = bed.settled(&findings, "w2", BOUND, |r| {
        match resource(r, "stale-mounts:gluster") {
            Some(x) if x["status"] == "ok" || x["status"] == "changed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(
        !Path::new(&w2.root().join(format!("etc/systemd/system/{UNIT}"))).exists(),
        "w2: the unit is still there"
    );
    clock.say(format!(
        "w2: unmounted once the file was closed, {} after the apply ({})",
        secs(t7.elapsed()),
        report["counts"]
    ));
    findings.assert_none();
}
