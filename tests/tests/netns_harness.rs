//! The network-namespace harness itself (`steward_tests::netns`): real
//! namespaces on a real bridge, real TCP between them, `http-backend` and
//! `vip-client`. Needs root. Tests run in parallel, each on its own wire.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use steward_tests::netns::{run_client, AddressWatch, ClientRun, Host, TestNet};
use steward_tests::{bin, eventually, Proc};

const PORT: u16 = 8080;

fn backend(host: &Host, dir: &Path) -> Proc {
    let mut cmd = host.command(bin("http-backend"));
    cmd.arg("--listen")
        .arg(format!("{}:{PORT}", host.ip()))
        .arg("--name")
        .arg(host.name());
    Proc::spawn(
        &format!("http-backend {}", host.name()),
        cmd,
        dir.join(format!("{}.log", host.name())),
    )
}

/// One GET from the test process (root namespace); the body if 200.
fn get(ip: Ipv4Addr) -> Option<String> {
    let addr = SocketAddr::from((ip, PORT));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200 OK").then(|| body.to_owned())
}

fn wait_serving(host: &Host) {
    eventually(Duration::from_secs(5), "the backend to answer", || {
        get(host.ip())
    });
}

fn target(host: &Host) -> SocketAddrV4 {
    SocketAddrV4::new(host.ip(), PORT)
}

fn all_ok_from(client: &Host, server: &Host, duration: Duration) -> bool {
    let r = run_client(client, target(server), duration);
    r.requests > 0 && r.failed == 0
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("steward-netns-")
        .tempdir()
        .expect("tempdir")
}

#[test]
fn hosts_reach_each_other_and_the_root_namespace() {
    let dir = tempdir();
    let mut net = TestNet::new("reach");
    let a = net.add_host("a");
    let b = net.add_host("b");
    assert_eq!(a.ip(), net.addr(10));
    assert_eq!(b.ip(), net.addr(11));
    assert_eq!(a.iface(), "eth0");
    let _backend = backend(&a, dir.path());

    // The test process (root namespace, the gateway .1) reaches A.
    wait_serving(&a);
    assert_eq!(get(a.ip()).as_deref(), Some("a\n"));

    let started = Instant::now();
    let report = run_client(&b, target(&a), Duration::from_secs(1));
    let took = started.elapsed();
    assert!(report.requests >= 20, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.longest_outage_ms, 0.0, "{report:?}");
    assert!(report.outages.is_empty(), "{report:?}");
    assert!(report.recovered() && report.longest_outage().is_zero());
    assert_eq!(
        report.backends,
        BTreeMap::from([("a".to_owned(), report.requests)])
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "the client is bounded: {took:?}"
    );

    // A host reaches the gateway too (the test process listens there).
    let listener = std::net::TcpListener::bind((net.gateway(), 0)).expect("bind gateway");
    let port = listener.local_addr().expect("addr").port();
    let script = format!("exec 3<>/dev/tcp/{}/{port}", net.gateway());
    b.run("bash", &["-c", &script]);
    let (_, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(b.ip()));
}

#[test]
fn hosts_have_no_default_route() {
    let mut net = TestNet::new("routes");
    let a = net.add_host("a");
    assert_eq!(a.iproute(&["route", "show", "default"]).trim(), "");
    let routes = a.iproute(&["-4", "route", "show"]);
    let routes: Vec<&str> = routes.lines().collect();
    assert_eq!(routes.len(), 1, "only the connected /24: {routes:?}");
    assert!(routes[0].starts_with(&net.subnet()), "{routes:?}");
    assert!(a.has_address(a.ip()));
    assert!(!a.has_address(net.addr(200)));
}

#[test]
fn block_cuts_tcp_both_ways_until_unblocked() {
    let dir = tempdir();
    let mut net = TestNet::new("block");
    let a = net.add_host("a");
    let b = net.add_host("b");
    let _ba = backend(&a, dir.path());
    let _bb = backend(&b, dir.path());
    wait_serving(&a);
    wait_serving(&b);
    assert!(all_ok_from(&b, &a, Duration::from_millis(100)));

    b.block(a.ip());
    let report = run_client(&b, target(&a), Duration::from_millis(500));
    assert!(report.requests > 0, "{report:?}");
    assert_eq!(report.failed, report.requests, "B -> A: {report:?}");
    assert_eq!(report.outages.len(), 1, "{report:?}");
    // A's packets reach B, but B's answers are blackholed.
    let report = run_client(&a, target(&b), Duration::from_millis(500));
    assert_eq!(report.failed, report.requests, "A -> B: {report:?}");
    // The root namespace is not affected.
    assert_eq!(get(b.ip()).as_deref(), Some("b\n"));

    b.unblock(a.ip());
    eventually(Duration::from_secs(5), "B to reach A again", || {
        all_ok_from(&b, &a, Duration::from_millis(100)).then_some(())
    });
    assert!(all_ok_from(&a, &b, Duration::from_millis(100)));
}

#[test]
fn link_down_takes_a_host_off_the_wire() {
    let dir = tempdir();
    let mut net = TestNet::new("link");
    let a = net.add_host("a");
    let b = net.add_host("b");
    let _backend = backend(&a, dir.path());
    wait_serving(&a);
    assert!(all_ok_from(&b, &a, Duration::from_millis(100)));

    a.link_down();
    let report = run_client(&b, target(&a), Duration::from_millis(500));
    assert!(report.requests > 0, "{report:?}");
    assert_eq!(report.failed, report.requests, "{report:?}");
    assert!(get(a.ip()).is_none(), "the root namespace reaches A");
    assert!(a.has_address(a.ip()), "A keeps its address off the wire");
    a.link_up();
    eventually(Duration::from_secs(5), "B to reach A again", || {
        all_ok_from(&b, &a, Duration::from_millis(100)).then_some(())
    });

    // A fault injected while a client runs: one outage of about its length.
    let run = ClientRun::start(&b, target(&a), Duration::from_millis(2500));
    std::thread::sleep(Duration::from_millis(700));
    a.link_down();
    std::thread::sleep(Duration::from_millis(1000));
    a.link_up();
    let report = run.finish();
    eprintln!("client across a 1 s cable pull: {report:?}");
    assert!(report.failed > 0, "{report:?}");
    assert!(report.failed < report.requests, "{report:?}");
    assert!(report.recovered(), "{report:?}");
    assert_eq!(report.outages.len(), 1, "{report:?}");
    let (start, end) = report.outages[0];
    assert!(
        (800.0..2000.0).contains(&report.longest_outage_ms),
        "outage {start}..{end}: {report:?}"
    );
    assert!(
        (500.0..1200.0).contains(&start) && end < 2500.0,
        "recovered before the end: {report:?}"
    );
}

#[test]
fn address_watch_sees_who_holds_an_address() {
    let mut net = TestNet::new("watch");
    let a = net.add_host("a");
    let b = net.add_host("b");
    let vip = net.addr(200);
    let vip_cidr = format!("{vip}/32");
    let watch = AddressWatch::start(&[a.clone(), b.clone()], vip);
    assert!(watch.holders_now().is_empty());
    assert!(watch.events().is_empty());

    a.iproute(&["addr", "add", &vip_cidr, "dev", "eth0"]);
    eventually(Duration::from_secs(2), "A to hold the address", || {
        (watch.holders_now() == ["a"]).then_some(())
    });
    assert!(a.has_address(vip) && !b.has_address(vip));

    let before_b = Instant::now();
    b.iproute(&["addr", "add", &vip_cidr, "dev", "eth0"]);
    std::thread::sleep(Duration::from_millis(200));
    a.iproute(&["addr", "del", &vip_cidr, "dev", "eth0"]);
    eventually(
        Duration::from_secs(2),
        "B alone to hold the address",
        || (watch.holders_now() == ["b"]).then_some(()),
    );

    let dual = watch.dual_holder_time();
    eprintln!("dual holding measured: {dual:?}");
    assert!(
        dual >= Duration::from_millis(150) && dual < Duration::from_millis(1500),
        "dual holding {dual:?}"
    );
    assert_eq!(watch.max_holders(), 2);
    let first = watch.first_change_after(before_b).expect("a change");
    assert_eq!((first.host.as_str(), first.added), ("b", true));
    let timeline: Vec<(String, bool)> = watch
        .events()
        .into_iter()
        .map(|e| (e.host, e.added))
        .collect();
    assert_eq!(
        timeline,
        [
            ("a".to_owned(), true),
            ("b".to_owned(), true),
            ("a".to_owned(), false)
        ]
    );

    // A watch started later takes a snapshot.
    let later = AddressWatch::start(&[a.clone(), b.clone()], vip);
    assert_eq!(later.holders_now(), ["b"]);
    assert_eq!(later.dual_holder_time(), Duration::ZERO);
}

#[test]
fn nets_are_separate() {
    let dir = tempdir();
    let mut one = TestNet::new("one");
    let mut two = TestNet::new("two");
    assert_ne!(one.subnet(), two.subnet());
    let x = one.add_host("x");
    let y = two.add_host("y");
    let _backend = backend(&y, dir.path());
    wait_serving(&y);
    let report = run_client(&x, target(&y), Duration::from_millis(100));
    assert_eq!(report.failed, report.requests, "{report:?}");
}

#[test]
fn dropping_a_net_removes_what_it_created() {
    let mut net = TestNet::new("drop");
    net.add_host("a");
    net.add_host("b");
    let namespaces = net.namespaces();
    let iface = net.root_iface().to_owned();
    let subnet = net.subnet();
    assert_eq!(namespaces.len(), 3);
    let list = netns_list();
    assert!(namespaces.iter().all(|n| list.contains(n)), "{list:?}");
    drop(net);

    let list = netns_list();
    assert!(
        namespaces.iter().all(|n| !list.contains(n)),
        "left behind: {list:?}"
    );
    let show = Command::new("ip")
        .args(["link", "show", &iface])
        .output()
        .expect("ip");
    assert!(!show.status.success(), "{iface} still exists");
    let routes = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .expect("ip");
    let routes = String::from_utf8_lossy(&routes.stdout);
    let prefix = subnet.trim_end_matches(".0/24");
    assert!(
        !routes.contains(&format!("{prefix}.")),
        "routes left: {routes}"
    );
}

#[test]
fn leftovers_of_dead_test_processes_are_removed() {
    // A pid that no longer exists.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    assert!(!Path::new(&format!("/proc/{dead}")).exists());
    let stale = [format!("stw-{dead}-0"), format!("stw-{dead}-0-lb1")];
    // Ours (a live pid) must be left alone.
    let live = format!("stw-{}-999999-keep", std::process::id());
    ip(&["netns", "add", &live]);
    for ns in &stale {
        // Another test process's TestNet::new may remove it at once (it
        // is stale for everyone): that is fine, only "gone" matters.
        let _ = Command::new("ip").args(["netns", "add", ns]).output();
    }

    let _net = TestNet::new("stale");
    let list = netns_list();
    let _ = Command::new("ip").args(["netns", "del", &live]).output();
    assert!(stale.iter().all(|n| !list.contains(n)), "{list:?}");
    assert!(list.contains(&live), "{list:?}");
}

#[test]
fn binaries_reject_bad_arguments() {
    for (name, args) in [
        (
            "vip-client",
            &["--target", "nope", "--duration-ms", "1"][..],
        ),
        ("vip-client", &["--duration-ms", "1"][..]),
        (
            "vip-client",
            &["--target", "127.0.0.1:1", "--duration-ms", "x"][..],
        ),
        ("http-backend", &["--listen", "127.0.0.1:1"][..]),
        ("http-backend", &["--bogus"][..]),
    ] {
        let out = Command::new(bin(name)).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage:"),
            "{name} {args:?}"
        );
    }
    // Nothing listens on port 1: every request fails, the run still ends.
    let out = Command::new(bin("vip-client"))
        .args(["--target", "127.0.0.1:1", "--duration-ms", "50"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let report = steward_tests::netns::ClientReport::parse(&String::from_utf8_lossy(&out.stdout));
    assert!(report.requests >= 1 && report.failed == report.requests);
    assert!(!report.recovered());
    assert_eq!(report.outages[0].1, report.duration_ms);
    assert_eq!(report.outages.len(), 1);
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn netns_list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}
