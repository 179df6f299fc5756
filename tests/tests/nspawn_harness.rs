//! The nspawn harness itself (`steward_tests::nspawn`): machines booting
//! real systemd on a `TestNet`'s bridge, a real `apt-get` from the local
//! repository with no network, packages built by the test, cleanup. Needs
//! root. The first run builds the base image and the repository (a few
//! minutes, cached in `$STEWARD_TEST_CACHE`, default
//! /var/cache/steward-tests).

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use steward_tests::netns::TestNet;
use steward_tests::nspawn::{build_deb, index_repo, mounts_under, Machine, MachineOptions};

fn boot(net: &TestNet, name: &str) -> Machine {
    Machine::boot(net, name, MachineOptions::default())
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("steward-nspawn-test-")
        .tempdir()
        .expect("tempdir")
}

/// One echo request, answered within `wait_s`.
fn ping(from: &Machine, to: Ipv4Addr, wait_s: u32) -> bool {
    from.exec(&[
        "ping",
        "-c",
        "1",
        "-W",
        &wait_s.to_string(),
        &to.to_string(),
    ])
    .status
    .success()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A process has exited (gone, or a zombie not reaped yet).
fn gone(pid: u32) -> bool {
    fs_stat(pid).is_none_or(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn fs_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

#[test]
fn machines_boot_systemd_and_share_the_wire_with_netns_hosts() {
    let mut net = TestNet::new("nspawn-wire");
    let host = net.add_host("ns");
    let a = boot(&net, "a");
    let b = boot(&net, "b");

    let subnet_route = |m: &Machine| {
        format!(
            "{} dev host0 proto kernel scope link src {}",
            net.subnet(),
            m.ip()
        )
    };
    for m in [&a, &b] {
        assert_eq!(m.sh("cat /proc/1/comm").trim(), "systemd");
        assert_eq!(
            m.sh("systemctl is-system-running").trim(),
            "running",
            "{}: {}",
            m.name(),
            m.sh("systemctl --failed --no-pager")
        );
        assert_eq!(m.sh("cat /proc/sys/kernel/hostname").trim(), m.name());
        // Only the wire: no default route, one route for the subnet.
        assert_eq!(m.sh("ip -4 route show default"), "");
        assert_eq!(m.sh("ip -4 route").trim(), subnet_route(m));
    }
    // Machines count down from .199, netns hosts up from .10.
    assert_eq!(host.ip(), net.addr(10));
    assert_eq!((a.ip(), b.ip()), (net.addr(199), net.addr(198)));
    assert_ne!(
        a.sh("cat /etc/machine-id"),
        b.sh("cat /etc/machine-id"),
        "each machine must have its own machine id"
    );

    assert!(ping(&a, b.ip(), 5), "a cannot reach b");
    assert!(ping(&b, a.ip(), 5), "b cannot reach a");
    assert!(ping(&a, host.ip(), 5), "a cannot reach the netns host");
    assert!(ping(&b, net.gateway(), 5), "b cannot reach the gateway");
    // TCP to a listener of the test process on the gateway: how agents
    // inside will reach coordinators.
    let listener = TcpListener::bind((net.gateway(), 0)).expect("listen on the gateway");
    let port = listener.local_addr().expect("addr").port();
    a.sh(&format!(
        "bash -c 'echo hello-from-a > /dev/tcp/{}/{port}'",
        net.gateway()
    ));
    let (mut conn, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), a.ip());
    let mut got = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.read_to_string(&mut got).expect("read");
    assert_eq!(got, "hello-from-a\n");
}

#[test]
fn apt_installs_haproxy_from_the_local_repository() {
    let net = TestNet::new("nspawn-apt");
    let m = boot(&net, "lb");
    assert_eq!(
        m.sh("cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -v '^#'"),
        "deb [trusted=yes] file:/srv/repo ./\n",
        "the machine's only apt source must be the local repository"
    );
    m.sh("apt-get update");
    assert_eq!(
        stdout(&m.exec(&["systemctl", "is-active", "haproxy"])),
        "inactive"
    );
    m.sh("apt-get install -y haproxy");
    let state = stdout(&m.exec(&["systemctl", "is-active", "haproxy"]));
    assert_eq!(state, "active", "haproxy:\n{}", m.journal("haproxy"));
    // The repository holds the gluster-brick role's packages too, with
    // every dependency the base lacks.
    m.sh("apt-get install --simulate -y glusterfs-server glusterfs-client");
}

#[test]
fn a_built_deb_installs_from_an_extra_repository() {
    let net = TestNet::new("nspawn-deb");
    let debs = tempdir();
    let hello = |version: &str| {
        let script =
            format!("#!/bin/sh\necho \"hello {version} from $(cat /proc/sys/kernel/hostname)\"\n");
        build_deb(
            debs.path(),
            "steward-hello",
            version,
            &[
                ("usr/bin/steward-hello", script.as_bytes(), 0o755),
                ("etc/steward-hello.conf", b"greeting=hi\n", 0o640),
                (
                    "DEBIAN/postinst",
                    b"#!/bin/sh\nset -e\ntouch /var/lib/steward-hello.installed\n",
                    0o755,
                ),
            ],
            "Section: admin\n",
        )
    };
    hello("1.0");
    let shared = tempdir();
    std::fs::write(shared.path().join("from-host"), "x").expect("write");
    let m = Machine::boot(
        &net,
        "app",
        MachineOptions::default()
            .extra_repo(debs.path())
            .bind_ro(shared.path(), "/mnt/shared")
            .env("STEWARD_TEST_MARK", "42"),
    );

    m.sh("apt-get update && apt-get install -y steward-hello");
    assert_eq!(m.sh("steward-hello").trim(), "hello 1.0 from app");
    assert_eq!(m.sh("stat -c %a /etc/steward-hello.conf").trim(), "640");
    m.sh("test -e /var/lib/steward-hello.installed");

    // A newer version added while the machine runs: re-index, upgrade.
    hello("1.1");
    index_repo(debs.path());
    m.sh("apt-get update && apt-get install -y steward-hello");
    assert_eq!(m.sh("steward-hello").trim(), "hello 1.1 from app");

    // The options' bind (read-only) and environment.
    assert_eq!(m.sh("cat /mnt/shared/from-host"), "x");
    assert!(!m.exec(&["touch", "/mnt/shared/new"]).status.success());
    assert_eq!(m.sh("echo $STEWARD_TEST_MARK").trim(), "42");
    assert!(
        m.sh("systemctl show-environment")
            .contains("STEWARD_TEST_MARK=42"),
        "services must see the options' environment"
    );
}

#[test]
fn build_deb_writes_fields_paths_and_modes() {
    let dir = tempdir();
    let deb = build_deb(
        dir.path(),
        "x-test",
        "2.3-1",
        &[
            ("usr/lib/x-test/run", b"#!/bin/sh\n", 0o750),
            ("etc/x-test.conf", b"a=1\n", 0o600),
        ],
        "Depends: haproxy (>= 2)",
    );
    assert_eq!(deb, dir.path().join("x-test_2.3-1_all.deb"));
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb)
            .arg(name)
            .output()
            .expect("dpkg-deb");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "x-test");
    assert_eq!(field("Version"), "2.3-1");
    assert_eq!(field("Architecture"), "all");
    assert_eq!(field("Depends"), "haproxy (>= 2)");
    let out = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    let listing = String::from_utf8_lossy(&out.stdout);
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(entry("./usr/lib/x-test/run"), "-rwxr-x--- root/root");
    assert_eq!(entry("./etc/x-test.conf"), "-rw------- root/root");
    assert_eq!(entry("./usr/lib/x-test/"), "drwxr-xr-x root/root");
}

#[test]
fn kill_poweroff_and_drop_leave_nothing_behind() {
    let net = TestNet::new("nspawn-cleanup");
    let switch_ns = net.namespaces()[0].clone();
    let mut a = boot(&net, "a");
    let mut b = boot(&net, "b");
    let c = boot(&net, "c");

    struct Trace {
        dir: PathBuf,
        machine: String,
        pids: Vec<u32>,
    }
    let trace = |m: &Machine| Trace {
        dir: m.root().parent().expect("machine dir").to_path_buf(),
        machine: m.machine_name().to_owned(),
        pids: vec![
            m.nspawn_pid().expect("nspawn runs"),
            m.leader_pid().expect("systemd runs"),
        ],
    };
    let traces: Vec<Trace> = [&a, &b, &c].into_iter().map(trace).collect();
    for t in &traces {
        assert_eq!(mounts_under(&t.dir), vec![t.dir.join("root")]);
        // Each machine in a cgroup of its own, in every hierarchy.
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", t.pids[1]))
            .expect("leader's cgroups");
        assert!(
            cgroups.lines().all(|l| l.contains(&t.machine)),
            "{} shares cgroups:\n{cgroups}",
            t.machine
        );
    }

    // A crash takes the whole container at once; its files stay readable.
    b.kill();
    assert!(traces[1].pids.iter().all(|p| gone(*p)), "b still runs");
    assert!(!ping(&a, b.ip(), 1), "a still reaches the killed b");
    assert_eq!(
        std::fs::read_to_string(b.root().join("etc/hostname")).expect("b's hostname file"),
        "b\n"
    );

    // A clean shutdown.
    let status = a.poweroff();
    assert!(
        status.success(),
        "nspawn exited with {status} after poweroff"
    );
    assert!(traces[0].pids.iter().all(|p| gone(*p)), "a still runs");

    drop((a, b, c));
    for t in &traces {
        assert!(t.pids.iter().all(|p| gone(*p)), "{} runs on", t.machine);
        assert_eq!(
            processes_mentioning(&t.machine),
            Vec::<u32>::new(),
            "processes of {} remain",
            t.machine
        );
        assert_eq!(mounts_under(&t.dir), Vec::<PathBuf>::new());
        assert!(!t.dir.exists(), "{} remains", t.dir.display());
        let propagate = Path::new("/run/systemd/nspawn/propagate").join(&t.machine);
        assert!(!propagate.exists(), "{} remains", propagate.display());
        let cgroups = Command::new("find")
            .args(["/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-name"])
            .arg(&t.machine)
            .output()
            .expect("find");
        assert_eq!(
            String::from_utf8_lossy(&cgroups.stdout),
            "",
            "cgroups of {} remain",
            t.machine
        );
    }
    let links = Command::new("ip")
        .args(["-n", &switch_ns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("vb-"),
        "machine veths remain on the bridge:\n{links}"
    );
}
