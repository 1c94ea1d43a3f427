//! Partitions: every aggregate belongs to one of a fixed number of partitions, by a hash of its id.
//!
//! [`partition_of`] is nats-server's own `partition(n, 1)` subject-mapping function, so that a
//! stream split by the server (a subject transform `{{partition(n,1)}}`) puts each aggregate in
//! the partition ordo gives it. ordo needs it where the server cannot compute it: a command's
//! aggregate id is in its body, not its subject.

/// How many partitions the command service and the projectors spread aggregates over, unless
/// told otherwise (`--partitions`).
pub const DEFAULT_PARTITIONS: u32 = 16;

/// A partition number, `0..count`.
pub type Partition = u32;

/// The partition of `aggregate_id` among `count`: FNV-1a (32 bits) of the id's bytes, modulo
/// `count`, as nats-server's `partition(count, 1)` mapping computes it for a one-token wildcard.
pub fn partition_of(aggregate_id: &str, count: u32) -> Partition {
    let hash = aggregate_id
        .as_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
        });
    hash % count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_as_published() {
        // The reference values of FNV-1a 32 (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(partition_of("", u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_of("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_of("foobar", u32::MAX), 0xbf9c_f968);
        // nats-server's partition(16,1) of the token "o-1": FNV-1a 0xf5906368, bucket 8.
        assert_eq!(partition_of("o-1", 16), 8);
        assert_eq!(partition_of("o-2", 16), 1);
    }

    #[test]
    fn every_partition_gets_aggregates() {
        let mut counts = [0u32; 16];
        for i in 0..1600 {
            counts[partition_of(&format!("order-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|count| *count > 60), "{counts:?}");
    }
}
