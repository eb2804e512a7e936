//! The real datapath against the kernel, as root, in a throwaway network namespace.
//!
//! The tests are `#[ignore]`d in a plain `cargo test`. `scripts/test.sh` runs them
//! with `--ignored` under `unshare --net --mount`, setting `WEFT_PRIVATE_NETNS=1` and
//! `WEFT_OUTER_NETNS` to the namespace it left; they refuse to run anywhere else.

use std::net::Ipv4Addr;
use std::process::Command;

use weft::datapath::netlink::NetlinkDatapath;
use weft::datapath::{Datapath, DatapathError, DesiredState, EndpointSpec, NetworkSpec};
use weft::ports::{Proto, Published};

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("sh runs")
        .success()
}

fn assert_private_netns() {
    assert_eq!(
        std::env::var("WEFT_PRIVATE_NETNS").as_deref(),
        Ok("1"),
        "run through scripts/test.sh, which provides a private network namespace"
    );
    // The runner records the namespace it started in; this must be another one.
    let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
    let outer =
        std::env::var("WEFT_OUTER_NETNS").expect("WEFT_OUTER_NETNS is set with WEFT_PRIVATE_NETNS");
    assert_ne!(
        mine.to_string_lossy(),
        outer,
        "refusing to touch the machine's own network namespace"
    );
}

fn ep(n: u8) -> EndpointSpec {
    EndpointSpec {
        host_if: format!("wfhaaaaaaaaaa{n:02}"),
        container_if: format!("wfcaaaaaaaaaa{n:02}"),
        address: Ipv4Addr::new(10, 77, 0, n),
        mtu: 8920,
    }
}

fn desired() -> DesiredState {
    DesiredState {
        networks: vec![NetworkSpec {
            subnet: "10.77.0.0/16".parse().unwrap(),
            gateway: Some("10.77.0.1".parse().unwrap()),
            internal: false,
            host_access: false,
        }],
        published: Default::default(),
    }
}

/// Sandbox namespaces of this test, deleted when it ends (also on failure).
struct Sandboxes(Vec<String>);

impl Sandboxes {
    fn name(&mut self, tag: &str) -> String {
        let ns = format!("wefttest-{}-{tag}", std::process::id());
        self.0.push(ns.clone());
        ns
    }
}

impl Drop for Sandboxes {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Plays Docker's part: moves the container end into a namespace and configures it.
fn plug_into_sandbox(e: &EndpointSpec, ns: &str) {
    sh(&format!("ip netns add {ns}"));
    sh(&format!("ip link set {} netns {ns}", e.container_if));
    sh(&format!(
        "ip -n {ns} link set lo up && ip -n {ns} link set {c} name eth0 && ip -n {ns} addr add {a}/16 dev eth0 && \
         ip -n {ns} link set eth0 up && ip -n {ns} route add default via 10.77.0.1",
        c = e.container_if,
        a = e.address
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root in a private netns: scripts/test.sh runs it with --ignored"]
async fn the_routed_datapath_works_end_to_end_and_cleans_up() {
    assert_private_netns();
    sh(
        "ip link set lo up && ip link add up0 type bridge && ip link set up0 mtu 9000 up && \
        ip addr add 192.0.2.2/24 dev up0 && ip route add default via 192.0.2.1 dev up0 onlink",
    );
    let dp = NetlinkDatapath::connect("/proc/sys/net").unwrap();
    assert_eq!(
        dp.underlay_mtu().await.unwrap(),
        9000,
        "MTU of the default route's link"
    );
    assert!(dp
        .host_routes()
        .await
        .unwrap()
        .contains(&"192.0.2.0/24".parse().unwrap()));

    let (a, b) = (ep(2), ep(3));
    for e in [&a, &b] {
        dp.setup_endpoint(e).await.unwrap();
        dp.setup_endpoint(e).await.unwrap(); // idempotent
    }
    dp.sync(&desired()).await.unwrap();
    dp.sync(&desired()).await.unwrap();

    // Both ends carry the MTU before Docker takes the container end; the host end is up.
    assert!(sh(&format!("ip -o link show {}", a.host_if)).contains("mtu 8920"));
    assert!(sh(&format!("ip -o link show {}", a.host_if)).contains(",UP"));
    assert!(sh(&format!("ip -o link show {}", a.container_if)).contains("mtu 8920"));
    assert_eq!(
        sh(&format!(
            "cat /proc/sys/net/ipv4/conf/{}/proxy_arp",
            a.host_if
        ))
        .trim(),
        "1"
    );
    assert_eq!(sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    assert!(sh("ip route show proto 87").contains("10.77.0.2 dev wfhaaaaaaaaaa02"));
    assert!(sh("ip route show proto 87").contains("unreachable 10.77.0.0/16"));
    assert!(sh("ip -o addr show dev weft-gw").contains("10.77.0.1/32"));
    assert!(sh("nft list table inet weft").contains("fib saddr . iif oif missing drop"));
    assert!(sh("iptables -S FORWARD").contains("-j WEFT-FORWARD"));

    // Two "containers" reach each other and the gateway through the host, by proxy ARP.
    let mut sandboxes = Sandboxes(Vec::new());
    let (sa, sb) = (sandboxes.name("a"), sandboxes.name("b"));
    plug_into_sandbox(&a, &sa);
    plug_into_sandbox(&b, &sb);
    assert!(
        ok(&format!(
            "ip netns exec {sa} busybox ping -c 1 -W 2 10.77.0.3 >/dev/null"
        )),
        "a -> b"
    );
    assert!(
        ok(&format!(
            "ip netns exec {sb} busybox ping -c 1 -W 2 10.77.0.1 >/dev/null"
        )),
        "b -> gateway"
    );
    // A source address that is not the container's own is dropped.
    sh(&format!("ip -n {sa} addr add 10.77.0.9/32 dev eth0"));
    assert!(
        !ok(&format!(
            "ip netns exec {sa} busybox ping -c 1 -W 1 -I 10.77.0.9 10.77.0.3 >/dev/null 2>&1"
        )),
        "spoofed source passed"
    );
    // Nor the address of another container (which has a route, through its own link):
    // counted after weft's check, a's packets with b's source never get there.
    sh("nft -f - <<'EOF'\ntable ip spoofcount {\n  chain pre {\n    type filter hook prerouting priority -100; policy accept;\n    \
        iifname \"wfhaaaaaaaaaa02\" ip saddr 10.77.0.3 counter\n    \
        iifname \"wfhaaaaaaaaaa02\" ip saddr 10.77.0.2 counter\n  }\n}\nEOF");
    sh(&format!("ip -n {sa} addr add 10.77.0.3/32 dev eth0"));
    let _ = ok(&format!(
        "ip netns exec {sa} busybox ping -c 2 -W 1 -I 10.77.0.3 10.77.0.1 >/dev/null 2>&1"
    ));
    let _ = ok(&format!(
        "ip netns exec {sa} busybox ping -c 1 -W 1 -I 10.77.0.2 10.77.0.1 >/dev/null 2>&1"
    ));
    let counters = sh("nft list chain ip spoofcount pre");
    sh("nft delete table ip spoofcount");
    sh(&format!("ip -n {sa} addr del 10.77.0.3/32 dev eth0"));
    let packets: Vec<&str> = counters
        .lines()
        .filter_map(|l| l.split("packets ").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(
        packets.first(),
        Some(&"0"),
        "a's packets with b's address passed: {counters}"
    );
    assert_ne!(
        packets.get(1),
        Some(&"0"),
        "a's own packets must pass: {counters}"
    );

    // A route removed behind weft's back comes back with the next setup (the reconciler's call).
    let both = [a.clone(), b.clone()];
    assert!(dp.endpoints_needing_setup(&both).await.unwrap().is_empty());
    sh("ip route del 10.77.0.3/32");
    // What the reconciler's quiet passes look for: a lost /32, a host end down.
    assert_eq!(
        dp.endpoints_needing_setup(&both).await.unwrap(),
        [b.host_if.clone()].into()
    );
    dp.setup_endpoint(&b).await.unwrap();
    sh(&format!("ip link set {} down", a.host_if));
    assert_eq!(
        dp.endpoints_needing_setup(&both).await.unwrap(),
        [a.host_if.clone()].into()
    );
    dp.setup_endpoint(&a).await.unwrap();
    assert!(dp.endpoints_needing_setup(&both).await.unwrap().is_empty());
    assert!(
        ok(&format!(
            "ip netns exec {sa} busybox ping -c 1 -W 2 10.77.0.3 >/dev/null"
        )),
        "route repaired"
    );

    // Teardown: the container end lives in the sandbox now; deleting the host end takes both.
    for e in [&a, &b] {
        dp.teardown_endpoint(e).await.unwrap();
        dp.teardown_endpoint(e).await.unwrap(); // idempotent, also when already gone
    }
    assert!(matches!(
        dp.delete_link("wfhnonexistent0").await,
        Err(DatapathError::NotFound { .. })
    ));
    dp.sync(&DesiredState::default()).await.unwrap();
    assert!(!sh("ip -o link show").contains("wfh"), "veth left behind");
    assert!(
        !ok("ip link show weft-gw >/dev/null 2>&1"),
        "gateway link left behind"
    );
    assert_eq!(
        sh("ip route show proto 87").trim(),
        "",
        "routes left behind"
    );
    assert!(
        !ok("nft list table inet weft >/dev/null 2>&1"),
        "nftables table left behind"
    );
    assert!(
        !sh("iptables -S").contains("WEFT"),
        "iptables rules left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root in a private netns: scripts/test.sh runs it with --ignored"]
async fn an_endpoints_route_goes_with_its_link_not_with_a_sync() {
    assert_private_netns();
    let dp = NetlinkDatapath::connect("/proc/sys/net").unwrap();
    let c = EndpointSpec {
        host_if: "wfhbbbbbbbbbb01".into(),
        container_if: "wfcbbbbbbbbbb01".into(),
        address: "10.78.0.5".parse().unwrap(),
        mtu: 1400,
    };
    let state = DesiredState {
        networks: vec![NetworkSpec {
            subnet: "10.78.0.0/16".parse().unwrap(),
            gateway: None,
            internal: true,
            host_access: false,
        }],
        published: Default::default(),
    };
    dp.setup_endpoint(&c).await.unwrap();
    dp.sync(&state).await.unwrap();
    assert!(sh("ip route show proto 87").contains("10.78.0.5"));
    assert!(
        !ok("ip link show weft-gw >/dev/null 2>&1"),
        "internal networks have no gateway address"
    );
    // A sync (of a network change, or the reconciler's) leaves an endpoint's route
    // alone, even one set up after the sync read the store.
    dp.resync(&state).await.unwrap();
    assert!(sh("ip route show proto 87").contains("10.78.0.5"));
    // The route goes with its link (the reconciler removes a link no endpoint owns).
    dp.delete_link(&c.host_if).await.unwrap();
    assert!(!sh("ip route show proto 87").contains("10.78.0.5"));
    dp.sync(&DesiredState::default()).await.unwrap();
    assert_eq!(sh("ip route show proto 87").trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root in a private netns: scripts/test.sh runs it with --ignored"]
async fn concurrent_dumps_on_the_shared_socket_do_not_fail() {
    assert_private_netns();
    // Enough routes that a dump spans many netlink messages, so dumps overlap.
    let batch: String = (0..4000)
        .map(|i| {
            format!(
                "route add 10.{}.{}.0/24 dev dumpbr0\n",
                100 + i / 256,
                i % 256
            )
        })
        .collect();
    let file = std::env::temp_dir().join(format!("weft-dump-routes-{}.batch", std::process::id()));
    std::fs::write(&file, batch).unwrap();
    sh(&format!(
        "ip link add dumpbr0 type bridge && ip link set dumpbr0 up && ip -batch {}",
        file.display()
    ));
    std::fs::remove_file(&file).unwrap();
    let dp = std::sync::Arc::new(NetlinkDatapath::connect("/proc/sys/net").unwrap());
    // The mesh and the driver dump routes and links at the same time; the kernel
    // refuses a second concurrent dump on one socket (EBUSY) unless weft serialises them.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let dp = dp.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    dp.host_routes().await.map(|_| ())
                } else {
                    dp.endpoint_links().await.map(|_| ())
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("a concurrent dump failed");
    }
    sh("ip link del dumpbr0");
}

/// Routes to other hosts' blocks: a full sync makes them exact; a change adds and
/// deletes only the routes named, and deleting one already gone is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root in a private netns: scripts/test.sh runs it with --ignored"]
async fn tunnel_routes_are_synced_whole_or_changed_one_by_one() {
    assert_private_netns();
    let dp = NetlinkDatapath::connect("/proc/sys/net").unwrap();
    sh("ip link add wtun0 type veth peer name wtun1 && ip link set wtun0 up && ip link set wtun1 up");
    let net = |s: &str| s.parse::<ipnetwork::Ipv4Network>().unwrap();
    let routes = || {
        let mut r: Vec<String> = sh("ip -4 route show dev wtun0")
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        r.sort();
        r
    };
    dp.sync_tunnel_routes("wtun0", &[net("10.79.0.0/26"), net("10.79.0.64/26")])
        .await
        .unwrap();
    assert_eq!(routes(), ["10.79.0.0/26", "10.79.0.64/26"]);
    dp.change_tunnel_routes("wtun0", &[net("10.79.1.0/26")], &[net("10.79.0.0/26")])
        .await
        .unwrap();
    assert_eq!(routes(), ["10.79.0.64/26", "10.79.1.0/26"]);
    dp.change_tunnel_routes("wtun0", &[], &[net("10.79.0.0/26")])
        .await
        .expect("a route already gone is no error");
    // A route of anyone else's to the same destination is not taken for weft's.
    sh("ip route add 10.79.2.0/26 dev wtun0 proto static");
    dp.change_tunnel_routes("wtun0", &[], &[net("10.79.2.0/26")])
        .await
        .unwrap();
    assert!(routes().contains(&"10.79.2.0/26".to_string()));
    dp.sync_tunnel_routes("wtun0", &[]).await.unwrap();
    assert_eq!(routes(), ["10.79.2.0/26"], "only weft's own routes go");
    sh("ip link del wtun0");
}

/// A TCP server in `ns` on port 80 that answers each connection with the peer's
/// address; stopped (by its PID) when dropped.
struct Echo(std::process::Child);

impl Echo {
    fn start(ns: &str) -> Self {
        let script = "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                      s.bind(('0.0.0.0', 80)); s.listen(16)\nwhile True:\n    c, a = s.accept(); c.sendall(a[0].encode()); c.close()";
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if ok(&format!("ip netns exec {ns} ss -ltn | grep -q ':80 '")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Echo(child)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a client in `ns` (None: the host) is told by the server at `to`.
fn ask(ns: Option<&str>, to: &str) -> String {
    let py = format!(
        "import socket; s=socket.create_connection(('{to}', 8080), timeout=2); print(s.recv(64).decode())"
    );
    let exec = ns
        .map(|n| format!("ip netns exec {n} "))
        .unwrap_or_default();
    let out = Command::new("sh")
        .args(["-c", &format!("{exec}python3 -c \"{py}\" 2>/dev/null")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root in a private netns: scripts/test.sh runs it with --ignored"]
async fn a_published_port_is_reached_from_outside_the_host_localhost_and_by_hairpin() {
    assert_private_netns();
    // The underlay: this namespace is the host at 192.0.2.2; "outside" is a namespace
    // at 192.0.2.9 behind a veth.
    let mut sandboxes = Sandboxes(Vec::new());
    let outside = sandboxes.name("out");
    sh(&format!(
        "ip link set lo up && ip netns add {outside} && ip link add up0 type veth peer name o0 netns {outside} && \
         ip addr add 192.0.2.2/24 dev up0 && ip link set up0 up && ip -n {outside} addr add 192.0.2.9/24 dev o0 && \
         ip -n {outside} link set o0 up && ip -n {outside} link set lo up"
    ));
    let dp = NetlinkDatapath::connect("/proc/sys/net").unwrap();
    let (a, b) = (ep(2), ep(3));
    let (sa, sb) = (sandboxes.name("a"), sandboxes.name("b"));
    for (e, ns) in [(&a, &sa), (&b, &sb)] {
        dp.setup_endpoint(e).await.unwrap();
        plug_into_sandbox(e, ns);
    }
    assert_eq!(
        sh(&format!(
            "cat /proc/sys/net/ipv4/conf/{}/route_localnet",
            a.host_if
        ))
        .trim(),
        "1"
    );
    let _server = Echo::start(&sa);
    let publish = |host_ip: Option<Ipv4Addr>| {
        let mut state = desired();
        state.published.insert((
            a.address,
            Published {
                proto: Proto::Tcp,
                host_ip,
                host_port: 8080,
                container_port: 80,
            },
        ));
        state
    };
    dp.sync(&desired()).await.unwrap();
    assert_eq!(ask(Some(&outside), "192.0.2.2"), "", "not published yet");
    dp.sync(&publish(None)).await.unwrap();
    // From another machine: the client's own address reaches the container.
    assert_eq!(ask(Some(&outside), "192.0.2.2"), "192.0.2.9");
    // From the host, to its address and to 127.0.0.1 (masqueraded: the container must
    // not answer its own loopback).
    assert_eq!(ask(None, "192.0.2.2"), "192.0.2.2");
    assert!(ask(None, "127.0.0.1").starts_with("1"), "localhost");
    assert!(
        !ask(None, "127.0.0.1").starts_with("127."),
        "localhost is masqueraded"
    );
    // Hairpin: another container, and the container itself, through the host's address.
    assert_eq!(ask(Some(&sb), "192.0.2.2"), "10.77.0.3");
    assert!(
        ask(Some(&sa), "192.0.2.2").starts_with("1"),
        "hairpin to itself"
    );
    // 127.0.0.1 only: the host reaches it, the outside does not.
    dp.sync(&publish(Some(Ipv4Addr::LOCALHOST))).await.unwrap();
    assert!(ask(None, "127.0.0.1").starts_with("1"));
    assert_eq!(ask(Some(&outside), "192.0.2.2"), "");
    // Nor by sending to 127.0.0.1 itself: a machine on the underlay and a container
    // route 127.0.0.1 to this host (their own loopback route taken away), and the
    // host's loopback stays the host's (the DNAT would take them to the container).
    // (The answer may not make it back; the container's sockets tell whether the
    // attempt reached it.)
    let tried_from = |addr: &str| {
        sh(&format!("ip netns exec {sa} ss -Htan dst {addr}"))
            .lines()
            .count()
    };
    for (ns, via, dev, me) in [
        (&outside, "192.0.2.2", "o0", "192.0.2.9"),
        (&sb, "10.77.0.1", "eth0", "10.77.0.3"),
    ] {
        sh(&format!(
            "ip -n {ns} route del local 127.0.0.0/8 dev lo table local && \
             ip -n {ns} route del local 127.0.0.1 dev lo table local && \
             ip netns exec {ns} sysctl -qw net.ipv4.conf.{dev}.route_localnet=1 && \
             ip -n {ns} route add 127.0.0.1/32 via {via} dev {dev} onlink"
        ));
        let before = tried_from(me);
        assert_eq!(
            ask(Some(ns), "127.0.0.1"),
            "",
            "{ns} reached the host's 127.0.0.1"
        );
        assert_eq!(
            tried_from(me),
            before,
            "{ns}'s packet to 127.0.0.1 reached the container"
        );
    }
    // The host-port check sees a process holding a port, on any or one address.
    assert!(dp.host_port_free(Proto::Tcp, None, 18081).unwrap());
    let held = std::net::TcpListener::bind("127.0.0.1:18081").unwrap();
    assert!(!dp.host_port_free(Proto::Tcp, None, 18081).unwrap());
    assert!(!dp
        .host_port_free(Proto::Tcp, Some(Ipv4Addr::LOCALHOST), 18081)
        .unwrap());
    assert!(dp.host_port_free(Proto::Udp, None, 18081).unwrap());
    drop(held);
    assert!(dp
        .host_port_free(Proto::Tcp, Some("203.0.113.1".parse().unwrap()), 18081)
        .is_err());
    // Withdrawn: nothing answers and no rule is left.
    dp.sync(&desired()).await.unwrap();
    assert_eq!(ask(None, "192.0.2.2"), "");
    assert!(!sh("nft list table inet weft").contains("dnat ip to"));
    for e in [&a, &b] {
        dp.teardown_endpoint(e).await.unwrap();
    }
    dp.sync(&DesiredState::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root in a private netns: scripts/test.sh runs it with --ignored"]
async fn dns_queries_are_routed_to_the_resolver_only_while_there_are_networks() {
    assert_private_netns();
    sh("ip link set lo up");
    let dp = NetlinkDatapath::connect("/proc/sys/net")
        .unwrap()
        .with_names_port(15353);
    let rule = || sh("ip rule show").contains("fwmark 0x77656674 lookup 30565");
    let route = || sh("ip route show table 30565").contains("local default dev lo");
    dp.sync(&desired()).await.unwrap();
    assert!(rule(), "no rule for marked queries: {}", sh("ip rule show"));
    assert!(
        route(),
        "no local route: {}",
        sh("ip route show table 30565")
    );
    assert!(sh("nft list table inet weft").contains("tproxy ip to :15353"));
    assert!(sh("iptables -S INPUT").starts_with("-P INPUT ACCEPT\n-A INPUT -j WEFT-INPUT"));
    assert!(sh("iptables -S WEFT-INPUT").contains("-m mark --mark 0x77656674 -j ACCEPT"));
    // Removed behind weft's back, or put behind a host firewall's drop: a full
    // resync puts everything back, the accept first.
    sh("ip rule del fwmark 0x77656674 lookup 30565 && ip route flush table 30565");
    sh("iptables -F WEFT-INPUT && iptables -I INPUT 1 -p udp -j DROP");
    dp.resync(&desired()).await.unwrap();
    assert!(rule() && route(), "not repaired");
    assert!(sh("iptables -S INPUT")
        .starts_with("-P INPUT ACCEPT\n-A INPUT -j WEFT-INPUT\n-A INPUT -p udp -j DROP"));
    assert!(sh("iptables -S WEFT-INPUT").contains("-m mark --mark 0x77656674 -j ACCEPT"));
    sh("iptables -D INPUT -p udp -j DROP");
    dp.resync(&desired()).await.unwrap();
    assert_eq!(
        sh("ip rule show").matches("0x77656674").count(),
        1,
        "the rule was added twice"
    );
    // No networks: nothing left behind.
    dp.sync(&DesiredState::default()).await.unwrap();
    assert!(!rule(), "rule left behind: {}", sh("ip rule show"));
    assert_eq!(
        sh("ip route show table 30565").trim(),
        "",
        "route left behind"
    );
}
