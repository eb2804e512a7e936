use std::sync::atomic::Ordering;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::driver::DriverConfig;
use crate::schema::NameEntry;
use crate::store::embedded::EmbeddedStore;
use crate::store::switchable::Switchable;

const OPEN: &str = "0a00000000000000000000000000000000000000000000000000000000000001";
const SHUT: &str = "0b00000000000000000000000000000000000000000000000000000000000002";

/// A host with two weft networks, 10.60.0.0/24 and an internal 10.61.0.0/24, and a
/// cluster store other hosts publish names into.
async fn resolver() -> (Resolver, Arc<Switchable>) {
    let local = Arc::new(EmbeddedStore::in_memory());
    let cluster = Arc::new(Switchable::new());
    let driver = Arc::new(
        Driver::new(
            local,
            Arc::new(FakeDatapath::new()),
            DriverConfig::default(),
        )
        .with_cluster(cluster.clone(), "h2".into()),
    );
    for (id, pool, internal) in [(OPEN, "10.60.0.0/24", false), (SHUT, "10.61.0.0/24", true)] {
        driver
            .create_network(
                serde_json::from_value(serde_json::json!({
                    "NetworkID": id,
                    "Options": {"com.docker.network.internal": internal},
                    "IPv4Data": [{"Pool": pool}],
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }
    (
        Resolver::new(DEFAULT_PORT, cluster.clone(), driver),
        cluster,
    )
}

async fn publish(store: &Switchable, subnet: &str, host: &str, entries: &[(&str, &str)]) {
    let record = NamesRecord {
        entries: entries
            .iter()
            .map(|(address, name)| NameEntry {
                address: address.parse().unwrap(),
                container: "c0".into(),
                names: [name.to_string()].into(),
            })
            .collect(),
    };
    let key = keys::names(subnet.parse().unwrap(), host);
    store.inner.delete(&key, None).await.unwrap();
    store
        .inner
        .create(&key, serde_json::to_vec(&record).unwrap())
        .await
        .unwrap();
}

fn ask(name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn addresses(d: Decision) -> Vec<Ipv4Addr> {
    let Decision::Reply(bytes) = d else {
        panic!("not answered: {d:?}");
    };
    Message::from_vec(&bytes)
        .unwrap()
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn from(a: &str) -> Ipv4Addr {
    a.parse().unwrap()
}

/// Where dockerd's embedded DNS sent the query (the lab's server).
fn server() -> SocketAddrV4 {
    "192.0.2.1:53".parse().unwrap()
}

/// `r`'s decision on an A query for `name` from `source`, handed over by TPROXY (UDP).
async fn query(r: &Resolver, name: &str, source: &str) -> Decision {
    r.decide(&ask(name), from(source), server(), true).await
}

#[tokio::test]
async fn names_are_answered_only_to_their_own_network() {
    let (r, store) = resolver().await;
    publish(&store, "10.60.0.0/24", "h1", &[("10.60.0.2", "web")]).await;
    publish(&store, "10.61.0.0/24", "h1", &[("10.61.0.2", "vault")]).await;
    r.refresh().await.unwrap();

    assert_eq!(
        addresses(query(&r, "web.", "10.60.0.9").await),
        [from("10.60.0.2")]
    );
    // Another network's name goes on to the server the query was for.
    assert_eq!(query(&r, "vault.", "10.60.0.9").await, Decision::Forward);
    assert_eq!(
        query(&r, "example.org.", "10.60.0.9").await,
        Decision::Forward
    );
    // From a link of weft's but no network known here (yet): passed on, never answered.
    assert_eq!(query(&r, "web.", "10.99.0.7").await, Decision::Forward);
    // Sent to the resolver's own port, not handed over by the firewall: nothing.
    let direct = SocketAddrV4::new(from("192.0.2.12"), DEFAULT_PORT);
    assert_eq!(
        r.decide(&ask("web."), from("10.60.0.9"), direct, true)
            .await,
        Decision::Drop
    );
    let s = r.status();
    assert_eq!((s.answered, s.forwarded, s.dropped), (1, 3, 1));
    assert_eq!((s.networks, s.names), (2, 2));
}

#[tokio::test]
async fn an_internal_network_gets_its_names_and_a_refusal_for_the_rest() {
    let (r, store) = resolver().await;
    publish(&store, "10.61.0.0/24", "h1", &[("10.61.0.2", "vault")]).await;
    r.refresh().await.unwrap();
    assert_eq!(
        addresses(query(&r, "vault.", "10.61.0.5").await),
        [from("10.61.0.2")]
    );
    let Decision::Reply(bytes) = r
        .decide(&ask("example.org."), from("10.61.0.5"), server(), true)
        .await
    else {
        panic!("an internal network's outside query must be refused, not passed on");
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert_eq!(m.queries.len(), 1);
}

#[tokio::test]
async fn a_removed_name_stops_resolving_and_an_outage_keeps_the_last_names() {
    let (r, store) = resolver().await;
    publish(
        &store,
        "10.60.0.0/24",
        "h1",
        &[("10.60.0.2", "web"), ("10.60.0.3", "db")],
    )
    .await;
    r.refresh().await.unwrap();
    assert_eq!(addresses(query(&r, "db.", "10.60.0.9").await).len(), 1);

    publish(&store, "10.60.0.0/24", "h1", &[("10.60.0.2", "web")]).await;
    r.refresh().await.unwrap();
    assert_eq!(query(&r, "db.", "10.60.0.9").await, Decision::Forward);

    // etcd down: the read fails, the names read last still answer, and other names
    // still go on.
    store.down.store(true, Ordering::SeqCst);
    assert!(r.refresh().await.is_err());
    assert_eq!(
        addresses(query(&r, "web.", "10.60.0.9").await),
        [from("10.60.0.2")]
    );
    assert_eq!(
        query(&r, "example.org.", "10.60.0.9").await,
        Decision::Forward
    );
}

#[tokio::test]
async fn with_etcd_down_from_the_start_every_query_goes_on() {
    let (r, store) = resolver().await;
    store.down.store(true, Ordering::SeqCst);
    assert!(r.refresh().await.is_err());
    assert_eq!(
        query(&r, "example.org.", "10.60.0.9").await,
        Decision::Forward
    );
}

#[tokio::test]
async fn the_names_are_read_again_when_woken() {
    let (r, store) = resolver().await;
    let r = Arc::new(r);
    let wake = Arc::new(Notify::new());
    tokio::spawn(r.clone().keep_fresh(wake.clone()));
    publish(&store, "10.60.0.0/24", "h1", &[("10.60.0.2", "web")]).await;
    wake.notify_one();
    let started = std::time::Instant::now();
    while r.status().names == 0 {
        assert!(started.elapsed() < REFRESH_EVERY, "not read when woken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_forwarded_query_gets_the_servers_own_reply() {
    // A stand-in for the server the query was going to, on loopback.
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(at) = upstream.local_addr().unwrap() else {
        unreachable!()
    };
    let serve = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let (n, peer) = upstream.recv_from(&mut buf).await.unwrap();
        // A stray datagram first (another ID), then the reply.
        upstream.send_to(b"\xff\xffstray", peer).await.unwrap();
        let mut reply = buf[..n].to_vec();
        reply.extend_from_slice(b"-answered");
        upstream.send_to(&reply, peer).await.unwrap();
    });
    let query = ask("example.org.");
    let reply = forward_udp(&query, at, UPSTREAM_DEADLINE).await.unwrap();
    assert_eq!(&reply[..query.len()], &query[..]);
    assert!(reply.ends_with(b"-answered"));
    serve.await.unwrap();
}

#[tokio::test]
async fn a_server_where_nothing_listens_is_known_at_once() {
    // A port nothing listens on: the ICMP error refuses the connected socket.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(at) = closed.local_addr().unwrap() else {
        unreachable!()
    };
    drop(closed);
    let started = std::time::Instant::now();
    let got = forward_udp(&ask("example.org."), at, UPSTREAM_DEADLINE).await;
    assert!(matches!(got, Err(Unanswered::Refused)), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let Some(bytes) = reply_with(&ask("example.org."), ResponseCode::ServFail) else {
        panic!("no SERVFAIL for a DNS query");
    };
    assert_eq!(
        Message::from_vec(&bytes).unwrap().metadata.response_code,
        ResponseCode::ServFail
    );
}

#[tokio::test]
async fn tcp_messages_are_framed_with_their_length() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let m = read_framed(&mut s).await.unwrap().unwrap();
        write_framed(&mut s, &m).await.unwrap();
        assert_eq!(read_framed(&mut s).await.unwrap(), None, "clean end");
    });
    let mut c = TcpStream::connect(at).await.unwrap();
    let query = ask("web.");
    write_framed(&mut c, &query).await.unwrap();
    assert_eq!(read_framed(&mut c).await.unwrap().unwrap(), query);
    drop(c);
    echo.await.unwrap();
}

#[test]
fn a_reply_too_large_to_send_raw_is_truncated_for_tcp() {
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii("many.").unwrap(),
        RecordType::A,
    ));
    let reply = addresses_reply(&m);
    let short = Message::from_vec(&truncated(&reply).unwrap()).unwrap();
    assert!(short.metadata.truncation);
    assert!(short.answers.is_empty());
    assert_eq!(short.queries.len(), 1);
    assert!(truncated(b"not dns").is_none());
}

/// A reply to `query` with a few A records.
fn addresses_reply(query: &Message) -> Vec<u8> {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.add_queries(query.queries.clone());
    for i in 1..=5 {
        reply.add_answer(hickory_proto::rr::Record::from_rdata(
            query.queries[0].name.clone(),
            2,
            RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(10, 60, 0, i))),
        ));
    }
    reply.to_vec().unwrap()
}
