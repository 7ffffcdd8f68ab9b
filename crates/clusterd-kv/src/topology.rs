//! Reading the cluster topology from a node: `CLUSTER SHARDS` (Redis 7+), falling back to
//! `CLUSTER SLOTS` on servers that do not know it, parsed into a [`ClusterMap`] of the
//! masters. Every topology command sent is counted, so tests and benches can compare the
//! load a host puts on the cluster with and without a shared map.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use redis::Value;

use crate::error::{Error, Result};
use crate::map::ClusterMap;
use crate::pool::{Pool, split_addr};

/// Asks the nodes in `candidates`, in order, for the topology; the first usable answer wins.
/// `shards_supported` is cleared (for good) when a node does not know `CLUSTER SHARDS`.
pub async fn fetch(
    pool: &Pool,
    candidates: &[String],
    shards_supported: &AtomicBool,
    topology_commands: &AtomicU64,
) -> Result<ClusterMap> {
    let mut last = None;
    for addr in candidates {
        match fetch_from(pool, addr, shards_supported, topology_commands).await {
            Ok(map) => return Ok(map),
            Err(e) => last = Some(Box::new(e)),
        }
    }
    Err(Error::Topology {
        tried: candidates.join(", "),
        last,
    })
}

async fn fetch_from(
    pool: &Pool,
    addr: &str,
    shards_supported: &AtomicBool,
    topology_commands: &AtomicU64,
) -> Result<ClusterMap> {
    let mut conn = pool.get(addr).await?;
    let failed = |command, source: redis::RedisError| {
        if source.is_io_error() || source.is_timeout() {
            pool.forget(addr);
        }
        Error::Command {
            addr: addr.to_string(),
            command,
            source,
        }
    };
    if shards_supported.load(Ordering::Relaxed) {
        topology_commands.fetch_add(1, Ordering::Relaxed);
        match redis::cmd("CLUSTER")
            .arg("SHARDS")
            .query_async::<Value>(&mut conn)
            .await
        {
            Ok(reply) => return usable(addr, parse_shards(addr, &reply)?),
            Err(e) if is_unknown_subcommand(&e) => shards_supported.store(false, Ordering::Relaxed),
            Err(e) => return Err(failed("CLUSTER SHARDS", e)),
        }
    }
    topology_commands.fetch_add(1, Ordering::Relaxed);
    let reply = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async::<Value>(&mut conn)
        .await
        .map_err(|e| failed("CLUSTER SLOTS", e))?;
    usable(addr, parse_slots(addr, &reply)?)
}

/// A node outside a working cluster answers with no slots: not a topology to route by.
fn usable(addr: &str, map: ClusterMap) -> Result<ClusterMap> {
    if map.served_slots() == 0 {
        return Err(bad(addr, "the node reports no assigned slots".into()));
    }
    Ok(map)
}

fn is_unknown_subcommand(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("unknown subcommand") || text.contains("unknown command")
}

fn bad(addr: &str, reason: String) -> Error {
    Error::BadTopology {
        addr: addr.to_string(),
        reason,
    }
}

/// Parses `CLUSTER SHARDS`: per shard, `slots` (start/end pairs) and `nodes` (field/value
/// lists with `role`, `endpoint`/`ip` and `port`); the master of each shard serves its slots.
pub fn parse_shards(addr: &str, reply: &Value) -> Result<ClusterMap> {
    let shards =
        as_array(reply).ok_or_else(|| bad(addr, "CLUSTER SHARDS is not an array".into()))?;
    let mut ranges = Vec::new();
    for shard in shards {
        let fields = pairs(shard).ok_or_else(|| bad(addr, "a shard is not a field list".into()))?;
        let slots = field(&fields, "slots").and_then(as_array).unwrap_or(&[]);
        let nodes = field(&fields, "nodes").and_then(as_array).unwrap_or(&[]);
        let master = nodes
            .iter()
            .filter_map(pairs)
            .find(|n| field(n, "role").and_then(as_string).as_deref() == Some("master"));
        let Some(master) = master else {
            continue; // a shard without a master serves nothing until a failover
        };
        let host = ["endpoint", "ip"]
            .iter()
            .filter_map(|k| field(&master, k).and_then(as_string))
            .find(|h| !h.is_empty() && h != "?")
            .unwrap_or_else(|| queried_host(addr));
        let port = field(&master, "port")
            .or_else(|| field(&master, "tls-port"))
            .and_then(as_int)
            .ok_or_else(|| bad(addr, "a master has no port".into()))?;
        let node = format!("{host}:{port}");
        for pair in slots.chunks(2) {
            let (Some(first), Some(last)) =
                (pair.first().and_then(as_int), pair.get(1).and_then(as_int))
            else {
                return Err(bad(addr, "slot ranges are not integer pairs".into()));
            };
            ranges.push((slot(addr, first)?, slot(addr, last)?, node.clone()));
        }
    }
    Ok(ClusterMap::from_ranges(
        ranges.iter().map(|(a, b, n)| (*a, *b, n.as_str())),
    ))
}

/// Parses `CLUSTER SLOTS`: `[first, last, [host, port, id, ...], replicas...]` per range.
pub fn parse_slots(addr: &str, reply: &Value) -> Result<ClusterMap> {
    let entries =
        as_array(reply).ok_or_else(|| bad(addr, "CLUSTER SLOTS is not an array".into()))?;
    let mut ranges = Vec::new();
    for entry in entries {
        let items =
            as_array(entry).ok_or_else(|| bad(addr, "a slot range is not an array".into()))?;
        let (Some(first), Some(last), Some(master)) = (
            items.first().and_then(as_int),
            items.get(1).and_then(as_int),
            items.get(2).and_then(as_array),
        ) else {
            return Err(bad(addr, "a slot range lacks first, last or master".into()));
        };
        let host = master
            .first()
            .and_then(as_string)
            .filter(|h| !h.is_empty() && h != "?")
            .unwrap_or_else(|| queried_host(addr));
        let port = master
            .get(1)
            .and_then(as_int)
            .ok_or_else(|| bad(addr, "a master has no port".into()))?;
        ranges.push((
            slot(addr, first)?,
            slot(addr, last)?,
            format!("{host}:{port}"),
        ));
    }
    Ok(ClusterMap::from_ranges(
        ranges.iter().map(|(a, b, n)| (*a, *b, n.as_str())),
    ))
}

/// Redis leaves a node's host empty when it means "the node you asked".
fn queried_host(addr: &str) -> String {
    split_addr(addr).map_or_else(String::new, |(h, _)| h.to_string())
}

fn slot(addr: &str, n: i64) -> Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|&s| s < 16384)
        .ok_or_else(|| bad(addr, format!("slot {n} out of range")))
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// A field/value list: a RESP2 flat array or a RESP3 map.
fn pairs(v: &Value) -> Option<Vec<(&Value, &Value)>> {
    match v {
        Value::Array(items) if items.len() % 2 == 0 => {
            Some(items.chunks(2).map(|p| (&p[0], &p[1])).collect())
        }
        Value::Map(items) => Some(items.iter().map(|(k, v)| (k, v)).collect()),
        _ => None,
    }
}

fn field<'a>(fields: &[(&Value, &'a Value)], name: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| as_string(k).as_deref() == Some(name))
        .map(|(_, v)| *v)
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => as_string(other)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(ip: &str, endpoint: &str, port: i64, role: &str) -> Value {
        Value::Array(vec![
            bulk("id"),
            bulk("abc"),
            bulk("port"),
            Value::Int(port),
            bulk("ip"),
            bulk(ip),
            bulk("endpoint"),
            bulk(endpoint),
            bulk("role"),
            bulk(role),
            bulk("health"),
            bulk("online"),
        ])
    }

    fn shard(ranges: &[i64], nodes: Vec<Value>) -> Value {
        Value::Array(vec![
            bulk("slots"),
            Value::Array(ranges.iter().map(|&n| Value::Int(n)).collect()),
            bulk("nodes"),
            Value::Array(nodes),
        ])
    }

    #[test]
    fn shards_map_slots_to_masters() {
        let reply = Value::Array(vec![
            shard(
                &[0, 5460, 10000, 10001],
                vec![
                    node("10.0.0.2", "10.0.0.2", 7003, "replica"),
                    node("10.0.0.1", "10.0.0.1", 7000, "master"),
                ],
            ),
            shard(
                &[5461, 9999, 10002, 16383],
                vec![node("10.0.0.3", "?", 7001, "master")],
            ),
            shard(&[], vec![node("10.0.0.4", "", 7002, "master")]),
        ]);
        let map = parse_shards("10.0.0.9:7000", &reply).unwrap();
        assert_eq!(map.node_for_slot(0), Some("10.0.0.1:7000"));
        assert_eq!(map.node_for_slot(10001), Some("10.0.0.1:7000"));
        assert_eq!(
            map.node_for_slot(10002),
            Some("10.0.0.3:7001"),
            "endpoint '?' uses the ip"
        );
        assert_eq!(map.served_slots(), 16384);
        assert_eq!(map.nodes().len(), 2, "slotless masters are not routed to");
    }

    #[test]
    fn resp3_maps_and_empty_endpoints_are_understood() {
        let master = Value::Map(vec![
            (bulk("port"), Value::Int(7005)),
            (bulk("endpoint"), bulk("")),
            (bulk("ip"), bulk("")),
            (bulk("role"), Value::SimpleString("master".into())),
        ]);
        let reply = Value::Array(vec![Value::Map(vec![
            (
                bulk("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(16383)]),
            ),
            (bulk("nodes"), Value::Array(vec![master])),
        ])]);
        let map = parse_shards("127.0.0.1:7000", &reply).unwrap();
        assert_eq!(map.node_for_slot(7), Some("127.0.0.1:7005"));
    }

    #[test]
    fn slots_reply_is_parsed() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id1")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id4")]),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                Value::Array(vec![bulk(""), Value::Int(7001), bulk("id2")]),
            ]),
        ]);
        let map = parse_slots("127.0.0.9:7009", &reply).unwrap();
        assert_eq!(map.node_for_slot(8191), Some("127.0.0.1:7000"));
        assert_eq!(map.node_for_slot(8192), Some("127.0.0.9:7001"));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for reply in [
            Value::Int(3),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![shard(&[0, 99999], vec![node("h", "h", 1, "master")])]),
            Value::Array(vec![shard(
                &[0, 5],
                vec![Value::Array(vec![bulk("role"), bulk("master")])],
            )]),
        ] {
            assert!(
                matches!(parse_shards("h:1", &reply), Err(Error::BadTopology { .. })),
                "{reply:?}"
            );
        }
        assert!(
            parse_slots(
                "h:1",
                &Value::Array(vec![Value::Array(vec![Value::Int(0)])])
            )
            .is_err()
        );
        assert!(usable("h:1", ClusterMap::empty()).is_err());
    }
}
