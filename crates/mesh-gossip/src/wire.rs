//! Wire format: the packet header, table batches (UDP) and push-pull frames (TCP).
//!
//! Every UDP packet and every TCP frame starts with a 12-byte header:
//!
//! ```text
//! 0..2  magic "MG"
//! 2     format version (2: table records carry their birth time)
//! 3     kind: 1 = SWIM (foca message), 2 = table batch, 3 = push-pull frame,
//!       4 = membership batch
//! 4..12 cluster tag: FNV-1a 64 of the cluster key, big endian
//! ```
//!
//! A packet with a bad magic, version, kind or body is *malformed*; one with a good magic and
//! version but another cluster's tag is *foreign*. Bodies are postcard. A UDP packet is at
//! most [`MAX_UDP`] bytes. A table batch body is the network name followed by one or more
//! [`WireUpdate`]s (as many as fit); a membership batch body is the sender's [`NodeId`]
//! followed by one or more [`NetRecord`]s. A push-pull stream is a sequence of frames, each
//! `u32 length (big endian) | header | postcard frame`, at most [`MAX_FRAME`] bytes: `Hello`,
//! then chunks of foca members, network memberships and table entries, then `End`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::membership::NetRecord;
use crate::table::Record;

/// Header magic.
pub const MAGIC: [u8; 2] = *b"MG";
/// Format version.
pub const VERSION: u8 = 2;
/// Header length.
pub const HEADER_LEN: usize = 12;
/// Largest UDP payload sent or accepted.
pub const MAX_UDP: usize = 1400;
/// Largest push-pull frame accepted (length field, header and body excluded from nothing:
/// header plus body).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest whole push-pull stream accepted.
pub const MAX_SYNC_BYTES: usize = 256 << 20;
/// Target size of the chunks a push-pull stream is cut into.
const CHUNK: usize = 256 << 10;

/// What a packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Swim = 1,
    Table = 2,
    Sync = 3,
    Membership = 4,
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Bad length, magic, version, kind or encoding.
    Malformed(&'static str),
    /// Another cluster's tag.
    Foreign,
}

/// FNV-1a 64 of the cluster key: the tag in every header.
pub fn cluster_tag(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The header for a packet of `kind` in cluster `tag`.
pub fn header(kind: Kind, tag: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..2].copy_from_slice(&MAGIC);
    h[2] = VERSION;
    h[3] = kind as u8;
    h[4..].copy_from_slice(&tag.to_be_bytes());
    h
}

/// Checks a packet's header; returns its kind and body.
pub fn parse(data: &[u8], tag: u64) -> Result<(Kind, &[u8]), Reject> {
    if data.len() < HEADER_LEN {
        return Err(Reject::Malformed("short packet"));
    }
    if data[..2] != MAGIC || data[2] != VERSION {
        return Err(Reject::Malformed("bad magic or version"));
    }
    let kind = match data[3] {
        1 => Kind::Swim,
        2 => Kind::Table,
        3 => Kind::Sync,
        4 => Kind::Membership,
        _ => return Err(Reject::Malformed("unknown kind")),
    };
    let mut t = [0u8; 8];
    t.copy_from_slice(&data[4..HEADER_LEN]);
    if u64::from_be_bytes(t) != tag {
        return Err(Reject::Foreign);
    }
    Ok((kind, &data[HEADER_LEN..]))
}

/// One record of a table on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUpdate {
    pub table: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub version: u64,
    pub owner: Arc<str>,
    pub owner_gen: u64,
    /// The owner's wall clock when it wrote this version (see `Record::born_ms`).
    pub born_ms: u64,
}

impl WireUpdate {
    /// The wire form of a stored record.
    pub fn from_record(table: &str, key: &str, r: &Record) -> WireUpdate {
        WireUpdate {
            table: table.to_string(),
            key: key.to_string(),
            value: r.value.clone(),
            version: r.version,
            owner: r.owner.clone(),
            owner_gen: r.owner_gen,
            born_ms: r.born_ms,
        }
    }

    /// Splits into `(table, key, record)`.
    pub fn into_parts(self) -> (String, String, Record) {
        (
            self.table,
            self.key,
            Record {
                value: self.value,
                version: self.version,
                owner: self.owner,
                owner_gen: self.owner_gen,
                deleted_at: None,
                born_ms: self.born_ms,
            },
        )
    }
}

/// Encodes a value with postcard (encoding plain data into a `Vec` cannot fail).
pub fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

/// Packs encoded items into as few packets as possible (table updates of one network, or
/// membership records).
pub struct BatchWriter {
    prefix: Vec<u8>,
    cur: Vec<u8>,
    out: Vec<Vec<u8>>,
}

impl BatchWriter {
    /// A writer of table updates of `network` in cluster `tag`.
    pub fn new(tag: u64, network: &str) -> BatchWriter {
        let mut prefix = header(Kind::Table, tag).to_vec();
        prefix.extend_from_slice(&encode(network));
        BatchWriter::with_prefix(prefix)
    }

    /// A writer of membership records sent by `from` in cluster `tag`.
    pub fn memberships(tag: u64, from: &NodeId) -> BatchWriter {
        let mut prefix = header(Kind::Membership, tag).to_vec();
        prefix.extend_from_slice(&encode(from));
        BatchWriter::with_prefix(prefix)
    }

    fn with_prefix(prefix: Vec<u8>) -> BatchWriter {
        BatchWriter {
            cur: prefix.clone(),
            prefix,
            out: Vec::new(),
        }
    }

    /// Bytes an update may take in a packet of this network.
    pub fn room(&self) -> usize {
        MAX_UDP.saturating_sub(self.prefix.len())
    }

    /// Adds one encoded [`WireUpdate`]; `false` if it cannot fit any packet.
    pub fn push(&mut self, item: &[u8]) -> bool {
        if item.len() > self.room() {
            return false;
        }
        if self.cur.len() + item.len() > MAX_UDP {
            let full = std::mem::replace(&mut self.cur, self.prefix.clone());
            self.out.push(full);
        }
        self.cur.extend_from_slice(item);
        true
    }

    /// The packets.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        if self.cur.len() > self.prefix.len() {
            self.out.push(self.cur);
        }
        self.out
    }
}

/// Decodes a table batch body.
pub fn decode_table(body: &[u8]) -> Result<(String, Vec<WireUpdate>), Reject> {
    let bad = |_| Reject::Malformed("bad table batch");
    let (network, mut rest): (String, &[u8]) = postcard::take_from_bytes(body).map_err(bad)?;
    let mut updates = Vec::new();
    while !rest.is_empty() {
        let (u, r): (WireUpdate, &[u8]) = postcard::take_from_bytes(rest).map_err(bad)?;
        updates.push(u);
        rest = r;
    }
    if updates.is_empty() {
        return Err(Reject::Malformed("empty table batch"));
    }
    Ok((network, updates))
}

/// Decodes a membership batch body: the sender and its records.
pub fn decode_memberships(body: &[u8]) -> Result<(NodeId, Vec<NetRecord>), Reject> {
    let (from, mut body): (NodeId, &[u8]) =
        postcard::take_from_bytes(body).map_err(|_| Reject::Malformed("bad membership batch"))?;
    let mut out = Vec::new();
    while !body.is_empty() {
        let (r, rest): (NetRecord, &[u8]) = postcard::take_from_bytes(body)
            .map_err(|_| Reject::Malformed("bad membership batch"))?;
        out.push(r);
        body = rest;
    }
    if out.is_empty() {
        return Err(Reject::Malformed("empty membership batch"));
    }
    Ok((from, out))
}

/// One side's state in a push-pull exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncState {
    /// The sender.
    pub from: NodeId,
    /// The sender's networks (the answer covers the ones both have).
    pub networks: Vec<String>,
    /// The sender's foca membership state.
    pub members: Vec<foca::Member<NodeId>>,
    /// Every `(node, network)` record the sender knows.
    pub memberships: Vec<NetRecord>,
    /// Full tables (tombstones included) of networks the receiver is known to have.
    pub entries: Vec<(String, Vec<WireUpdate>)>,
}

/// A push-pull frame as written (borrowing).
#[derive(Serialize)]
enum FrameOut<'a> {
    Hello {
        from: &'a NodeId,
        networks: &'a [String],
    },
    Members(&'a [foca::Member<NodeId>]),
    Memberships(&'a [NetRecord]),
    Entries {
        network: &'a str,
        updates: &'a [WireUpdate],
    },
    End,
}

/// A push-pull frame as read (same encoding as [`FrameOut`]).
#[derive(Deserialize)]
enum FrameIn {
    Hello {
        from: NodeId,
        networks: Vec<String>,
    },
    Members(Vec<foca::Member<NodeId>>),
    Memberships(Vec<NetRecord>),
    Entries {
        network: String,
        updates: Vec<WireUpdate>,
    },
    End,
}

/// Cuts `items` into runs of at most about [`CHUNK`] encoded bytes.
fn chunks<T: Serialize>(items: &[T]) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        let n = encode(it).len();
        if size + n > CHUNK && i > start {
            out.push(&items[start..i]);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Appends one length-prefixed frame.
fn put_frame(out: &mut Vec<u8>, tag: u64, frame: &FrameOut<'_>) {
    let body = encode(frame);
    let len = u32::try_from(HEADER_LEN + body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&header(Kind::Sync, tag));
    out.extend_from_slice(&body);
}

/// The whole push-pull stream for `state`.
pub fn encode_sync(state: &SyncState, tag: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(
        &mut out,
        tag,
        &FrameOut::Hello {
            from: &state.from,
            networks: &state.networks,
        },
    );
    for c in chunks(&state.members) {
        put_frame(&mut out, tag, &FrameOut::Members(c));
    }
    for c in chunks(&state.memberships) {
        put_frame(&mut out, tag, &FrameOut::Memberships(c));
    }
    for (network, updates) in &state.entries {
        for c in chunks(updates) {
            put_frame(
                &mut out,
                tag,
                &FrameOut::Entries {
                    network,
                    updates: c,
                },
            );
        }
    }
    put_frame(&mut out, tag, &FrameOut::End);
    out
}

/// Checks a frame's length prefix; returns the length of the frame that follows.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, Reject> {
    let n = u32::from_be_bytes(prefix) as usize;
    if !(HEADER_LEN..=MAX_FRAME).contains(&n) {
        return Err(Reject::Malformed("bad frame length"));
    }
    Ok(n)
}

/// Reassembles a push-pull stream frame by frame.
pub struct SyncReader {
    tag: u64,
    state: Option<SyncState>,
    total: usize,
}

impl SyncReader {
    /// A reader for cluster `tag`.
    pub fn new(tag: u64) -> SyncReader {
        SyncReader {
            tag,
            state: None,
            total: 0,
        }
    }

    /// Feeds one frame (header and body, without the length prefix). Returns the state once
    /// the `End` frame is read.
    pub fn frame(&mut self, frame: &[u8]) -> Result<Option<SyncState>, Reject> {
        self.total = self.total.saturating_add(frame.len() + 4);
        if self.total > MAX_SYNC_BYTES {
            return Err(Reject::Malformed("push-pull stream too large"));
        }
        let (kind, body) = parse(frame, self.tag)?;
        if kind != Kind::Sync {
            return Err(Reject::Malformed("not a push-pull frame"));
        }
        let f: FrameIn =
            postcard::from_bytes(body).map_err(|_| Reject::Malformed("bad push-pull frame"))?;
        match (f, self.state.as_mut()) {
            (FrameIn::Hello { from, networks }, None) => {
                self.state = Some(SyncState {
                    from,
                    networks,
                    members: Vec::new(),
                    memberships: Vec::new(),
                    entries: Vec::new(),
                });
            }
            (FrameIn::Members(m), Some(s)) => s.members.extend(m),
            (FrameIn::Memberships(m), Some(s)) => s.memberships.extend(m),
            (FrameIn::Entries { network, updates }, Some(s)) => s.entries.push((network, updates)),
            (FrameIn::End, Some(_)) => return Ok(self.state.take()),
            _ => return Err(Reject::Malformed("push-pull frames out of order")),
        }
        Ok(None)
    }
}

/// Decodes a complete push-pull stream held in memory.
pub fn decode_sync(mut data: &[u8], tag: u64) -> Result<SyncState, Reject> {
    let mut r = SyncReader::new(tag);
    loop {
        if data.len() < 4 {
            return Err(Reject::Malformed("truncated push-pull stream"));
        }
        let n = frame_len([data[0], data[1], data[2], data[3]])?;
        let rest = &data[4..];
        if rest.len() < n {
            return Err(Reject::Malformed("truncated push-pull frame"));
        }
        if let Some(s) = r.frame(&rest[..n])? {
            return Ok(s);
        }
        data = &rest[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(key: &str, n: usize) -> WireUpdate {
        WireUpdate {
            table: "endpoints".into(),
            key: key.into(),
            value: Some(vec![7; n]),
            version: 1_700_000_000_000_000,
            owner: "node-1".into(),
            owner_gen: 1_700_000_000_000_000,
            born_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn header_roundtrip_and_foreign() {
        let tag = cluster_tag("cluster-a");
        let mut p = header(Kind::Table, tag).to_vec();
        p.push(1);
        assert_eq!(parse(&p, tag), Ok((Kind::Table, &[1u8][..])));
        assert_eq!(parse(&p, cluster_tag("cluster-b")), Err(Reject::Foreign));
        assert!(matches!(parse(&p[..5], tag), Err(Reject::Malformed(_))));
        p[0] = b'X';
        assert!(matches!(parse(&p, tag), Err(Reject::Malformed(_))));
        let mut q = header(Kind::Swim, tag).to_vec();
        q[3] = 9;
        assert!(matches!(parse(&q, tag), Err(Reject::Malformed(_))));
    }

    #[test]
    fn batches_pack_and_split_at_the_udp_limit() {
        let tag = cluster_tag("c");
        let mut w = BatchWriter::new(tag, "net");
        let items: Vec<WireUpdate> = (0..40).map(|i| upd(&format!("k{i}"), 100)).collect();
        for it in &items {
            assert!(w.push(&encode(it)));
        }
        assert!(!w.push(&encode(&upd("huge", 2000))));
        let packets = w.finish();
        assert!(packets.len() > 1);
        let mut got = Vec::new();
        for p in &packets {
            assert!(p.len() <= MAX_UDP);
            let (kind, body) = parse(p, tag).unwrap();
            assert_eq!(kind, Kind::Table);
            let (net, u) = decode_table(body).unwrap();
            assert_eq!(net, "net");
            got.extend(u);
        }
        assert_eq!(got, items);
    }

    #[test]
    fn sync_stream_roundtrip_in_chunks() {
        let tag = cluster_tag("c");
        let from = NodeId::new("a", "127.0.0.1:7946".parse().unwrap(), 3);
        let state = SyncState {
            from: from.clone(),
            networks: vec!["n1".into(), "n2".into()],
            members: vec![foca::Member::alive(from.clone())],
            memberships: vec![NetRecord {
                node: "a".into(),
                gen: 3,
                network: "n1".into(),
                version: 4,
                joined: true,
            }],
            entries: vec![(
                "n1".into(),
                (0..4000).map(|i| upd(&format!("key-{i}"), 200)).collect(),
            )],
        };
        let bytes = encode_sync(&state, tag);
        assert!(bytes.len() > 3 * CHUNK, "test must exercise chunking");
        let back = decode_sync(&bytes, tag).unwrap();
        assert_eq!(back.from, state.from);
        assert_eq!(back.networks, state.networks);
        assert_eq!(back.members, state.members);
        assert_eq!(back.memberships, state.memberships);
        let all: Vec<WireUpdate> = back.entries.into_iter().flat_map(|(_, u)| u).collect();
        assert_eq!(all, state.entries[0].1);
        assert_eq!(
            decode_sync(&bytes, cluster_tag("other")).unwrap_err(),
            Reject::Foreign
        );
        assert!(decode_sync(&bytes[..bytes.len() - 1], tag).is_err());
    }

    #[test]
    fn frame_length_is_bounded() {
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()).is_err());
        assert!(frame_len(3u32.to_be_bytes()).is_err());
        assert_eq!(frame_len(100u32.to_be_bytes()), Ok(100));
    }
}
