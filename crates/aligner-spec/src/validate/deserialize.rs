//! The serde step: unknown keys reported and dropped, each block deserialized with every
//! error recorded, and serde's messages turned into positioned errors with hints.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml_ng::Value;

use super::fields::{child_pattern, known_fields};
use super::{backticked, did_you_mean, field_name, list, Ctx};
use crate::position::{join, Anchor};

/// The field named by a serde "missing field `x`" message.
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// Removes the mapping entry at `parents` + `last` from `value`; `None` when there is none.
fn remove_entry(value: &mut Value, parents: &[Segment], last: &Segment) -> Option<()> {
    let mut node = value;
    for seg in parents {
        node = match seg {
            Segment::Map { key } => node.get_mut(key.as_str())?,
            Segment::Seq { index } => node.get_mut(*index)?,
            _ => return None,
        };
    }
    match last {
        Segment::Map { key } => node
            .as_mapping_mut()?
            .shift_remove(key.as_str())
            .map(|_| ()),
        _ => None,
    }
}

/// serde_path_to_error segments below `prefix`, in our dotted form.
fn segments_string<'a>(prefix: &str, segments: impl IntoIterator<Item = &'a Segment>) -> String {
    let mut out = prefix.to_string();
    for seg in segments {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => out = join(&out, key),
            Segment::Unknown => out = join(&out, "?"),
        }
    }
    out
}

impl Ctx<'_> {
    /// Turns a serde message about the node at `path` into a positioned error with a hint.
    fn serde_error(&mut self, path: String, msg: String) {
        let (head, expected) = match msg.split_once(", expected ") {
            Some((h, e)) => (h, Some(e)),
            None => match msg.split_once(", there are no fields") {
                Some((h, _)) => (h, None),
                None => (msg.as_str(), None),
            },
        };
        if let Some(name) = head
            .strip_prefix("unknown field `")
            .and_then(|s| s.strip_suffix('`'))
        {
            let expected = expected.map(backticked).unwrap_or_default();
            let path = if field_name(&path) == name {
                path
            } else {
                join(&path, name)
            };
            self.unknown_field(&path, name, &expected);
        } else if let Some(name) = head
            .strip_prefix("unknown variant `")
            .and_then(|s| s.strip_suffix('`'))
        {
            let hint = expected
                .and_then(|e| did_you_mean(name, backticked(e)))
                .map(|m| format!("did you mean `{m}`?"));
            self.err(&path, Anchor::Value, msg.clone(), hint);
        } else if head.starts_with("missing field") {
            self.err(&path, Anchor::Key, msg.clone(), None);
        } else {
            let msg = msg
                .replace("expected u32", "expected a whole number")
                .replace("expected u64", "expected a whole number")
                .replace("expected f64", "expected a number");
            self.err(&path, Anchor::Value, msg, None);
        }
    }

    /// Reports an unknown field; returns the field it probably meant, if any.
    pub(super) fn unknown_field<'e>(
        &mut self,
        path: &str,
        name: &str,
        expected: &[&'e str],
    ) -> Option<&'e str> {
        let meant = did_you_mean(name, expected.iter().copied());
        let hint = match meant {
            Some(m) => Some(format!("did you mean `{m}`?")),
            None if !expected.is_empty() => Some(format!("valid fields here: {}", list(expected))),
            None => None,
        };
        self.err(path, Anchor::Key, format!("unknown field `{name}`"), hint);
        meant
    }

    /// Reports every key that [`KNOWN_FIELDS`](super::fields::KNOWN_FIELDS) does not allow at
    /// its place and removes it from `value` (the node at `path`, whose pattern is
    /// `pattern`), so that the rest of its block still deserializes and gets checked.
    pub(super) fn strip_unknown_fields(&mut self, value: &mut Value, path: &str, pattern: &str) {
        let Some(map) = value.as_mapping_mut() else {
            return;
        };
        if let Some(allowed) = known_fields(pattern) {
            let unknown: Vec<Value> = map
                .keys()
                .filter(|k| k.as_str().is_some_and(|k| !allowed.contains(&k)))
                .cloned()
                .collect();
            for key in unknown {
                let name = key.as_str().unwrap_or_default();
                if let Some(meant) = self.unknown_field(&join(path, name), name, allowed) {
                    self.misspelled
                        .entry(path.to_string())
                        .or_default()
                        .push(meant);
                }
                map.shift_remove(&key);
            }
        }
        for (k, v) in map.iter_mut() {
            if let Some(key) = k.as_str() {
                self.strip_unknown_fields(v, &join(path, key), &child_pattern(pattern, key));
            }
        }
    }

    /// Whether an unknown key of the mapping at `path` looks like a misspelled `field`
    /// (then a "missing `field`" error would only repeat the unknown-field one).
    pub(super) fn is_misspelled(&self, path: &str, field: &str) -> bool {
        self.misspelled
            .get(path)
            .is_some_and(|fields| fields.contains(&field))
    }

    /// An error about a missing `field` of the mapping at `path`, unless an unknown key
    /// there already looks like a misspelling of it.
    pub(super) fn missing(
        &mut self,
        path: &str,
        field: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        if !self.is_misspelled(path, field) {
            self.err(path, Anchor::Key, message, hint);
        }
    }

    /// Deserializes `value` (the node at `path`) as a `T`, recording every error serde
    /// finds in it: after each error, the innermost field on its path is dropped and
    /// deserializing is tried again, until it succeeds or the error is about the node
    /// itself. `None` when there was any error.
    pub(super) fn parse<T: DeserializeOwned>(&mut self, value: &Value, path: &str) -> Option<T> {
        let mut value = std::borrow::Cow::Borrowed(value);
        let mut dropped: Vec<String> = Vec::new();
        loop {
            let err = match serde_path_to_error::deserialize::<_, T>(value.as_ref()) {
                Ok(t) => return dropped.is_empty().then_some(t),
                Err(e) => e,
            };
            let segments: Vec<Segment> = err.path().iter().cloned().collect();
            let at = segments_string(path, &segments);
            let msg = err.into_inner().to_string();
            if let Some(field) = missing_field(&msg) {
                // Missing because it was dropped after an error, or misspelled: said already.
                if dropped.contains(&join(&at, field)) || self.is_misspelled(&at, field) {
                    return None;
                }
            }
            self.serde_error(at, msg);
            let i = segments
                .iter()
                .rposition(|s| matches!(s, Segment::Map { .. }))?;
            remove_entry(value.to_mut(), &segments[..i], &segments[i])?;
            dropped.push(segments_string(path, &segments[..=i]));
            if dropped.len() > 256 {
                return None;
            }
        }
    }
}
