//! The wire encoding of the stream responses, sharing the bytes of the resources across streams.
//!
//! A protobuf message is the concatenation of its encoded fields, so a `DiscoveryResponse` (or a
//! `DeltaDiscoveryResponse`) is written as its few fields of its own (version, type URL, nonce,
//! removed names, the headers of the resource fields), copied into a small buffer per response,
//! around the encoded `Any` of each resource, which the store encoded once per version
//! ([`Entry::any`]) and which every response on every stream references as it is (a reference
//! count, no copy). Fields go in tag order, as prost writes them, so the bytes are exactly
//! prost's encoding of the same message (tests below).
//!
//! [`Encoded`] is a whole gRPC message (the 5-byte header: not compressed, length) as a list of
//! chunks; the response body of `grpc.rs` hands them to HTTP/2 one by one, and the transport
//! drops its reference once a chunk is written. However many streams a module is sent to, the
//! process holds the store's copy of it (and, until every stream wrote it, an older version's).

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use super::store::Entry;
use super::stream::{Nonce, Outstanding, NONCE_MAX};
use super::ECDS_TYPE_URL;

/// Shared parts shorter than this are copied into the response's own buffer: a reference costs
/// an HTTP/2 DATA frame of its own, a copy of a few hundred bytes costs less.
const SHARE_MIN: usize = 1024;

/// The gRPC message header: a compression flag and a 4-byte big-endian length.
const GRPC_HEADER: usize = 5;

/// A gRPC message ready to be written: header and message as chunks, the large ones shared.
/// A message with no shared part (small resources) is one buffer and allocates no list.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// The chunks before the last (empty when the message is one buffer).
    chunks: Vec<Bytes>,
    last: Bytes,
}

impl Encoded {
    /// The chunks in order.
    pub(crate) fn into_chunks(self) -> Chunks {
        Chunks {
            chunks: self.chunks.into_iter(),
            last: Some(self.last),
        }
    }

    #[cfg(test)]
    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        let mut all = self.chunks.clone();
        all.push(self.last.clone());
        all
    }

    /// The message as one buffer (tests).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.chunks().concat()
    }
}

/// The chunks of an [`Encoded`], in order.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    chunks: std::vec::IntoIter<Bytes>,
    last: Option<Bytes>,
}

impl Iterator for Chunks {
    type Item = Bytes;
    fn next(&mut self) -> Option<Bytes> {
        self.chunks.next().or_else(|| self.last.take())
    }
}

impl Chunks {
    /// Whether every chunk was taken.
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.len() == 0 && self.last.is_none()
    }
}

/// A response a stream state machine built, encoded by [`encode`].
pub(crate) trait Reply {
    /// The length of the encoded message (without the gRPC header).
    fn encoded_len(&self) -> usize;
    fn write(&self, w: &mut Writer);
}

/// The encoding of `reply` as a gRPC message; `OUT_OF_RANGE` (tonic's words) when the message is
/// longer than `max` bytes.
pub(crate) fn encode(reply: &impl Reply, max: usize) -> Result<Encoded, tonic::Status> {
    let len = reply.encoded_len();
    let limit = max.min(u32::MAX as usize);
    if len > limit {
        return Err(tonic::Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {limit} bytes"
        )));
    }
    let mut w = Writer {
        chunks: Vec::new(),
        buf: BytesMut::with_capacity((GRPC_HEADER + len).min(512)),
    };
    w.buf.put_u8(0);
    w.buf.put_u32(len as u32);
    reply.write(&mut w);
    // The header is in the buffer, so the last chunk is never a shared one.
    let last = match (w.buf.is_empty(), w.chunks.pop()) {
        (true, Some(last)) => last,
        (_, popped) => {
            w.chunks.extend(popped);
            w.buf.freeze()
        }
    };
    let encoded = Encoded {
        chunks: w.chunks,
        last,
    };
    debug_assert_eq!(
        encoded.chunks.iter().map(Bytes::len).sum::<usize>() + encoded.last.len(),
        GRPC_HEADER + len
    );
    Ok(encoded)
}

/// Writes the fields of a message: small ones into the response's buffer, shared ones by
/// reference.
pub(crate) struct Writer {
    chunks: Vec<Bytes>,
    buf: BytesMut,
}

impl Writer {
    /// The key and length of a length-delimited field of `len` bytes.
    fn header(&mut self, tag: u32, len: usize) {
        encode_key(tag, WireType::LengthDelimited, &mut self.buf);
        encode_varint(len as u64, &mut self.buf);
    }

    /// A `string` field; proto3 writes nothing for an empty one.
    fn string(&mut self, tag: u32, value: &str) {
        if !value.is_empty() {
            self.repeated_string(tag, value);
        }
    }

    /// The `string` field of a nonce, written from the stack.
    fn nonce(&mut self, tag: u32, nonce: &Nonce) {
        self.string(tag, nonce.text(&mut [0; NONCE_MAX]));
    }

    /// One element of a `repeated string` field (written even when empty).
    fn repeated_string(&mut self, tag: u32, value: &str) {
        self.header(tag, value.len());
        self.buf.put_slice(value.as_bytes());
    }

    /// Bytes encoded elsewhere, referenced unless short.
    fn shared(&mut self, bytes: &Bytes) {
        if bytes.len() < SHARE_MIN {
            self.buf.put_slice(bytes);
            return;
        }
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        self.chunks.push(bytes.clone());
    }
}

/// The encoded length of a `string` field (0 when empty).
fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        field_len(tag, value.len())
    }
}

/// The encoded length of a length-delimited field of `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A SotW `DiscoveryResponse`: `version_info` (1), `resources` (2), `type_url` (4), `nonce` (5).
#[derive(Debug)]
pub(crate) struct SotwReply<'a>(pub(crate) &'a Outstanding);

/// The encoded length of a nonce's field.
fn nonce_len(tag: u32, nonce: &Nonce) -> usize {
    string_len(tag, nonce.text(&mut [0; NONCE_MAX]))
}

impl Reply for SotwReply<'_> {
    fn encoded_len(&self) -> usize {
        let r = self.0;
        string_len(1, r.version())
            + (r.entries.iter())
                .map(|e| field_len(2, e.any.len()))
                .sum::<usize>()
            + string_len(4, ECDS_TYPE_URL)
            + nonce_len(5, &r.nonce)
    }

    fn write(&self, w: &mut Writer) {
        let r = self.0;
        w.string(1, r.version());
        for e in &r.entries {
            w.header(2, e.any.len());
            w.shared(&e.any);
        }
        w.string(4, ECDS_TYPE_URL);
        w.nonce(5, &r.nonce);
    }
}

/// A `DeltaDiscoveryResponse`: `system_version_info` (1), `resources` (2, each a `Resource`:
/// `version` 1, `resource` 2, `name` 3), `type_url` (4), `nonce` (5), `removed_resources` (6).
#[derive(Debug)]
pub(crate) struct DeltaReply<'a>(pub(crate) &'a Outstanding);

/// The encoded length of the `Resource` carrying `e`.
fn resource_len(e: &Entry) -> usize {
    string_len(1, &e.version) + field_len(2, e.any.len()) + string_len(3, &e.name)
}

impl Reply for DeltaReply<'_> {
    fn encoded_len(&self) -> usize {
        let r = self.0;
        string_len(1, r.version())
            + (r.entries.iter())
                .map(|e| field_len(2, resource_len(e)))
                .sum::<usize>()
            + string_len(4, ECDS_TYPE_URL)
            + nonce_len(5, &r.nonce)
            + (r.removed.iter())
                .map(|n| field_len(6, n.len()))
                .sum::<usize>()
    }

    fn write(&self, w: &mut Writer) {
        let r = self.0;
        w.string(1, r.version());
        for e in &r.entries {
            w.header(2, resource_len(e));
            w.string(1, &e.version);
            w.header(2, e.any.len());
            w.shared(&e.any);
            w.string(3, &e.name);
        }
        w.string(4, ECDS_TYPE_URL);
        w.nonce(5, &r.nonce);
        for name in &r.removed {
            w.repeated_string(6, name);
        }
    }
}

/// What a proxy decodes from a reply (tests of the state machines).
#[cfg(test)]
impl SotwReply<'_> {
    pub(crate) fn decode(
        &self,
    ) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
        let bytes = encode(self, usize::MAX).expect("no limit").to_vec();
        prost::Message::decode(&bytes[GRPC_HEADER..]).expect("a DiscoveryResponse")
    }
}

#[cfg(test)]
impl DeltaReply<'_> {
    pub(crate) fn decode(
        &self,
    ) -> envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
        let bytes = encode(self, usize::MAX).expect("no limit").to_vec();
        prost::Message::decode(&bytes[GRPC_HEADER..]).expect("a DeltaDiscoveryResponse")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::store::tests::config;
    use crate::xds::ResourceStore;
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message as _;
    use std::sync::Arc;

    /// A store holding `small` (a few bytes, copied into responses) and `big` (referenced).
    fn store() -> ResourceStore {
        let store = ResourceStore::new();
        store.set("small", config("1"));
        store.set("big", config(&"x".repeat(3 * SHARE_MIN)));
        store
    }

    /// prost's `Any` of a stored resource, built from the config rather than the store's bytes.
    fn any(name: &str, payload: &str) -> Any {
        let config = TypedExtensionConfig {
            name: name.into(),
            ..config(payload)
        };
        Any {
            type_url: ECDS_TYPE_URL.into(),
            value: config.encode_to_vec(),
        }
    }

    /// prost's encoding of `message` as a gRPC message.
    fn grpc(message: &impl prost::Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn entries(store: &ResourceStore, names: &[&str]) -> Vec<Arc<Entry>> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        store.lookup(&names)
    }

    #[test]
    fn sotw_bytes_are_prosts_encoding_of_the_same_response() {
        let store = store();
        let big = "x".repeat(3 * SHARE_MIN);
        for (names, nonce) in [
            (vec![], Nonce::new(1, 0)),
            (vec!["small"], Nonce::new(3, 0xdeadbeef)),
            (vec!["big", "small"], Nonce::new(u64::MAX, 0xcafe)),
        ] {
            let response = Outstanding::sotw(nonce, entries(&store, &names));
            let want = DiscoveryResponse {
                version_info: crate::xds::store::set_version(&response.entries),
                resources: (response.entries.iter())
                    .map(|e| match &*e.name {
                        "big" => any("big", &big),
                        _ => any("small", "1"),
                    })
                    .collect(),
                type_url: ECDS_TYPE_URL.into(),
                nonce: nonce.to_string(),
                ..Default::default()
            };
            let got = encode(&SotwReply(&response), usize::MAX).unwrap().to_vec();
            assert_eq!(got, grpc(&want), "{names:?}");
            assert_eq!(
                DiscoveryResponse::decode(&got[GRPC_HEADER..]).unwrap(),
                want
            );
        }
    }

    #[test]
    fn delta_bytes_are_prosts_encoding_including_removals() {
        let store = store();
        let big = "x".repeat(3 * SHARE_MIN);
        let resource = |e: &Arc<Entry>| Resource {
            name: e.name.to_string(),
            version: e.version.clone(),
            resource: Some(match &*e.name {
                "big" => any("big", &big),
                _ => any("small", "1"),
            }),
            ..Default::default()
        };
        for (names, removed) in [
            (vec![], vec!["gone"]),
            (vec![], vec!["gone", "", "also-gone"]),
            (vec!["big"], vec![]),
            (vec!["big", "small"], vec!["gone"]),
        ] {
            let nonce = Nonce::new(4, 0x00ff00ff);
            let removed: Vec<String> = removed.iter().map(|n| n.to_string()).collect();
            let response = Outstanding::delta(nonce, entries(&store, &names), removed, 77);
            let want = DeltaDiscoveryResponse {
                system_version_info: match names.len() {
                    0 => "77".to_string(),
                    _ => crate::xds::store::set_version(&response.entries),
                },
                resources: response.entries.iter().map(resource).collect(),
                type_url: ECDS_TYPE_URL.into(),
                removed_resources: response.removed.clone(),
                nonce: "4-00ff00ff".into(),
                ..Default::default()
            };
            let got = encode(&DeltaReply(&response), usize::MAX).unwrap().to_vec();
            assert_eq!(got, grpc(&want), "{names:?} {:?}", response.removed);
            assert_eq!(
                DeltaDiscoveryResponse::decode(&got[GRPC_HEADER..]).unwrap(),
                want
            );
        }
    }

    /// Nonces as sent: the counter in decimal, a dash, the random part in 8 hex digits; a nonce
    /// is only its own text.
    #[test]
    fn nonces_are_written_as_counter_dash_hex() {
        for (nonce, text) in [
            (Nonce::new(1, 0), "1-00000000"),
            (Nonce::new(12, 0xcafe), "12-0000cafe"),
            (
                Nonce::new(u64::MAX, u32::MAX),
                "18446744073709551615-ffffffff",
            ),
        ] {
            assert_eq!(nonce.to_string(), text);
            assert!(nonce.is(text));
            assert!(!nonce.is(&text[1..]));
            assert!(!nonce.is(&format!("{text}0")));
        }
        assert!(!Nonce::new(1, 0).is(""));
    }

    /// Two responses carrying the big resource reference the store's bytes, both of them; the
    /// small one is copied.
    #[test]
    fn responses_reference_the_stored_encoding() {
        let store = store();
        let stored = entries(&store, &["big", "small"]);
        let refs = |reply: &dyn Fn(Vec<Arc<Entry>>) -> Encoded| {
            let encoded = reply(entries(&store, &["big", "small"]));
            let points_at = |e: &Entry| {
                (encoded.chunks().iter())
                    .any(|c| c.as_ptr() == e.any.as_ptr() && c.len() == e.any.len())
            };
            (points_at(&stored[0]), points_at(&stored[1]))
        };
        let sotw = |entries| {
            let response = Outstanding::sotw(Nonce::new(1, 1), entries);
            encode(&SotwReply(&response), usize::MAX).unwrap()
        };
        let delta = |entries| {
            let response = Outstanding::delta(Nonce::new(2, 2), entries, vec![], 1);
            encode(&DeltaReply(&response), usize::MAX).unwrap()
        };
        assert_eq!(&*stored[0].name, "big");
        for _ in 0..2 {
            assert_eq!(refs(&sotw), (true, false));
            assert_eq!(refs(&delta), (true, false));
        }
    }

    /// A response of small resources is one buffer.
    #[test]
    fn a_small_response_is_one_chunk() {
        let store = store();
        let response = Outstanding::sotw(Nonce::new(1, 1), entries(&store, &["small"]));
        let encoded = encode(&SotwReply(&response), usize::MAX).unwrap();
        assert_eq!(encoded.chunks().len(), 1);
        assert_eq!(encoded.into_chunks().count(), 1);
    }

    #[test]
    fn a_response_over_the_limit_is_out_of_range() {
        let store = store();
        let response = Outstanding::sotw(Nonce::new(1, 1), entries(&store, &["big"]));
        let reply = SotwReply(&response);
        let len = reply.encoded_len();
        assert!(encode(&reply, len).is_ok());
        let status = encode(&reply, len - 1).unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(status.message().contains(&len.to_string()), "{status}");
    }
}
