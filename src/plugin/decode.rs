//! Decoding YAML documents into JSON values within a bound on their expanded size.
//!
//! A YAML alias repeats its anchor's content wherever it is used, so a small text can stand for a
//! huge value: 200 KB of `b: [*a, *a, ...]` over a list of 100,000 numbers is five million values.
//! serde_yaml_ng refuses the exponential cases (its "repetition limit", and a "recursion limit" on
//! nesting) but not this linear one. The values are therefore counted while they are built, and
//! decoding stops at the first value past the [`Budget`]: the whole expansion never exists.
//! Without aliases a manifest file within its size limit never comes near the budget.
//!
//! Deep *flow* nesting (`{a: {a: {…`, `[[[…`) is refused before parsing by [`flow_nesting`]:
//! serde_yaml_ng's own recursion limit applies only after its parser has read the document, and
//! that parser takes quadratic time on flow nesting (8,000 levels: 4 s; a 200 KB file: minutes).

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as _;
use serde_json::{Map, Number, Value};

/// The most values (each mapping, sequence, key and scalar counts one) the documents of one text
/// may decode to, aliases expanded.
pub const MAX_VALUES: usize = 1_000_000;
/// The most bytes of strings (keys included) the documents of one text may decode to.
pub const MAX_STRING_BYTES: usize = 16 << 20;

/// The deepest flow nesting (`[` and `{`) a text may have: serde_yaml_ng refuses more than 128
/// levels of any nesting anyway.
pub const MAX_FLOW_DEPTH: usize = 128;

/// Where a text first goes deeper than [`MAX_FLOW_DEPTH`] levels of flow collections: the index of
/// its document and the line (1-based). A linear scan that follows YAML's quoting: a quote opens a
/// quoted scalar only where a token may start, and a `#` after a blank starts a comment. Brackets
/// in a block scalar's text are counted too; that matters only for text with more than 128
/// unclosed brackets.
pub fn flow_nesting(text: &str) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let (mut depth, mut line, mut document) = (0usize, 1usize, 0usize);
    let mut i = 0;
    // The byte before `i` outside quoted text (`\n` at a line start).
    let mut prev = b'\n';
    while i < bytes.len() {
        let b = bytes[i];
        // Where a token may start: after a blank (block context: `key: [`, `- '`), or also
        // after an indicator in flow context (`[[`, `{a:'x'}`).
        let token_start = matches!(prev, b'\n' | b' ' | b'\t')
            || (depth > 0 && matches!(prev, b'[' | b'{' | b',' | b':'));
        match b {
            b'\n' => line += 1,
            b'-' if prev == b'\n' && bytes[i..].starts_with(b"---") => {
                document += 1;
                depth = 0;
            }
            b'#' if matches!(prev, b'\n' | b' ' | b'\t') => {
                while i + 1 < bytes.len() && bytes[i + 1] != b'\n' {
                    i += 1;
                }
            }
            b'\'' | b'"' if token_start => {
                // To the closing quote: `''` inside single quotes, `\x` inside double quotes.
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\n' => line += 1,
                        b'\\' if b == b'"' => i += 1,
                        b'\'' if b == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 1,
                        c if c == b => break,
                        _ => {}
                    }
                    i += 1;
                }
            }
            // In block context a bracket opens a flow collection only where a token starts; in
            // flow context every bracket is one.
            b'[' | b'{' if depth > 0 || token_start => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some((document, line));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = b;
        i += 1;
    }
    None
}

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
        items.shrink_to_fit();
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.take(1, 0)?;
        // Collected first, so that the map is allocated at its exact size: grown entry by entry,
        // an ordered map keeps room for up to twice its entries, for the life of the object.
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(Key(&mut *self.0))? {
            let value = map.next_value_seed(Counted(&mut *self.0))?;
            entries.push((key, value));
        }
        let mut out = Map::with_capacity(entries.len());
        for (key, value) in entries {
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

    #[test]
    fn deep_flow_nesting_is_found_before_parsing() {
        let nested = |n: usize| format!("a: {}1{}\n", "{a: ".repeat(n), "}".repeat(n));
        assert_eq!(flow_nesting(&nested(MAX_FLOW_DEPTH)), None);
        assert_eq!(flow_nesting(&nested(MAX_FLOW_DEPTH + 1)), Some((0, 1)));
        // 50,000 levels (serde_yaml_ng alone took minutes): found at once.
        let text = format!("kind: x\n---\nb: 1\nc: {}", "[".repeat(50_000));
        assert_eq!(flow_nesting(&text), Some((1, 4)));
        // Brackets in quotes, comments and plain scalars are not nesting.
        let deep = "[".repeat(200);
        for text in [
            format!("a: '{deep}'\n"),
            format!("a: \"{deep}\\\"{deep}\"\n"),
            format!("a: 'it''s {deep}'\n"),
            format!("a: 1 # {deep}\n"),
            format!("a: x{deep}\n"),
            format!("a: [x, '{deep}', \"]\"]\n"),
        ] {
            assert_eq!(flow_nesting(&text), None, "{text}");
            assert!(plain(&text).is_ok(), "{text}");
        }
        // A quote inside a plain scalar opens nothing: the brackets after it still count.
        let text = format!("a: it's {{{}\n", "[".repeat(200));
        assert!(flow_nesting(&text).is_some());
        // Every example manifest of the repository passes.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for f in crate::cli::expand_paths(&[dir], &["yaml", "yml", "json"]).files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert_eq!(flow_nesting(&text), None, "{}", f.display());
        }
    }
}
