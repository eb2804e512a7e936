//! Port publishing (`docker run -p`): the port map Docker sends with
//! ProgramExternalConnectivity, resolved to concrete host ports. Pure: the driver
//! keeps what is published in the endpoint's record and the firewall renders it.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::protocol::OptionsMap;

/// The endpoint option that carries the port map.
pub const PORTMAP_OPTION: &str = "com.docker.network.portmap";
/// Where a host port is picked when the user named none (`-p 80`, `-P`).
pub const EPHEMERAL: (u16, u16) = (49153, 60999);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port map: {0}")]
    Invalid(String),
    #[error("host port {port}/{proto} is already published by weft for another container")]
    Published { proto: Proto, port: u16 },
    #[error("host port {port}/{proto} is in use by a process on this host")]
    InUse { proto: Proto, port: u16 },
    #[error("no free host port for {proto} in {from}-{to}")]
    NoneFree { proto: Proto, from: u16, to: u16 },
    #[error("checking host port {port}/{proto}: {message}")]
    Host {
        proto: Proto,
        port: u16,
        message: String,
    },
}

/// One entry of Docker's port map (types.PortBinding).
#[derive(Debug, Deserialize)]
struct Binding {
    #[serde(rename = "Proto")]
    proto: u8,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "HostIP", default)]
    host_ip: String,
    #[serde(rename = "HostPort", default)]
    host_port: u16,
    #[serde(rename = "HostPortEnd", default)]
    host_port_end: u16,
}

/// What the user asked for: a container port and where on the host; `host_ports`
/// (0, 0) means any free port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub proto: Proto,
    pub container_port: u16,
    /// None: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_ports: (u16, u16),
}

impl Request {
    /// Whether `port` is one this request may be given.
    fn accepts(&self, port: u16) -> bool {
        let (from, to) = match self.host_ports {
            (0, 0) => EPHEMERAL,
            range => range,
        };
        (from..=to).contains(&port)
    }
}

/// A port published on this host, to one container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Published {
    pub proto: Proto,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// `0.0.0.0:8080->80/tcp`, as `docker ps` shows a port.
impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}->{}/{}",
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            self.host_port,
            self.container_port,
            self.proto
        )
    }
}

impl Published {
    /// Whether both cannot be published at once: same protocol and port, on the
    /// same address or one of them on every address.
    pub fn clashes(&self, proto: Proto, host_ip: Option<Ipv4Addr>, port: u16) -> bool {
        self.proto == proto
            && self.host_port == port
            && (self.host_ip.is_none() || host_ip.is_none() || self.host_ip == host_ip)
    }
}

/// The port map in `options`; IPv6 bindings are left out (weft's networks are IPv4).
pub fn requests(options: &OptionsMap) -> Result<Vec<Request>, PortError> {
    let Some(value) = options.get(PORTMAP_OPTION) else {
        return Ok(Vec::new());
    };
    if value.is_null() {
        return Ok(Vec::new());
    }
    let bindings: Vec<Binding> = serde_json::from_value(value.clone())
        .map_err(|e| PortError::Invalid(format!("{PORTMAP_OPTION} does not decode: {e}")))?;
    let mut out = Vec::new();
    for b in bindings {
        let proto = match b.proto {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            132 => {
                return Err(PortError::Invalid(format!(
                    "port {}/sctp: weft publishes TCP and UDP only",
                    b.port
                )))
            }
            p => return Err(PortError::Invalid(format!("unknown protocol number {p}"))),
        };
        let host_ip = match b.host_ip.as_str() {
            "" | "0.0.0.0" => None,
            ip => match ip.parse::<Ipv4Addr>() {
                Ok(ip) => Some(ip),
                Err(_) if ip.contains(':') => continue,
                Err(_) => return Err(PortError::Invalid(format!("host address {ip:?}"))),
            },
        };
        if b.port == 0 {
            return Err(PortError::Invalid("container port 0".into()));
        }
        if b.host_port == 0 && b.host_port_end != 0 {
            return Err(PortError::Invalid(format!(
                "host port range 0-{} starts at 0",
                b.host_port_end
            )));
        }
        let end = if b.host_port_end == 0 {
            b.host_port
        } else {
            b.host_port_end
        };
        if end < b.host_port {
            return Err(PortError::Invalid(format!(
                "host port range {}-{end} is empty",
                b.host_port
            )));
        }
        out.push(Request {
            proto,
            container_port: b.port,
            host_ip,
            host_ports: (b.host_port, end),
        });
    }
    Ok(out)
}

/// Concrete host ports for `requests`: a fixed port as asked, otherwise the first
/// free one of its range (or of [`EPHEMERAL`]). `published` is what weft has
/// published already (for other containers); `previous` what this endpoint had
/// (asked again, it keeps the same ports); `free` asks the host whether a process
/// holds the port. All or nothing.
pub fn resolve(
    requests: &[Request],
    published: &[Published],
    previous: &[Published],
    free: impl Fn(Proto, Option<Ipv4Addr>, u16) -> Result<bool, PortError>,
) -> Result<Vec<Published>, PortError> {
    let mut out: Vec<Published> = Vec::new();
    for r in requests {
        let kept = previous.iter().find(|p| {
            p.proto == r.proto
                && p.container_port == r.container_port
                && p.host_ip == r.host_ip
                && r.accepts(p.host_port)
                && !published
                    .iter()
                    .chain(out.iter())
                    .any(|o| o.clashes(p.proto, p.host_ip, p.host_port))
        });
        if let Some(p) = kept {
            out.push(p.clone());
            continue;
        }
        let clash = |port: u16| {
            published
                .iter()
                .chain(out.iter())
                .any(|p| p.clashes(r.proto, r.host_ip, port))
        };
        let (from, to) = match r.host_ports {
            (0, 0) => EPHEMERAL,
            range => range,
        };
        let port = if from == to && r.host_ports != (0, 0) {
            if clash(from) {
                return Err(PortError::Published {
                    proto: r.proto,
                    port: from,
                });
            }
            if !free(r.proto, r.host_ip, from)? {
                return Err(PortError::InUse {
                    proto: r.proto,
                    port: from,
                });
            }
            from
        } else {
            let mut found = None;
            for p in from..=to {
                if !clash(p) && free(r.proto, r.host_ip, p)? {
                    found = Some(p);
                    break;
                }
            }
            found.ok_or(PortError::NoneFree {
                proto: r.proto,
                from,
                to,
            })?
        };
        out.push(Published {
            proto: r.proto,
            host_ip: r.host_ip,
            host_port: port,
            container_port: r.container_port,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(map: serde_json::Value) -> OptionsMap {
        let mut o = OptionsMap::new();
        o.insert(PORTMAP_OPTION.into(), map);
        o
    }

    #[test]
    fn the_port_map_docker_sends_is_read() {
        let o = options(serde_json::json!([
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 18080, "HostPortEnd": 18080},
            {"Proto": 17, "IP": "", "Port": 53, "HostIP": "127.0.0.1", "HostPort": 0, "HostPortEnd": 0},
            {"Proto": 6, "IP": "", "Port": 443, "HostIP": "::", "HostPort": 8443, "HostPortEnd": 8443},
            {"Proto": 6, "IP": "", "Port": 90, "HostIP": "0.0.0.0", "HostPort": 9000, "HostPortEnd": 9010}
        ]));
        let r = requests(&o).unwrap();
        assert_eq!(r.len(), 3, "the IPv6 binding is left out");
        assert_eq!(r[0].host_ports, (18080, 18080));
        assert_eq!(r[1].proto, Proto::Udp);
        assert_eq!(r[1].host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(r[2].host_ports, (9000, 9010));
        assert!(requests(&OptionsMap::new()).unwrap().is_empty());
        let from_zero = options(
            serde_json::json!([{"Proto": 6, "Port": 80, "HostPort": 0, "HostPortEnd": 90}]),
        );
        assert!(requests(&from_zero)
            .unwrap_err()
            .to_string()
            .contains("starts at 0"));
        let sctp = options(serde_json::json!([{"Proto": 132, "Port": 80, "HostPort": 80}]));
        assert!(requests(&sctp).unwrap_err().to_string().contains("sctp"));
    }

    #[test]
    fn ports_are_resolved_all_or_nothing_without_clashes() {
        let req = |port: u16, ip: Option<Ipv4Addr>, range: (u16, u16)| Request {
            proto: Proto::Tcp,
            container_port: port,
            host_ip: ip,
            host_ports: range,
        };
        let theirs = vec![Published {
            proto: Proto::Tcp,
            host_ip: None,
            host_port: 8080,
            container_port: 80,
        }];
        let all_free = |_, _, _| Ok(true);
        // A fixed port weft published already is refused, naming it.
        let err = resolve(&[req(80, None, (8080, 8080))], &theirs, &[], all_free).unwrap_err();
        assert_eq!(
            err,
            PortError::Published {
                proto: Proto::Tcp,
                port: 8080
            }
        );
        // So is one a process of the host holds.
        let err = resolve(&[req(80, None, (7070, 7070))], &[], &[], |_, _, p| {
            Ok(p != 7070)
        })
        .unwrap_err();
        assert_eq!(
            err,
            PortError::InUse {
                proto: Proto::Tcp,
                port: 7070
            }
        );
        // A range takes its first free port; two requests never take the same one.
        let got = resolve(
            &[req(80, None, (8080, 8082)), req(81, None, (8080, 8082))],
            &theirs,
            &[],
            all_free,
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|p| p.host_port).collect::<Vec<_>>(),
            [8081, 8082]
        );
        // Any port: from the ephemeral range. UDP does not clash with TCP.
        let got = resolve(&[req(80, None, (0, 0))], &[], &[], all_free).unwrap();
        assert_eq!(got[0].host_port, EPHEMERAL.0);
        let udp = Request {
            proto: Proto::Udp,
            ..req(80, None, (8080, 8080))
        };
        assert_eq!(
            resolve(&[udp], &theirs, &[], all_free).unwrap()[0].host_port,
            8080
        );
        // Asked again (Docker may revoke and program again), an endpoint keeps the
        // ports it had, while they are still its to have.
        let had = vec![Published {
            host_port: 50000,
            ..got[0].clone()
        }];
        let again = resolve(&[req(80, None, (0, 0))], &[], &had, all_free).unwrap();
        assert_eq!(again, had);
        let narrowed = resolve(&[req(80, None, (8090, 8091))], &[], &had, all_free).unwrap();
        assert_eq!(
            narrowed[0].host_port, 8090,
            "outside the new range: not kept"
        );
        // Two specific addresses do not clash; every address clashes with any.
        let a = Some(Ipv4Addr::new(192, 0, 2, 1));
        let b = Some(Ipv4Addr::new(192, 0, 2, 2));
        let on_a = resolve(&[req(80, a, (9090, 9090))], &[], &[], all_free).unwrap();
        assert!(resolve(&[req(80, b, (9090, 9090))], &on_a, &[], all_free).is_ok());
        assert!(resolve(&[req(80, None, (9090, 9090))], &on_a, &[], all_free).is_err());
        // Two requests for one fixed port: refused, naming it.
        let err = resolve(
            &[req(80, None, (8080, 8080)), req(81, None, (8080, 8080))],
            &[],
            &[],
            all_free,
        )
        .unwrap_err();
        assert_eq!(
            err,
            PortError::Published {
                proto: Proto::Tcp,
                port: 8080
            }
        );
        // A range with no free port left is an error naming the range.
        let err = resolve(&[req(80, None, (7070, 7071))], &[], &[], |_, _, _| {
            Ok(false)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "no free host port for tcp in 7070-7071");
    }
}
