//! The cache's module identity, [`ModuleKey`], and the borrowed form its index is searched by.

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};

/// `(module name, checksum)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleKey {
    pub name: String,
    pub checksum: String,
}

impl ModuleKey {
    pub fn new(name: impl Into<String>, checksum: impl Into<String>) -> Self {
        ModuleKey {
            name: name.into(),
            checksum: checksum.into(),
        }
    }
}

impl std::fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}",
            self.name,
            &self.checksum[..self.checksum.len().min(12)]
        )
    }
}

/// A [`ModuleKey`] as `(name, checksum)`, ordered as the key is, so that a range of the index
/// can start at a name without building a key: [`NameStart`] orders before every checksum of
/// its name.
pub trait KeyParts {
    fn parts(&self) -> (&str, Option<&str>);
}

impl KeyParts for ModuleKey {
    fn parts(&self) -> (&str, Option<&str>) {
        (&self.name, Some(&self.checksum))
    }
}

/// The first key of a name, before every checksum (see [`KeyParts`]).
pub struct NameStart<'a>(pub &'a str);

impl KeyParts for NameStart<'_> {
    fn parts(&self) -> (&str, Option<&str>) {
        (self.0, None)
    }
}

impl<'a> Borrow<dyn KeyParts + 'a> for ModuleKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl PartialOrd for dyn KeyParts + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn KeyParts + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::ops::Bound;

    use super::*;

    /// Keys order as their parts do (the index may be searched by either), and a name's start
    /// orders before every key of that name, after every key of a lesser name.
    #[test]
    fn parts_order_as_keys_and_a_name_start_precedes_its_checksums() {
        let names = ["", "a", "a/b", "ab", "b"];
        let checksums = ["", "sha256:0", "sha256:1"];
        let keys: Vec<ModuleKey> = (names.iter())
            .flat_map(|n| checksums.iter().map(move |c| ModuleKey::new(*n, *c)))
            .collect();
        for x in &keys {
            for y in &keys {
                let (px, py): (&dyn KeyParts, &dyn KeyParts) = (x, y);
                assert_eq!(x.cmp(y), px.cmp(py), "{x:?} vs {y:?}");
            }
            for n in names {
                let start: &dyn KeyParts = &NameStart(n);
                let expected = if x.name.as_str() < n {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                };
                assert_eq!((x as &dyn KeyParts).cmp(start), expected, "{x:?} vs {n:?}");
            }
        }
        // A range from a name's start holds that name's keys first, every checksum.
        let index: BTreeSet<ModuleKey> = keys.iter().cloned().collect();
        for n in names {
            let start: &dyn KeyParts = &NameStart(n);
            let named: Vec<&ModuleKey> = (index
                .range::<dyn KeyParts, _>((Bound::Included(start), Bound::Unbounded)))
            .take_while(|k| k.name == n)
            .collect();
            let expected: Vec<&ModuleKey> = keys.iter().filter(|k| k.name == n).collect();
            assert_eq!(named, expected);
        }
    }
}
