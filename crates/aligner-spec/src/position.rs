//! Where each node of a YAML document sits: a map from dotted paths
//! (`rounds.generate.sampling.stop[0]`) to 1-based line/column, built from yaml-rust2's
//! marked parser events. serde only reports positions for syntax errors; this index gives
//! one to every semantic error too.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based (line, column).
pub(crate) type LineCol = (usize, usize);

/// Position of one node: its key (for mapping entries) and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodePos {
    pub key: Option<LineCol>,
    pub value: LineCol,
}

/// Which part of a mapping entry an error points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// The key (unknown or misplaced fields, missing children).
    Key,
    /// The value (wrong values).
    Value,
}

/// Syntax error reported by the YAML scanner.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub message: String,
    pub at: LineCol,
}

/// A duplicate mapping key, found while indexing.
#[derive(Debug, Clone)]
pub(crate) struct DuplicateKey {
    pub path: String,
    pub key: String,
    pub at: LineCol,
}

/// Path -> position for every node of the first document.
#[derive(Debug, Default)]
pub(crate) struct PositionIndex {
    nodes: HashMap<String, NodePos>,
    pub duplicates: Vec<DuplicateKey>,
}

impl PositionIndex {
    /// Parses `text` and indexes its first document.
    pub fn build(text: &str) -> Result<PositionIndex, SyntaxError> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut builder, false).map_err(|e| SyntaxError {
            message: e.info().to_string(),
            at: line_col(e.marker()),
        })?;
        Ok(builder.index)
    }

    /// Whether the document has a node at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// The position of `path`, falling back to the nearest indexed ancestor.
    pub fn locate(&self, path: &str, anchor: Anchor) -> Option<LineCol> {
        let mut p = path;
        loop {
            if let Some(node) = self.nodes.get(p) {
                return Some(match anchor {
                    Anchor::Key => node.key.unwrap_or(node.value),
                    Anchor::Value => node.value,
                });
            }
            if p.is_empty() {
                return None;
            }
            p = parent_path(p);
        }
    }
}

/// `a.b[2]` -> `a.b`, `a.b` -> `a`, `a` -> ``.
pub(crate) fn parent_path(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

/// `join("a", "b")` -> `a.b`; `join("", "b")` -> `b`.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn line_col(m: &Marker) -> LineCol {
    // yaml-rust2 lines are 1-based, columns 0-based.
    (m.line(), m.col() + 1)
}

enum Frame {
    Map {
        path: String,
        /// The key just read, waiting for its value; `None` while expecting a key.
        pending: Option<(String, LineCol)>,
        seen: Vec<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    index: PositionIndex,
    stack: Vec<Frame>,
    /// Depth inside a complex (non-scalar) mapping key, which is skipped.
    skip: usize,
    done: bool,
}

impl Builder {
    /// Called at the start of every node. Returns the node's path, or `None` when the
    /// node is a mapping key (then it has been recorded as pending).
    fn start_node(&mut self, scalar: Option<&str>, at: LineCol) -> Option<String> {
        match self.stack.last_mut() {
            None => {
                self.index.nodes.insert(
                    String::new(),
                    NodePos {
                        key: None,
                        value: at,
                    },
                );
                Some(String::new())
            }
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                self.index.nodes.insert(
                    p.clone(),
                    NodePos {
                        key: None,
                        value: at,
                    },
                );
                Some(p)
            }
            Some(Frame::Map {
                path,
                pending,
                seen,
            }) => match pending.take() {
                None => {
                    // yaml-rust2 marks a block mapping's start after its first key; move the
                    // mapping's own position back to that key.
                    if seen.is_empty() {
                        if let Some(node) = self.index.nodes.get_mut(path.as_str()) {
                            node.value = node.value.min(at);
                        }
                    }
                    let key = scalar.unwrap_or("?").to_string();
                    if seen.contains(&key) {
                        self.index.duplicates.push(DuplicateKey {
                            path: join(path, &key),
                            key: key.clone(),
                            at,
                        });
                    } else {
                        seen.push(key.clone());
                    }
                    *pending = Some((key, at));
                    None
                }
                Some((key, key_at)) => {
                    let p = join(path, &key);
                    // Keep the first occurrence of a duplicate key.
                    self.index.nodes.entry(p.clone()).or_insert(NodePos {
                        key: Some(key_at),
                        value: at,
                    });
                    Some(p)
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.done {
            return;
        }
        let at = line_col(&mark);
        if self.skip > 0 {
            match ev {
                Event::MappingStart(..) | Event::SequenceStart(..) => self.skip += 1,
                Event::MappingEnd | Event::SequenceEnd => self.skip -= 1,
                _ => {}
            }
            return;
        }
        match ev {
            Event::Scalar(value, ..) => {
                self.start_node(Some(&value), at);
            }
            Event::Alias(_) => {
                self.start_node(Some("*alias"), at);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                match self.start_node(None, at) {
                    Some(path) if is_map => self.stack.push(Frame::Map {
                        path,
                        pending: None,
                        seen: Vec::new(),
                    }),
                    Some(path) => self.stack.push(Frame::Seq { path, next: 0 }),
                    // A mapping or sequence used as a key: not addressable, skip it.
                    None => self.skip = 1,
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::DocumentEnd => self.done = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_keys_values_and_sequences() {
        let text = "a:\n  b: 1\n  c: [x, {d: 2}]\ne:\n  - f\n";
        let idx = PositionIndex::build(text).unwrap();
        assert_eq!(idx.locate("a", Anchor::Key), Some((1, 1)));
        assert_eq!(idx.locate("a.b", Anchor::Key), Some((2, 3)));
        assert_eq!(idx.locate("a.b", Anchor::Value), Some((2, 6)));
        assert_eq!(idx.locate("a.c[0]", Anchor::Value), Some((3, 7)));
        assert_eq!(idx.locate("a.c[1].d", Anchor::Key), Some((3, 11)));
        assert_eq!(idx.locate("e[0]", Anchor::Value), Some((5, 5)));
        // Block mappings start at their first key, flow mappings at `{`.
        assert_eq!(idx.locate("", Anchor::Value), Some((1, 1)));
        assert_eq!(idx.locate("a", Anchor::Value), Some((2, 3)));
        assert_eq!(idx.locate("a.c[1]", Anchor::Value), Some((3, 10)));
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(idx.locate("a.b.zz", Anchor::Key), Some((2, 3)));
    }

    #[test]
    fn reports_duplicates_and_syntax_errors() {
        let idx = PositionIndex::build("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(idx.duplicates.len(), 1);
        assert_eq!(idx.duplicates[0].at, (3, 1));
        let err = PositionIndex::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(!err.message.is_empty());
    }
}
