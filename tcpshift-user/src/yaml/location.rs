//! Field paths (`spec.tcp[0].route[1].weight`) and finding the line and column of the value
//! at a path in a YAML document, for errors found after parsing.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// Path of a value in a document, e.g. `spec.tcp[0].route[1].weight`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    /// The path of the value at key `k` under this one.
    pub fn key(&self, k: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    /// The path of element `i` of the sequence at this path.
    pub fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

/// The path made of the mapping keys `keys`.
pub fn path(keys: &[&str]) -> FieldPath {
    FieldPath(keys.iter().map(|k| Seg::Key((*k).to_owned())).collect())
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds the line and column of the value at `path` in the YAML document `text`, by walking
/// the document with a deserializer that stops there (the YAML parser attaches the position
/// of the value it stopped at to the error). Falls back to the closest parent that exists.
pub fn locate(text: &str, path: &FieldPath) -> Option<(usize, usize)> {
    for len in (0..=path.0.len()).rev() {
        let segs = &path.0[..len];
        let de = serde_yaml::Deserializer::from_str(text);
        if let Err(e) = Locate(segs).deserialize(de)
            && let Some(loc) = e.location()
        {
            return Some((loc.line(), loc.column()));
        }
    }
    None
}

struct Locate<'a>(&'a [Seg]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.0.is_empty() {
            // `Here` accepts nothing: the parser reports the value's position.
            return d.deserialize_any(Here);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Value>()? {
            if let (Some(Seg::Key(want)), Some(key)) = (self.0.first(), key.as_str())
                && want == key
            {
                return map.next_value_seed(Locate(&self.0[1..]));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            if let Some(Seg::Index(want)) = self.0.first()
                && *want == i
            {
                return seq.next_element_seed(Locate(&self.0[1..])).map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// A visitor that accepts nothing (the default of every `visit_*` is an error).
struct Here;

impl Visitor<'_> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing (locating a value)")
    }
}
