//! Sampling settings ([`Sampling`]), wherever a block takes them.

use super::Ctx;
use crate::position::{join, Anchor};
use crate::types::*;

impl Ctx<'_> {
    pub(super) fn sampling(&mut self, path: &str, w: &Sampling) -> Sampling {
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
        w.clone()
    }
}
