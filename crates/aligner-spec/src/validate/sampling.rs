//! Sampling settings ([`SamplingWire`]), wherever a block takes them.

use super::Ctx;
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

impl Ctx<'_> {
    pub(super) fn sampling(&mut self, path: &str, w: &SamplingWire) -> SamplingSpec {
        let p = |f: &str| join(path, f);
        if let Some(t) = w.temperature {
            self.expect(
                &p("temperature"),
                (0.0..=2.0).contains(&t),
                "between 0 and 2",
                t,
            );
        }
        if let Some(t) = w.top_p {
            self.expect(
                &p("top_p"),
                t > 0.0 && t <= 1.0,
                "more than 0 and at most 1",
                t,
            );
        }
        if let Some(k) = w.top_k {
            self.expect(&p("top_k"), k >= 1, "at least 1", k);
        }
        if let Some(m) = w.max_tokens {
            self.expect(&p("max_tokens"), m >= 1, "at least 1", m);
        }
        for (name, value) in [
            ("frequency_penalty", w.frequency_penalty),
            ("presence_penalty", w.presence_penalty),
        ] {
            if let Some(v) = value {
                self.expect(&p(name), (-2.0..=2.0).contains(&v), "between -2 and 2", v);
            }
        }
        if let Some(r) = w.repetition_penalty {
            self.expect(
                &p("repetition_penalty"),
                r.is_finite() && r > 0.0,
                "more than 0",
                r,
            );
        }
        for (i, s) in w.stop.iter().enumerate() {
            if s.is_empty() {
                self.err(
                    &format!("{path}.stop[{i}]"),
                    Anchor::Value,
                    "stop strings must not be empty",
                    None,
                );
            }
        }
        SamplingSpec {
            temperature: w.temperature,
            top_p: w.top_p,
            top_k: w.top_k,
            max_tokens: w.max_tokens,
            frequency_penalty: w.frequency_penalty,
            presence_penalty: w.presence_penalty,
            repetition_penalty: w.repetition_penalty,
            seed: w.seed,
            stop: w.stop.clone(),
        }
    }
}
