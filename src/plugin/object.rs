//! [`Object`]: a manifest object as the sources and the object store keep it, its compact JSON
//! text. A decoded `serde_json::Value` with its key order (an index map per JSON object, a
//! `String` per key) costs about five times its text; at 50,000 plugins that was the largest
//! part of the memory per plugin. What is read on every change (the typed spec, the resource
//! version) is kept typed beside it; the rest is decoded when a change needs it (`pluginConfig`
//! when an ECDS resource is built, the whole object for a merge patch).
//!
//! Each object also keeps a digest of its decoded value that does not depend on the order of keys
//! ([`value_digest`]): objects whose digests differ are different, so telling a changed object
//! from the stored one (every change of every plugin) decodes nothing.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// The compact JSON text of an object, key order as written, shared by its holders (one `Arc`).
///
/// Equality is that of the decoded values (as for `serde_json::Value`: the order of keys does not
/// matter), so re-writing an object with its keys in another order is no change; objects with
/// different digests are told apart without decoding, equal texts are compared as texts, and only
/// equal digests of different texts (keys re-ordered) are decoded.
#[derive(Clone)]
pub struct Object(Arc<str>, u64);

impl Object {
    /// The compact text of `value`.
    pub fn new(value: &Value) -> Self {
        Object(
            serde_json::to_string(value)
                .expect("a JSON value serializes")
                .into(),
            value_digest(value),
        )
    }

    /// The decoded object. The text was written from a value, so it decodes (with no nesting
    /// limit: sources bound the nesting of what they decode).
    pub fn value(&self) -> Value {
        #[cfg(test)]
        DECODES.with(|d| d.set(d.get() + 1));
        let mut de = serde_json::Deserializer::from_str(&self.0);
        de.disable_recursion_limit();
        Value::deserialize(&mut de).expect("an object's own text decodes")
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        &self.0
    }

    /// Whether both are the one shared text.
    pub fn ptr_eq(&self, other: &Object) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// `kind`, `metadata.name` and `metadata.namespace`, where they are strings, without decoding
    /// the rest of the object.
    pub fn head(&self) -> Head {
        #[derive(Deserialize)]
        struct Meta {
            name: Option<Value>,
            namespace: Option<Value>,
        }
        #[derive(Deserialize)]
        struct Raw {
            kind: Option<Value>,
            metadata: Option<Value>,
        }
        let string = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let mut de = serde_json::Deserializer::from_str(&self.0);
        de.disable_recursion_limit();
        let Ok(raw) = Raw::deserialize(&mut de) else {
            return Head::default();
        };
        let meta = raw.metadata.and_then(|m| Meta::deserialize(m).ok());
        let (name, namespace) = match meta {
            Some(m) => (string(m.name), string(m.namespace)),
            None => (None, None),
        };
        Head {
            kind: string(raw.kind),
            name,
            namespace,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// How many times this thread decoded an object's text ([`Object::value`]): tests count the
    /// decodes a change costs.
    pub(crate) static DECODES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What [`Object::head`] reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

impl PartialEq for Object {
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other)
            || (self.1 == other.1 && (self.0 == other.0 || self.value() == other.value()))
    }
}

impl PartialEq<Value> for Object {
    fn eq(&self, other: &Value) -> bool {
        self.1 == value_digest(other) && self.value() == *other
    }
}

/// A hash of a JSON value under `serde_json::Value`'s equality: equal values (keys in any order)
/// have equal digests. An object's entries are hashed one by one and summed, so their order does
/// not count; numbers are hashed as they compare (an integer is never equal to a float, and
/// `0.0 == -0.0`).
pub fn value_digest(value: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    fn feed(value: &Value, h: &mut Mix) {
        match value {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, *b).hash(h),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    (2u8, u).hash(h);
                } else if let Some(i) = n.as_i64() {
                    (3u8, i).hash(h);
                } else {
                    let f = n.as_f64().unwrap_or_default();
                    (4u8, if f == 0.0 { 0 } else { f.to_bits() }).hash(h);
                }
            }
            Value::String(s) => (5u8, s.as_str()).hash(h),
            Value::Array(items) => {
                (6u8, items.len()).hash(h);
                for item in items {
                    feed(item, h);
                }
            }
            Value::Object(map) => {
                let entries = map.iter().fold(0u64, |sum, (k, v)| {
                    let mut entry = Mix::default();
                    k.hash(&mut entry);
                    feed(v, &mut entry);
                    sum.wrapping_add(entry.finish())
                });
                (7u8, map.len(), entries).hash(h);
            }
        }
    }
    let mut h = Mix::default();
    feed(value, &mut h);
    h.finish()
}

/// A fast multiply-rotate hash (FxHash's step, eight bytes at a time, finished with a
/// murmur-style avalanche). Not resistant to chosen collisions, and it need not be: a collision
/// only costs [`Object`]'s equality a decode of both texts.
#[derive(Default)]
struct Mix(u64);

impl Mix {
    const K: u64 = 0xf135_7aea_2e62_a9c5;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::K);
    }
}

impl std::hash::Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("eight bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            // The length keeps "a\0" apart from "a".
            self.add(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

impl From<&Value> for Object {
    fn from(value: &Value) -> Self {
        Object::new(value)
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keeps_key_order_and_compares_like_values() {
        let a = Object::new(&json!({"b": 1, "a": {"z": [1.5, "x"], "y": null}}));
        assert_eq!(a.text(), r#"{"b":1,"a":{"z":[1.5,"x"],"y":null}}"#);
        let reordered = Object::new(&json!({"a": {"y": null, "z": [1.5, "x"]}, "b": 1}));
        assert_ne!(a.text(), reordered.text());
        assert_eq!(a, reordered, "the order of keys is no difference");
        assert_ne!(
            a,
            Object::new(&json!({"b": 1.0, "a": {"z": [1.5, "x"], "y": null}}))
        );
        assert_eq!(
            a.value(),
            json!({"b": 1, "a": {"z": [1.5, "x"], "y": null}})
        );
        assert_eq!(a, a.value());
        assert_ne!(a, json!({"b": 2}));
    }

    #[test]
    fn digests_follow_value_equality() {
        let d = |v: Value| value_digest(&v);
        // Equal values: the same digest, whatever the order of keys.
        assert_eq!(
            d(json!({"a": {"x": 1, "y": [1, {"p": null, "q": true}]}, "b": "s"})),
            d(json!({"b": "s", "a": {"y": [1, {"q": true, "p": null}], "x": 1}}))
        );
        assert_eq!(d(json!(0.0)), d(json!(-0.0)));
        // Different values: different digests (moved entries, array order, number kinds).
        let differ = [
            (
                json!({"a": {"b": 1}, "c": 2}),
                json!({"a": {"c": 2}, "b": 1}),
            ),
            (json!({"a": 1, "b": 2}), json!({"a": 2, "b": 1})),
            (json!([1, 2]), json!([2, 1])),
            (json!([[1], []]), json!([[], [1]])),
            (json!(1), json!(1.0)),
            (json!(-1), json!(18446744073709551615u64)),
            (json!("1"), json!(1)),
            (json!(null), json!(false)),
            (json!({}), json!([])),
        ];
        for (a, b) in differ {
            assert_ne!(a, b);
            assert_ne!(d(a.clone()), d(b.clone()), "{a} vs {b}");
            assert_ne!(Object::new(&a), Object::new(&b));
        }
    }

    #[test]
    fn floats_and_deep_nesting_decode_as_they_were() {
        let floats = json!([0.1, 1e300, -2.5e-300, 123456789.12345678, 3.0]);
        assert_eq!(Object::new(&floats).value(), floats);
        let mut deep = json!("leaf");
        for _ in 0..500 {
            deep = json!({ "a": deep });
        }
        assert_eq!(Object::new(&deep).value(), deep);
    }

    #[test]
    fn head_reads_kind_and_names_only_where_they_are_strings() {
        let o = Object::new(&json!({"spec": {"x": [1]}, "kind": "WasmPlugin",
            "metadata": {"labels": {"a": "b"}, "name": "p", "namespace": "ns"}}));
        assert_eq!(
            o.head(),
            Head {
                kind: Some("WasmPlugin".into()),
                name: Some("p".into()),
                namespace: Some("ns".into())
            }
        );
        let odd = Object::new(&json!({"kind": 5, "metadata": {"name": ["p"]}}));
        assert_eq!(odd.head(), Head::default());
        assert_eq!(Object::new(&json!({"metadata": 1})).head(), Head::default());
        assert_eq!(Object::new(&json!([1])).head(), Head::default());
    }
}
