//! Canonical snapshots of a validated pipeline: the JSON recorded with each run, its
//! sha256, and a dotted-path diff between two snapshots (what changed since the last run).

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::types::Pipeline;

/// One value that differs between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted path, e.g. `rounds.generate.sampling.temperature` or `...stop[0]`.
    pub path: String,
    /// The old value as compact JSON, or `(none)` when the path is new.
    pub old: String,
    /// The new value as compact JSON, or `(none)` when the path is gone.
    pub new: String,
}

/// Rendering of a side of a [`Change`] where the path does not exist.
pub const ABSENT: &str = "(none)";

impl Pipeline {
    /// The canonical JSON snapshot (`serde_json::to_value` of the pipeline), used for
    /// hashing and diffing.
    pub fn snapshot(&self) -> Value {
        // Every field serializes: paths are checked to be UTF-8 during validation and
        // non-finite floats are rejected (serde_json would write them as null anyway).
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// sha256 (hex) of the canonical snapshot written with sorted keys and no spaces.
    pub fn hash(&self) -> String {
        hash_snapshot(&self.snapshot())
    }
}

/// sha256 (hex) of `value` written as compact JSON with object keys sorted at every
/// level, whatever the map order of serde_json's build.
pub fn hash_snapshot(value: &Value) -> String {
    let mut text = String::new();
    write_canonical(value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Paths whose values differ between two snapshots, sorted by path. Objects are compared
/// key by key; arrays of the same length item by item (`stop[0]`), otherwise as a whole.
pub fn diff_snapshots(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    diff_into("", Some(old), Some(new), &mut out);
    out
}

fn diff_into(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<Change>) {
    match (old, new) {
        (Some(a), Some(b)) if a == b => {}
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                diff_into(&crate::position::join(path, k), a.get(k), b.get(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff_into(&format!("{path}[{i}]"), Some(x), Some(y), out);
            }
        }
        (a, b) => out.push(Change {
            path: path.to_string(),
            old: render(a),
            new: render(b),
        }),
    }
}

fn render(v: Option<&Value>) -> String {
    match v {
        Some(v) => {
            let mut s = String::new();
            write_canonical(v, &mut s);
            s
        }
        None => ABSENT.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_reports_leaves_and_whole_arrays() {
        let a = json!({"x": {"y": 1, "z": [1, 2]}, "w": "a", "gone": true});
        let b = json!({"x": {"y": 2, "z": [1, 2, 3]}, "w": "a", "added": null});
        let changes = diff_snapshots(&a, &b);
        let lines: Vec<String> = changes
            .iter()
            .map(|c| format!("{}: {} -> {}", c.path, c.old, c.new))
            .collect();
        assert_eq!(
            lines,
            vec![
                "added: (none) -> null",
                "gone: true -> (none)",
                "x.y: 1 -> 2",
                "x.z: [1,2] -> [1,2,3]"
            ]
        );
        assert!(diff_snapshots(&a, &a).is_empty());
    }

    #[test]
    fn hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"d": [1], "c": "x"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": {"c": "x", "d": [1]}, "b": 1}"#).unwrap();
        assert_eq!(hash_snapshot(&a), hash_snapshot(&b));
        assert_eq!(hash_snapshot(&a).len(), 64);
    }
}
