//! Decoding YAML documents into JSON values within a bound on their expanded size.
//!
//! A YAML alias repeats its anchor's content wherever it is used, so a small text can stand for a
//! huge value: 200 KB of `b: [*a, *a, ...]` over a list of 100,000 numbers is five million values.
//! serde_yaml_ng refuses the exponential cases (its "repetition limit", and a "recursion limit" on
//! nesting) but not this linear one. The values are therefore counted while they are built, and
//! decoding stops at the first value past the [`Budget`]: the whole expansion never exists.
//! Without aliases a manifest file within its size limit never comes near the budget.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as _;
use serde_json::{Map, Number, Value};

/// The most values (each mapping, sequence, key and scalar counts one) the documents of one text
/// may decode to, aliases expanded.
pub const MAX_VALUES: usize = 1_000_000;
/// The most bytes of strings (keys included) the documents of one text may decode to.
pub const MAX_STRING_BYTES: usize = 16 << 20;

/// What the documents of one text may still decode to.
#[derive(Debug)]
pub struct Budget {
    values: usize,
    bytes: usize,
    /// Set once decoding was stopped for going past the budget.
    pub exceeded: bool,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            values: MAX_VALUES,
            bytes: MAX_STRING_BYTES,
            exceeded: false,
        }
    }
}

impl Budget {
    /// The one-line explanation of a text that went past the budget.
    pub fn message() -> String {
        format!(
            "too large once YAML aliases are expanded: more than {MAX_VALUES} values or \
             {MAX_STRING_BYTES} bytes of strings"
        )
    }

    fn take<E: de::Error>(&mut self, values: usize, bytes: usize) -> Result<(), E> {
        if self.values < values || self.bytes < bytes {
            self.exceeded = true;
            return Err(E::custom(Self::message()));
        }
        self.values -= values;
        self.bytes -= bytes;
        Ok(())
    }

    /// Decodes one document, as `serde_json::Value::deserialize` would, within the budget.
    pub fn decode<'de, D: Deserializer<'de>>(&mut self, document: D) -> Result<Value, D::Error> {
        Counted(self).deserialize(document)
    }
}

/// A value, counted.
struct Counted<'b>(&'b mut Budget);

/// A mapping key (a string, as for `serde_json::Value`), counted.
struct Key<'b>(&'b mut Budget);

impl<'de> DeserializeSeed<'de> for Counted<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let key = String::deserialize(d)?;
        self.0.take(1, key.len())?;
        Ok(key)
    }
}

impl<'de> Visitor<'de> for Counted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Value::deserialize(de::value::I128Deserializer::<E>::new(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Value::deserialize(de::value::U128Deserializer::<E>::new(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.take(1, v.len())?;
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.0.take(1, v.len())?;
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.take(1, 0)?;
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.take(1, 0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Counted(&mut *self.0))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.take(1, 0)?;
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(Key(&mut *self.0))? {
            let value = map.next_value_seed(Counted(&mut *self.0))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(text: &str) -> Result<Vec<Value>, String> {
        let mut budget = Budget::default();
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| budget.decode(d).map_err(|e| e.to_string()))
            .collect()
    }

    fn plain(text: &str) -> Result<Vec<Value>, String> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn decodes_as_serde_json_does() {
        let texts = [
            "a: 1\nb: [true, ~, 1.5, .nan, -3, 18446744073709551615, 'x']\nc: {d: {e: []}}\n",
            "1: one\ntrue: yes\n~: null-key\n",
            "a: &a {x: [1, 2]}\nb: *a\nc: [*a, *a]\n",
            "a: 1\na: 2\n",
            "--- 1\n--- [a, b]\n---\n",
            "!tag {a: 1}",
            "a: 340282366920938463463374607431768211455\n",
        ];
        for text in texts {
            assert_eq!(decode_all(text), plain(text), "{text}");
        }
        // And every example manifest of the repository.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let files = crate::cli::expand_paths(&[dir], &["yaml", "yml", "json"]).files;
        assert!(files.len() > 3, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert_eq!(decode_all(&text), plain(&text), "{}", f.display());
        }
    }

    #[test]
    fn a_linear_alias_expansion_past_the_budget_is_refused() {
        // 20,000 values repeated 60 times: under serde_yaml_ng's repetition limit, 1.2 million
        // values once expanded.
        let list = vec!["1"; 20_000].join(",");
        let text = format!("a: &a [{list}]\nb: [{}]\n", vec!["*a"; 60].join(","));
        assert!(plain(&text).is_ok(), "serde_yaml_ng alone accepts it");
        let e = decode_all(&text).unwrap_err();
        assert!(
            e.contains("too large once YAML aliases are expanded"),
            "{e}"
        );
        // The same with strings: 1 MB repeated 20 times.
        let text = format!(
            "a: &a '{}'\nb: [{}]\n",
            "x".repeat(1 << 20),
            vec!["*a"; 20].join(",")
        );
        let e = decode_all(&text).unwrap_err();
        assert!(
            e.contains("too large once YAML aliases are expanded"),
            "{e}"
        );
        // Within the budget, aliases are fine.
        let text = format!("a: &a [{list}]\nb: [{}]\n", vec!["*a"; 40].join(","));
        assert_eq!(decode_all(&text).unwrap()[0]["b"][39][19_999], 1);
    }

    #[test]
    fn billion_laughs_and_deep_nesting_are_still_refused() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for (prev, next) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            text += &format!(
                "{next}: &{next} [{}]\n",
                vec![format!("*{prev}"); 9].join(",")
            );
        }
        let e = decode_all(&text).unwrap_err();
        assert!(e.contains("repetition limit exceeded"), "{e}");
        let deep = "[".repeat(1_000) + &"]".repeat(1_000);
        let e = decode_all(&deep).unwrap_err();
        assert!(e.contains("recursion limit exceeded"), "{e}");
    }
}
