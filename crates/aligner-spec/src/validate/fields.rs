//! The keys each mapping of a pipeline file allows, read from the serde derives of
//! `wire.rs` instead of kept by hand, so that a field added to a wire struct is known to
//! validation at once.
//!
//! A derived `Deserialize` of a struct hands the struct's field names to
//! `Deserializer::deserialize_struct`. [`Probe`] is a deserializer that follows a route of
//! keys down through structs, options and maps, and at the end of it notes what it found
//! (a struct and its fields, or a map). Walking every route from [`PipelineWire`] gives
//! [`KNOWN_FIELDS`]. No value is ever built: a walk stops with an error once it has seen
//! what it came for, so leaves (numbers, strings, enums, durations) need no stand-ins.

use std::cell::Cell;
use std::fmt;
use std::sync::LazyLock;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

use crate::wire::PipelineWire;

/// For each YAML path pattern (`*` stands for any key of a map, e.g. a model name), the keys
/// its mapping may have, in the order of the pattern's wire struct; patterns in document
/// order (depth first, fields in declaration order). Validation reports and drops every
/// other key before deserializing, so that all unknown keys of a file are reported at once
/// and the rest of each block is still checked.
pub(crate) static KNOWN_FIELDS: LazyLock<Vec<(String, &'static [&'static str])>> =
    LazyLock::new(walk::<PipelineWire>);

/// The allowed keys of the mapping at path pattern `pattern`, if it is checked.
pub(crate) fn known_fields(pattern: &str) -> Option<&'static [&'static str]> {
    KNOWN_FIELDS
        .iter()
        .find(|(p, _)| p == pattern)
        .map(|(_, fields)| *fields)
}

/// The pattern of the child `key` of the node at pattern `parent`: `models` + `up` ->
/// `models.*`, `rounds` + `train` -> `rounds.train`.
pub(crate) fn child_pattern(parent: &str, key: &str) -> String {
    let join = |k: &str| {
        if parent.is_empty() {
            k.to_string()
        } else {
            format!("{parent}.{k}")
        }
    };
    let wildcard = join("*");
    let is_wildcard = KNOWN_FIELDS.iter().any(|(p, _)| {
        *p == wildcard
            || p.strip_prefix(wildcard.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    });
    if is_wildcard {
        wildcard
    } else {
        join(key)
    }
}

/// The keys of the wire struct `T`, as its derive lists them.
///
/// # Panics
///
/// When `T` does not deserialize as a struct.
pub(crate) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    match probe::<T>(&[]) {
        Found::Struct(fields) => fields,
        _ => panic!("`{}` is not a struct", std::any::type_name::<T>()),
    }
}

/// Every struct reachable from `T`, with its path pattern and fields.
fn walk<T: DeserializeOwned>() -> Vec<(String, &'static [&'static str])> {
    let mut out = Vec::new();
    let mut routes: Vec<Vec<&'static str>> = vec![Vec::new()];
    while let Some(route) = routes.pop() {
        // A type that contains itself would be walked forever; none of ours does.
        assert!(route.len() <= 32, "wire types nest too deep at {route:?}");
        let below = |key: &'static str| {
            let mut r = route.clone();
            r.push(key);
            r
        };
        match probe::<T>(&route) {
            Found::Struct(fields) => {
                out.push((route.join("."), fields));
                // Reversed onto the stack, so that they come off in declaration order.
                routes.extend(fields.iter().rev().copied().map(below));
            }
            Found::Map => routes.push(below("*")),
            Found::Leaf => {}
        }
    }
    out
}

/// What a walk found at the end of its route.
#[derive(Debug, Clone, Copy)]
enum Found {
    Struct(&'static [&'static str]),
    Map,
    /// Anything else: a number, a string, an enum, a sequence, a type of its own.
    Leaf,
}

/// Deserializes `T` along `route` and says what is at its end.
fn probe<T: DeserializeOwned>(route: &[&'static str]) -> Found {
    let found = Cell::new(Found::Leaf);
    // Always an error: the walk stops where it has seen what it came for.
    let _ = T::deserialize(Probe {
        route,
        found: &found,
    });
    found.get()
}

/// The error that ends every walk.
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("probe stopped")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// A deserializer that follows `route` (one key per struct or map) and records in `found`
/// what it reaches at the end.
#[derive(Clone, Copy)]
struct Probe<'a> {
    route: &'a [&'static str],
    found: &'a Cell<Found>,
}

impl Probe<'_> {
    /// At the end of the route: records `found` and stops. Before it: feeds the next key,
    /// with the rest of the route as its value, to `visitor`.
    fn step<'de, V: Visitor<'de>>(self, found: Found, visitor: V) -> Result<V::Value, Stop> {
        match self.route.split_first() {
            None => {
                self.found.set(found);
                Err(Stop)
            }
            Some((key, rest)) => visitor.visit_map(Entry {
                key: Some(*key),
                value: Probe {
                    route: rest,
                    found: self.found,
                },
            }),
        }
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        self.step(Found::Struct(fields), visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        self.step(Found::Map, visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct enum identifier ignored_any
    }
}

/// A mapping with one entry: `key`, whose value is probed further.
struct Entry<'a> {
    key: Option<&'static str>,
    value: Probe<'a>,
}

impl<'de> MapAccess<'de> for Entry<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(self.value)
    }
}
