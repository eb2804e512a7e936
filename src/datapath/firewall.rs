//! weft's packet filter: isolation between networks, anti-spoofing, masquerade, and
//! the host boundary:
//! - new connections into weft's subnets come only from weft's own links (same
//!   network, per the isolation rules) and the WireGuard interface, or were DNATed
//!   (published); never from the underlay or another interface, whatever iptables'
//!   `FORWARD` policy is (an nftables drop is final);
//! - weft's containers and Docker's bridge networks (`docker0`, `br-*`) cannot reach
//!   each other, as Docker keeps its bridge networks apart;
//! - on their host, containers reach only their own gateway, for ICMP, unless their
//!   network has `-o weft.host-access=true`;
//! - in iptables, weft's `FORWARD` jump stays after Docker's `DOCKER-USER` jump, so
//!   rules there apply to weft's traffic too.
//!
//! Everything lives in one nftables table, `inet weft`, replaced atomically from the
//! desired state on every sync (one `nft -f` transaction: a half-applied ruleset is
//! never visible). Docker's iptables `FORWARD` chain may have policy `DROP`, and a
//! drop in any base chain is final, so forwarded container traffic is also accepted
//! explicitly in an iptables chain of ours, `WEFT-FORWARD`, jumped to from `FORWARD`.

use std::fmt::Write as _;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::debug;

use super::{DatapathError, DesiredState, HOST_IF_PREFIX, NAMES_MARK};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::ports::Published;

pub const TABLE: &str = "weft";
pub const IPTABLES_CHAIN: &str = "WEFT-FORWARD";
pub const IPTABLES_INPUT_CHAIN: &str = "WEFT-INPUT";

/// The nftables script that replaces table `inet weft` with `desired` (`tunnel_if`:
/// the WireGuard interface, on several hosts; `names_port`: weft's resolver, which
/// takes containers' DNS queries). With no networks the table is only deleted.
pub fn render(desired: &DesiredState, tunnel_if: Option<&str>, names_port: Option<u16>) -> String {
    let mut s = String::new();
    // Create-then-delete makes the delete valid whether or not the table exists.
    let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}");
    if desired.networks.is_empty() {
        return s;
    }
    let subnets: Vec<String> = desired
        .networks
        .iter()
        .map(|n| n.subnet.to_string())
        .collect();
    let gateways: Vec<String> = desired
        .networks
        .iter()
        .filter_map(|n| n.gateway.map(|g| g.to_string()))
        .collect();
    let set = |name: &str, ty: &str, flags: &str, elems: &[String]| {
        let elements = if elems.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", elems.join(", "))
        };
        format!("  set {name} {{ type {ty};{flags}{elements} }}\n")
    };
    let _ = writeln!(s, "table inet {TABLE} {{");
    s.push_str(&set("subnets", "ipv4_addr", " flags interval;", &subnets));
    s.push_str(&set("gateways", "ipv4_addr", "", &gateways));

    // A container may only send from its own address, and only IPv4: its address
    // is the one whose route leads back out of the link it came in on (the
    // endpoint's /32), a reverse-path check that needs no rule per container.
    // 127.0.0.0/8 comes only from the host itself: the DNAT of a port published on
    // 127.0.0.1 comes after this (priority -100), and route_localnet is on for the
    // host links, so nothing from a container, the underlay or the tunnel reaches it.
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority -150; policy accept;\n    \
         iifname \"{HOST_IF_PREFIX}*\" meta nfproto ipv6 drop\n    \
         iifname \"{HOST_IF_PREFIX}*\" fib saddr . iif oif missing drop\n    \
         iif != \"lo\" ip daddr 127.0.0.0/8 drop"
    );
    // DNS queries from containers to servers outside weft's subnets (dockerd's
    // embedded DNS passing on a name it does not know) go to weft's resolver, which
    // learns where each was going (TPROXY keeps the destination). With no resolver
    // listening, TPROXY does not match and the query goes on as before. A server on
    // the host itself is left alone: its reply could not leave from its own address.
    if let Some(port) = names_port {
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                s,
                "    iifname \"{HOST_IF_PREFIX}*\" ip daddr != @subnets fib daddr type != local \
                 {proto} dport 53 tproxy ip to :{port} meta mark set {NAMES_MARK:#x} accept"
            );
        }
    }
    let _ = writeln!(s, "  }}");
    // weft's own links, and the tunnel from other hosts' containers.
    let weft_ifs = match tunnel_if {
        Some(t) => format!("{{ \"{HOST_IF_PREFIX}*\", \"{t}\" }}"),
        None => format!("\"{HOST_IF_PREFIX}*\""),
    };
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority -5; policy accept;\n    \
         ip daddr @subnets ct state != {{ established, related }} iifname != {weft_ifs} ct status ! dnat drop\n    \
         ip saddr @subnets oifname {{ \"docker0\", \"br-*\" }} ct status ! dnat drop"
    );
    // Internal networks keep everything in; published ports (DNAT) are reachable
    // from every other network, as through the host's address.
    for n in desired.networks.iter().filter(|n| n.internal) {
        let sub = n.subnet;
        let _ = writeln!(s, "    ip saddr {sub} ip daddr != {sub} drop");
        let _ = writeln!(s, "    ip daddr {sub} ip saddr != {sub} drop");
    }
    let _ = writeln!(s, "    ct status dnat accept");
    for n in desired.networks.iter().filter(|n| !n.internal) {
        let sub = n.subnet;
        let _ = writeln!(
            s,
            "    ip saddr {sub} ip daddr @subnets ip daddr != {sub} drop"
        );
    }
    let _ = writeln!(s, "  }}");
    // On the host, containers reach their own gateway only (for ICMP), unless their
    // network has host access; never another network's gateway.
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority -5; policy accept;"
    );
    if let Some(port) = names_port {
        // The resolver only takes queries TPROXY hands it (their port is 53), never
        // ones addressed to its own port, from anywhere.
        let _ = writeln!(s, "    meta l4proto {{ tcp, udp }} th dport {port} drop");
    }
    let _ = writeln!(
        s,
        "    iifname != {weft_ifs} accept\n    ct state established,related accept"
    );
    if names_port.is_some() {
        let _ = writeln!(s, "    meta mark {NAMES_MARK:#x} accept");
    }
    if !gateways.is_empty() {
        for n in &desired.networks {
            match n.gateway {
                Some(g) if !n.internal => {
                    let _ = writeln!(
                        s,
                        "    ip saddr {} ip daddr @gateways ip daddr != {g} drop",
                        n.subnet
                    );
                }
                _ => {
                    let _ = writeln!(s, "    ip saddr {} ip daddr @gateways drop", n.subnet);
                }
            }
        }
    }
    for n in &desired.networks {
        match n.gateway {
            _ if n.host_access => {
                let _ = writeln!(s, "    ip saddr {} accept", n.subnet);
            }
            Some(g) if !n.internal => {
                let _ = writeln!(
                    s,
                    "    ip saddr {} ip daddr {g} meta l4proto icmp accept",
                    n.subnet
                );
            }
            _ => {}
        }
    }
    let _ = writeln!(s, "    drop\n  }}");
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;"
    );
    for n in desired.networks.iter().filter(|n| !n.internal) {
        let _ = writeln!(
            s,
            "    ip saddr {} ip daddr != @subnets masquerade",
            n.subnet
        );
    }
    // The host reaching a published port over 127.0.0.1: the container must answer an
    // address of the host, not its own loopback.
    let _ = writeln!(
        s,
        "    oifname \"{HOST_IF_PREFIX}*\" ip saddr 127.0.0.0/8 masquerade"
    );
    // A container reaching its own published port through the host (hairpin): its
    // answer must come back through the host, which un-NATs it.
    for (container, p) in &desired.published {
        let _ = writeln!(
            s,
            "    ip saddr {container} ip daddr {container} {} dport {} masquerade",
            p.proto, p.container_port
        );
    }
    let _ = writeln!(s, "  }}");
    if !desired.published.is_empty() {
        // Published ports: from outside (prerouting) and from the host itself (output).
        let rules = dnat_rules(&desired.published);
        for (chain, hook) in [("publish_in", "prerouting"), ("publish_local", "output")] {
            let _ = writeln!(
                s,
                "  chain {chain} {{\n    type nat hook {hook} priority -100; policy accept;\n{rules}  }}"
            );
        }
    }
    let _ = writeln!(s, "}}");
    s
}

/// The DNAT rules for every published port (container address, port), one line
/// each, for the prerouting and output nat chains: traffic to a local address of
/// the host (or only to `host_ip`) goes to the container.
fn dnat_rules(published: &BTreeSet<(Ipv4Addr, Published)>) -> String {
    let mut s = String::new();
    for (container, p) in published {
        let daddr = match p.host_ip {
            Some(ip) => format!("ip daddr {ip} "),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "    fib daddr type local {daddr}{proto} dport {port} dnat ip to {container}:{to}",
            proto = p.proto,
            port = p.host_port,
            to = p.container_port,
        );
    }
    s
}

/// How long `nft` or `iptables` may take. A hung one (say, waiting for the xtables
/// lock another tool holds) fails its operation and is killed, so it never holds
/// weft's locks for longer than this.
pub const COMMAND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, DatapathError> {
    run_within(COMMAND_DEADLINE, program, args, stdin).await
}

async fn run_within(
    deadline: std::time::Duration,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, DatapathError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropped on the deadline: the child is killed with it.
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        DatapathError::Firewall(format!("cannot run {program}: {e} (is it installed?)"))
    })?;
    let talk = async {
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .await
                .map_err(|e| DatapathError::Firewall(format!("writing to {program}: {e}")))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| DatapathError::Firewall(format!("waiting for {program}: {e}")))
    };
    let out = tokio::time::timeout(deadline, talk).await.map_err(|_| {
        DatapathError::Firewall(format!(
            "{program} {} did not finish within {deadline:?}; killed it",
            args.join(" ")
        ))
    })??;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DatapathError::Firewall(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Replaces table `inet weft` with the rules for `desired`.
pub async fn apply_nftables(
    desired: &DesiredState,
    tunnel_if: Option<&str>,
    names_port: Option<u16>,
) -> Result<(), DatapathError> {
    apply_script(&render(desired, tunnel_if, names_port)).await
}

/// Runs an nftables script as one transaction.
async fn apply_script(script: &str) -> Result<(), DatapathError> {
    debug!(rules = %script, "applying nftables");
    run("nft", &["-f", "-"], Some(script)).await.map(drop)
}

async fn iptables(args: &[&str]) -> Result<String, DatapathError> {
    let mut full = vec!["-w", "5"];
    full.extend_from_slice(args);
    run("iptables", &full, None).await
}

/// Makes iptables' FORWARD accept container traffic (when there are networks) or
/// removes every trace of weft from iptables (when there are none).
pub async fn apply_iptables(active: bool, tunnel_if: Option<&str>) -> Result<(), DatapathError> {
    let jump = ["FORWARD", "-j", IPTABLES_CHAIN];
    let has_jump = iptables(&[&["-C"], &jump[..]].concat()).await.is_ok();
    if !active {
        if has_jump {
            iptables(&[&["-D"], &jump[..]].concat()).await?;
        }
        if iptables(&["-L", IPTABLES_CHAIN, "-n"]).await.is_ok() {
            iptables(&["-F", IPTABLES_CHAIN]).await?;
            iptables(&["-X", IPTABLES_CHAIN]).await?;
        }
        return Ok(());
    }
    if iptables(&["-L", IPTABLES_CHAIN, "-n"]).await.is_err() {
        iptables(&["-N", IPTABLES_CHAIN]).await?;
    }
    let wildcard = format!("{HOST_IF_PREFIX}+");
    let established = [
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ];
    let mut rules: Vec<Vec<&str>> = vec![
        vec!["-i", &wildcard, "-j", "ACCEPT"],
        [&["-o", wildcard.as_str()][..], &established[..]].concat(),
    ];
    // Published ports: new connections DNATed to a container.
    rules.push(vec![
        "-o",
        &wildcard,
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-j",
        "ACCEPT",
    ]);
    // From other hosts' containers (WireGuard already checked who sent it).
    if let Some(tun) = tunnel_if {
        rules.push(vec!["-i", tun, "-o", &wildcard, "-j", "ACCEPT"]);
    }
    for rule in rules.iter().map(Vec::as_slice) {
        let check = [&["-C", IPTABLES_CHAIN], rule].concat();
        if iptables(&check).await.is_err() {
            iptables(&[&["-A", IPTABLES_CHAIN], rule].concat()).await?;
        }
    }
    place_jump(has_jump).await
}

/// Accepts, in iptables' `INPUT`, the DNS queries the firewall hands to weft's
/// resolver (marked): a host firewall with `INPUT` policy DROP (ufw, firewalld) would
/// drop them, and a drop in any base chain is final. With `active` false the chain
/// and its jump go.
pub async fn apply_iptables_input(active: bool) -> Result<(), DatapathError> {
    let jump = ["INPUT", "-j", IPTABLES_INPUT_CHAIN];
    let has_jump = iptables(&[&["-C"], &jump[..]].concat()).await.is_ok();
    let has_chain = iptables(&["-L", IPTABLES_INPUT_CHAIN, "-n"]).await.is_ok();
    if !active {
        if has_jump {
            iptables(&[&["-D"], &jump[..]].concat()).await?;
        }
        if has_chain {
            iptables(&["-F", IPTABLES_INPUT_CHAIN]).await?;
            iptables(&["-X", IPTABLES_INPUT_CHAIN]).await?;
        }
        return Ok(());
    }
    if !has_chain {
        iptables(&["-N", IPTABLES_INPUT_CHAIN]).await?;
    }
    let mark = format!("{NAMES_MARK:#x}");
    let rule = ["-m", "mark", "--mark", mark.as_str(), "-j", "ACCEPT"];
    if iptables(&[&["-C", IPTABLES_INPUT_CHAIN][..], &rule[..]].concat())
        .await
        .is_err()
    {
        iptables(&[&["-A", IPTABLES_INPUT_CHAIN][..], &rule[..]].concat()).await?;
    }
    // First in INPUT, before any drop a host firewall adds (also one added later).
    let listing = iptables(&["-S", "INPUT"]).await?;
    let first = listing.lines().find(|l| l.starts_with("-A INPUT "));
    let ours = format!("-A INPUT -j {IPTABLES_INPUT_CHAIN}");
    if first != Some(ours.as_str()) {
        if has_jump {
            iptables(&[&["-D"], &jump[..]].concat()).await?;
        }
        iptables(&["-I", "INPUT", "1", "-j", IPTABLES_INPUT_CHAIN]).await?;
    }
    Ok(())
}

/// Puts weft's `FORWARD` jump right after Docker's `DOCKER-USER` jump (or first, when
/// Docker has none yet: dockerd puts its jump back at the top when it starts), and
/// moves it there if it sits before it.
async fn place_jump(present: bool) -> Result<(), DatapathError> {
    let listing = iptables(&["-S", "FORWARD"]).await?;
    let ours = format!("-A FORWARD -j {IPTABLES_CHAIN}");
    let (position, misplaced) = jump_position(&listing, &ours);
    if present && !misplaced {
        return Ok(());
    }
    if present {
        iptables(&["-D", "FORWARD", "-j", IPTABLES_CHAIN]).await?;
        return Box::pin(place_jump(false)).await;
    }
    let at = position.to_string();
    iptables(&["-I", "FORWARD", &at, "-j", IPTABLES_CHAIN]).await?;
    Ok(())
}

/// From `iptables -S FORWARD`: the 1-based position right after Docker's
/// `DOCKER-USER` jump (1 without one), and whether the rule `ours` sits before it.
fn jump_position(listing: &str, ours: &str) -> (usize, bool) {
    let rules: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("-A FORWARD "))
        .collect();
    let user = rules.iter().position(|r| *r == "-A FORWARD -j DOCKER-USER");
    let mine = rules.iter().position(|r| *r == ours);
    let misplaced = matches!((mine, user), (Some(m), Some(u)) if m < u);
    (user.map_or(1, |u| u + 2), misplaced)
}

#[cfg(test)]
mod tests {
    use super::super::NetworkSpec;
    use super::*;

    fn state() -> DesiredState {
        DesiredState {
            networks: vec![
                NetworkSpec {
                    subnet: "10.42.0.0/16".parse().unwrap(),
                    gateway: Some("10.42.0.1".parse().unwrap()),
                    internal: false,
                    host_access: false,
                },
                NetworkSpec {
                    subnet: "10.43.0.0/16".parse().unwrap(),
                    gateway: None,
                    internal: true,
                    host_access: false,
                },
            ],
            published: Default::default(),
        }
    }

    #[test]
    fn published_ports_are_dnat_from_outside_and_the_host_with_hairpin_and_localhost() {
        use crate::ports::{Proto, Published};
        let mut desired = state();
        let r = render(&desired, Some("weft0"), None);
        assert!(!r.contains("dnat ip to"), "nothing published: no DNAT");
        assert!(!r.contains("chain publish_in"));
        // Containers may not use the host's loopback, which route_localnet opens.
        assert!(r.contains("iif != \"lo\" ip daddr 127.0.0.0/8 drop"));
        desired.published.insert((
            "10.42.0.5".parse().unwrap(),
            Published {
                proto: Proto::Tcp,
                host_ip: None,
                host_port: 8080,
                container_port: 80,
            },
        ));
        let r = render(&desired, Some("weft0"), None);
        let dnat = "fib daddr type local tcp dport 8080 dnat ip to 10.42.0.5:80";
        for (chain, hook) in [("publish_in", "prerouting"), ("publish_local", "output")] {
            let at = r.find(&format!("chain {chain}")).expect(chain);
            let body = &r[at..at + r[at..].find("  }").unwrap()];
            assert!(
                body.contains(&format!("type nat hook {hook} priority -100")),
                "{body}"
            );
            assert!(body.contains(dnat), "{body}");
        }
        let post = &r[r.find("chain postrouting").unwrap()..];
        assert!(post.contains("oifname \"wfh*\" ip saddr 127.0.0.0/8 masquerade"));
        assert!(post.contains("ip saddr 10.42.0.5 ip daddr 10.42.0.5 tcp dport 80 masquerade"));
        // Published ports are reachable across networks; internal ones stay shut first.
        let forward = &r[r.find("chain forward").unwrap()..r.find("chain input").unwrap()];
        let accept = forward.find("ct status dnat accept").unwrap();
        assert!(
            forward
                .find("ip daddr 10.43.0.0/16 ip saddr != 10.43.0.0/16 drop")
                .unwrap()
                < accept
        );
        assert!(
            forward
                .find("ip saddr 10.42.0.0/16 ip daddr @subnets")
                .unwrap()
                > accept
        );
    }

    #[test]
    fn ruleset_isolates_networks_prevents_spoofing_and_masquerades_only_non_internal() {
        let r = render(&state(), None, None);
        assert!(r.starts_with("table inet weft\ndelete table inet weft\n"));
        assert!(r.contains("iifname \"wfh*\" fib saddr . iif oif missing drop"));
        assert!(!r.contains("wfh0"), "no rule or element per container");
        assert!(r.contains("ip saddr 10.42.0.0/16 ip daddr @subnets ip daddr != 10.42.0.0/16 drop"));
        assert!(r.contains("ip saddr 10.43.0.0/16 ip daddr != 10.43.0.0/16 drop"));
        assert!(r.contains("ip saddr 10.42.0.0/16 ip daddr != @subnets masquerade"));
        assert!(!r.contains("ip saddr 10.43.0.0/16 ip daddr != @subnets masquerade"));
        assert!(r.contains("ip saddr 10.42.0.0/16 ip daddr @gateways ip daddr != 10.42.0.1 drop"));
    }

    #[test]
    fn the_host_boundary_keeps_other_interfaces_out_and_containers_off_the_host() {
        let mut desired = state();
        desired.networks.push(NetworkSpec {
            subnet: "10.44.0.0/24".parse().unwrap(),
            gateway: Some("10.44.0.1".parse().unwrap()),
            internal: false,
            host_access: true,
        });
        let r = render(&desired, Some("weft0"), None);
        // Into weft's subnets only from its links, the tunnel, or published (DNAT).
        assert!(r.contains(
            "ip daddr @subnets ct state != { established, related } iifname != { \"wfh*\", \"weft0\" } ct status ! dnat drop"
        ));
        assert!(
            r.contains("ip saddr @subnets oifname { \"docker0\", \"br-*\" } ct status ! dnat drop")
        );
        // On the host: the own gateway for ICMP; everything with host access; else drop.
        let input = &r[r.find("chain input").unwrap()..r.find("chain postrouting").unwrap()];
        assert!(input.contains("iifname != { \"wfh*\", \"weft0\" } accept"));
        assert!(input.contains("ct state established,related accept"));
        assert!(input.contains("ip saddr 10.42.0.0/16 ip daddr 10.42.0.1 meta l4proto icmp accept"));
        assert!(input.contains("ip saddr 10.44.0.0/24 accept"));
        assert!(
            !input.contains("ip saddr 10.43.0.0/16 accept"),
            "internal: no host access"
        );
        assert!(input.trim_end().ends_with("drop\n  }"), "{input}");
        // One host: no tunnel.
        assert!(render(&desired, None, None)
            .contains("related } iifname != \"wfh*\" ct status ! dnat drop"));
    }

    #[test]
    fn weft_jumps_after_docker_user() {
        let ours = "-A FORWARD -j WEFT-FORWARD";
        let docker =
            "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n";
        assert_eq!(jump_position(docker, ours), (2, false));
        let before = format!("-P FORWARD DROP\n{ours}\n-A FORWARD -j DOCKER-USER\n");
        assert_eq!(jump_position(&before, ours), (3, true));
        let after = format!("-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n{ours}\n");
        assert_eq!(jump_position(&after, ours), (2, false));
        assert_eq!(jump_position("-P FORWARD ACCEPT\n", ours), (1, false));
    }

    #[test]
    fn each_published_port_is_one_dnat_rule() {
        let mut set = BTreeSet::new();
        set.insert((
            Ipv4Addr::new(10, 42, 0, 5),
            Published {
                proto: crate::ports::Proto::Udp,
                host_ip: Some(Ipv4Addr::LOCALHOST),
                host_port: 5353,
                container_port: 53,
            },
        ));
        assert_eq!(
            dnat_rules(&set),
            "    fib daddr type local ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.42.0.5:53\n"
        );
    }

    #[test]
    fn dns_queries_to_outside_servers_go_to_the_resolver_which_takes_nothing_else() {
        let r = render(&state(), Some("weft0"), None);
        assert!(
            !r.contains("tproxy") && !r.contains("15353"),
            "no resolver: no interception"
        );
        let r = render(&state(), Some("weft0"), Some(15353));
        let pre = &r[r.find("chain prerouting").unwrap()..r.find("chain forward").unwrap()];
        for proto in ["udp", "tcp"] {
            let rule = format!(
                "iifname \"wfh*\" ip daddr != @subnets fib daddr type != local {proto} dport 53 tproxy ip to :15353 meta mark set 0x77656674 accept"
            );
            // After the anti-spoofing check: a forged source never reaches it.
            assert!(
                pre.find(&rule).expect(&rule)
                    > pre.find("fib saddr . iif oif missing drop").unwrap()
            );
        }
        let input = &r[r.find("chain input").unwrap()..r.find("chain postrouting").unwrap()];
        let refuse = input
            .find("meta l4proto { tcp, udp } th dport 15353 drop")
            .expect("the resolver's own port is shut");
        assert!(
            refuse
                < input
                    .find("iifname != { \"wfh*\", \"weft0\" } accept")
                    .unwrap()
        );
        let take = input
            .find("meta mark 0x77656674 accept")
            .expect("handed-over queries");
        assert!(
            take < input
                .find("ip saddr 10.42.0.0/16 ip daddr @gateways")
                .unwrap()
        );
    }

    #[test]
    fn no_networks_means_no_table() {
        assert_eq!(
            render(&DesiredState::default(), Some("weft0"), None),
            "table inet weft\ndelete table inet weft\n"
        );
    }

    #[tokio::test]
    async fn a_hung_command_fails_at_its_deadline_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
        let started = std::time::Instant::now();
        let err = run_within(
            std::time::Duration::from_millis(300),
            "sh",
            &["-c", &script],
            None,
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(err.to_string().contains("did not finish"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let alive = || std::path::Path::new(&format!("/proc/{}", pid.trim())).exists();
        for _ in 0..50 {
            if !alive() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let zombie_or_gone = !alive()
            || std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .is_ok_and(|st| st.split_whitespace().nth(2) == Some("Z"));
        assert!(zombie_or_gone, "the hung command was not killed");
    }
}
