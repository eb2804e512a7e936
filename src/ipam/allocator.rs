//! Pure address arithmetic: blocks of a pool and the next free address in a block.
//! No I/O, so property tests can hammer it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The block (an aligned `/block_prefix` of `pool`) that holds `ip`. When the pool is
/// smaller than a block, the pool itself is the only block.
pub fn block_of(pool: Ipv4Network, block_prefix: u8, ip: Ipv4Addr) -> Ipv4Network {
    let prefix = block_prefix.max(pool.prefix());
    Ipv4Network::new(ip, prefix)
        .map(|n| Ipv4Network::new(n.network(), prefix).expect("valid prefix"))
        .expect("prefix checked by caller")
}

/// Every block of `pool` that overlaps `range`, in address order.
pub fn blocks_overlapping(
    pool: Ipv4Network,
    block_prefix: u8,
    range: Ipv4Network,
) -> impl Iterator<Item = Ipv4Network> {
    let prefix = block_prefix.max(pool.prefix());
    let size = 1u64 << (32 - prefix);
    let start = u32::from(pool.network()) as u64;
    let count = 1u64 << (prefix - pool.prefix());
    (0..count).filter_map(move |i| {
        let net = Ipv4Addr::from((start + i * size) as u32);
        let block = Ipv4Network::new(net, prefix).expect("valid prefix");
        overlaps(block, range).then_some(block)
    })
}

pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Whether `ip` may be handed to a container at all: inside the pool and not the
/// pool's network or broadcast address (for pools that have those).
pub fn is_host_address(pool: Ipv4Network, ip: Ipv4Addr) -> bool {
    if !pool.contains(ip) {
        return false;
    }
    if pool.prefix() >= 31 {
        return true;
    }
    ip != pool.network() && ip != pool.broadcast()
}

/// The lowest address of `block ∩ range` that is a host address of `pool` and is
/// neither taken nor reserved.
pub fn first_free(
    pool: Ipv4Network,
    block: Ipv4Network,
    range: Ipv4Network,
    taken: &BTreeSet<Ipv4Addr>,
    reserved: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    free(pool, block, range, taken, reserved).next()
}

/// Every address of `block ∩ range` that is a host address of `pool` and is neither
/// taken nor reserved, in order.
pub fn free<'a>(
    pool: Ipv4Network,
    block: Ipv4Network,
    range: Ipv4Network,
    taken: &'a BTreeSet<Ipv4Addr>,
    reserved: &'a BTreeSet<Ipv4Addr>,
) -> impl Iterator<Item = Ipv4Addr> + 'a {
    let lo = u32::from(block.network()).max(u32::from(range.network()));
    let hi = u32::from(block.broadcast()).min(u32::from(range.broadcast()));
    (lo..=hi).map(Ipv4Addr::from).filter(move |ip| {
        is_host_address(pool, *ip) && !taken.contains(ip) && !reserved.contains(ip)
    })
}

/// The conventional default gateway: the first host address of the pool.
pub fn default_gateway(pool: Ipv4Network) -> Ipv4Addr {
    if pool.prefix() >= 31 {
        pool.network()
    } else {
        Ipv4Addr::from(u32::from(pool.network()) + 1)
    }
}

/// Candidate pools of size `/prefix` carved from `space`, in order.
pub fn candidate_pools(space: Ipv4Network, prefix: u8) -> impl Iterator<Item = Ipv4Network> {
    blocks_overlapping(space, prefix, space)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_are_aligned_and_cover_only_the_range() {
        let pool = net("10.42.0.0/16");
        let blocks: Vec<_> = blocks_overlapping(pool, 26, net("10.42.1.0/24")).collect();
        assert_eq!(
            blocks,
            vec![
                net("10.42.1.0/26"),
                net("10.42.1.64/26"),
                net("10.42.1.128/26"),
                net("10.42.1.192/26")
            ]
        );
        assert_eq!(
            block_of(pool, 26, "10.42.1.77".parse().unwrap()),
            net("10.42.1.64/26")
        );
        // A pool smaller than a block is one block.
        assert_eq!(
            block_of(net("10.9.0.0/28"), 26, "10.9.0.3".parse().unwrap()),
            net("10.9.0.0/28")
        );
    }

    #[test]
    fn first_free_skips_network_broadcast_taken_and_reserved() {
        let pool = net("10.0.0.0/30");
        let none = BTreeSet::new();
        assert_eq!(
            first_free(pool, pool, pool, &none, &none),
            Some("10.0.0.1".parse().unwrap())
        );
        let reserved = BTreeSet::from(["10.0.0.1".parse().unwrap()]);
        assert_eq!(
            first_free(pool, pool, pool, &none, &reserved),
            Some("10.0.0.2".parse().unwrap())
        );
        let taken = BTreeSet::from(["10.0.0.2".parse().unwrap()]);
        assert_eq!(
            first_free(pool, pool, pool, &taken, &reserved),
            None,
            "broadcast is never handed out"
        );
    }

    proptest! {
        #[test]
        fn first_free_result_is_always_allowed(
            base in any::<u32>(), pool_prefix in 16u8..=30, block_extra in 0u8..=6,
            range_extra in 0u8..=4, taken_bits in proptest::collection::vec(any::<u16>(), 0..64),
        ) {
            let pool = Ipv4Network::new(Ipv4Addr::from(base), pool_prefix).unwrap();
            let pool = Ipv4Network::new(pool.network(), pool_prefix).unwrap();
            let block_prefix = (pool_prefix + block_extra).min(32);
            let range_prefix = (pool_prefix + range_extra).min(32);
            let range = Ipv4Network::new(pool.network(), range_prefix).unwrap();
            let size = pool.size();
            let taken: BTreeSet<Ipv4Addr> = taken_bits.iter()
                .map(|b| Ipv4Addr::from(u32::from(pool.network()) + (*b as u32 % size))).collect();
            let reserved = BTreeSet::from([default_gateway(pool)]);
            for block in blocks_overlapping(pool, block_prefix, range) {
                prop_assert!(pool.contains(block.network()) && pool.contains(block.broadcast()));
                if let Some(ip) = first_free(pool, block, range, &taken, &reserved) {
                    prop_assert!(block.contains(ip) && range.contains(ip));
                    prop_assert!(is_host_address(pool, ip));
                    prop_assert!(!taken.contains(&ip) && !reserved.contains(&ip));
                }
            }
        }
    }
}
