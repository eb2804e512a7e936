//! The names one network's containers answer to across the cluster, and the answer
//! to one DNS query from that network: a reply for a name in it, else the query goes
//! on unchanged to where it was going. Messages are read and written by hickory-proto.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::schema::NamesRecord;

/// How long a client may cache an answer: short, since a container's name moves with
/// it (dockerd answers its own containers' names with 600).
pub const ANSWER_TTL: u32 = 2;
/// The largest UDP reply to a query without EDNS (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;

/// Every name and address of one network, from every host's record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directory {
    by_name: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    by_address: BTreeMap<Ipv4Addr, BTreeSet<String>>,
}

/// Names are matched without case and without the root's dot.
fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Directory {
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a NamesRecord>) -> Self {
        let mut d = Self::default();
        for entry in records.into_iter().flat_map(|r| &r.entries) {
            for name in &entry.names {
                let name = normal(name);
                if name.is_empty() {
                    continue;
                }
                d.by_name
                    .entry(name.clone())
                    .or_default()
                    .insert(entry.address);
                d.by_address.entry(entry.address).or_default().insert(name);
            }
        }
        d
    }

    pub fn addresses(&self, name: &str) -> Option<&BTreeSet<Ipv4Addr>> {
        self.by_name.get(&normal(name))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this reply back.
    Reply(Vec<u8>),
    /// Not a name of the network: pass the query on, unchanged.
    Forward,
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa`) asks about.
fn reverse_address(name: &str) -> Option<Ipv4Addr> {
    let octets = normal(name);
    let octets = octets.strip_suffix(".in-addr.arpa")?;
    let mut parts: Vec<u8> = octets
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    if parts.len() != 4 {
        return None;
    }
    parts.reverse();
    Some(Ipv4Addr::new(parts[0], parts[1], parts[2], parts[3]))
}

/// Answers `query` (the bytes of a DNS message, as received) from `directory`, or
/// leaves it to the server it was sent to. `udp`: the reply must fit the client's
/// UDP limit (else it is truncated and the client asks again over TCP).
pub fn answer(query: &[u8], directory: &Directory, udp: bool) -> Answer {
    let Ok(request) = Message::from_vec(query) else {
        return Answer::Forward; // not for weft to judge
    };
    let meta = &request.metadata;
    if meta.message_type != MessageType::Query
        || meta.op_code != OpCode::Query
        || request.queries.len() != 1
    {
        return Answer::Forward;
    }
    let question = &request.queries[0];
    if question.query_class != DNSClass::IN {
        return Answer::Forward;
    }
    let asked = question.name.to_ascii();
    let records: Vec<RData> = if let Some(addresses) = directory.addresses(&asked) {
        match question.query_type {
            RecordType::A | RecordType::ANY => addresses.iter().map(|a| RData::A(A(*a))).collect(),
            // The name exists, with IPv4 addresses only: an empty answer, never an
            // NXDOMAIN (musl fails the whole lookup on one).
            _ => Vec::new(),
        }
    } else if let Some(names) = reverse_address(&asked).and_then(|a| directory.by_address.get(&a)) {
        if !matches!(question.query_type, RecordType::PTR | RecordType::ANY) {
            return Answer::Forward;
        }
        names
            .iter()
            .filter_map(|n| Name::from_ascii(format!("{n}.")).ok())
            .map(|n| RData::PTR(PTR(n)))
            .collect()
    } else {
        return Answer::Forward;
    };

    let mut reply = Message::response(meta.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = meta.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = ResponseCode::NoError;
    reply.add_query(question.clone());
    for data in records {
        reply.add_answer(Record::from_rdata(question.name.clone(), ANSWER_TTL, data));
    }
    let limit = match &request.edns {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(CLASSIC_UDP_LIMIT as u16));
            reply.set_edns(ours);
            usize::from(edns.max_payload()).max(CLASSIC_UDP_LIMIT)
        }
        None => CLASSIC_UDP_LIMIT,
    };
    match reply.to_vec() {
        Ok(bytes) if !udp || bytes.len() <= limit => Answer::Reply(bytes),
        Ok(_) => match reply.truncate().to_vec() {
            Ok(bytes) => Answer::Reply(bytes),
            Err(_) => Answer::Forward,
        },
        Err(_) => Answer::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::NameEntry;
    use hickory_proto::op::Query;

    fn directory() -> Directory {
        let entry = |address: [u8; 4], names: &[&str]| NameEntry {
            address: address.into(),
            container: "c".into(),
            names: names.iter().map(|n| n.to_string()).collect(),
        };
        let h1 = NamesRecord {
            entries: vec![entry([10, 70, 0, 2], &["web", "Shop"])],
        };
        let h2 = NamesRecord {
            entries: vec![
                entry([10, 70, 1, 2], &["db"]),
                entry([10, 70, 1, 3], &["shop"]),
            ],
        };
        Directory::from_records([&h1, &h2])
    }

    fn ask(name: &str, ty: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        m.to_vec().unwrap()
    }

    fn reply(answer: Answer) -> Message {
        match answer {
            Answer::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
            Answer::Forward => panic!("forwarded, not answered"),
        }
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_name_of_the_network_is_answered_with_its_address() {
        let m = reply(answer(&ask("web.", RecordType::A), &directory(), true));
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(addresses(&m), vec![Ipv4Addr::new(10, 70, 0, 2)]);
        assert_eq!(m.answers[0].ttl, ANSWER_TTL);
    }

    #[test]
    fn an_alias_answers_with_every_holder_on_every_host_whatever_the_case() {
        let m = reply(answer(&ask("SHOP", RecordType::A), &directory(), true));
        assert_eq!(
            addresses(&m),
            vec![Ipv4Addr::new(10, 70, 0, 2), Ipv4Addr::new(10, 70, 1, 3)]
        );
    }

    #[test]
    fn other_names_go_on_unchanged() {
        let d = directory();
        assert_eq!(
            answer(&ask("example.org.", RecordType::A), &d, true),
            Answer::Forward
        );
        assert_eq!(
            answer(&ask("web.example.org.", RecordType::A), &d, true),
            Answer::Forward
        );
        assert_eq!(answer(b"not dns", &d, true), Answer::Forward);
        // Nothing is answered from an empty directory (another network's names).
        assert_eq!(
            answer(&ask("web.", RecordType::A), &Directory::default(), true),
            Answer::Forward
        );
    }

    #[test]
    fn other_types_of_a_known_name_get_an_empty_answer_not_nxdomain() {
        let m = reply(answer(&ask("db", RecordType::AAAA), &directory(), true));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn a_reverse_lookup_of_a_known_address_names_it() {
        let m = reply(answer(
            &ask("2.1.70.10.in-addr.arpa.", RecordType::PTR),
            &directory(),
            true,
        ));
        let names: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect();
        assert_eq!(names, vec!["db."]);
        assert_eq!(
            answer(
                &ask("9.9.70.10.in-addr.arpa.", RecordType::PTR),
                &directory(),
                true
            ),
            Answer::Forward
        );
    }

    #[test]
    fn a_reply_too_large_for_udp_is_truncated() {
        let many = NamesRecord {
            entries: (1..=60)
                .map(|i| NameEntry {
                    address: Ipv4Addr::new(10, 70, 2, i),
                    container: format!("c{i}"),
                    names: ["many".to_string()].into(),
                })
                .collect(),
        };
        let d = Directory::from_records([&many]);
        let m = reply(answer(&ask("many", RecordType::A), &d, true));
        assert!(m.metadata.truncation);
        let m = reply(answer(&ask("many", RecordType::A), &d, false));
        assert_eq!(addresses(&m).len(), 60);
    }
}
