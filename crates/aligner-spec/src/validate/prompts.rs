//! `prompts:` and `aligner.teach.prompts:` ([`PromptsWire`], [`FieldsWire`]).

use super::Ctx;
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

impl Ctx<'_> {
    pub(super) fn prompts(&mut self, path: &str, w: &PromptsWire) -> Option<PromptsSpec> {
        let p = |f: &str| join(path, f);
        let errors_before = self.errors.len();
        let source = self.prompts_file(&p("source"), &w.source);
        let holdout_source = w
            .holdout_source
            .as_ref()
            .map(|f| self.prompts_file(&p("holdout_source"), f));
        let format = match (w.format, &source) {
            (Some(f), _) => Some(match f {
                PromptFormatWire::Jsonl => PromptFormat::Jsonl,
                PromptFormatWire::Csv => PromptFormat::Csv,
                PromptFormatWire::Parquet => PromptFormat::Parquet,
            }),
            (None, Some(src)) => {
                let ext = src
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                match ext.as_str() {
                    "jsonl" | "json" | "ndjson" => Some(PromptFormat::Jsonl),
                    "csv" => Some(PromptFormat::Csv),
                    "parquet" | "pq" => Some(PromptFormat::Parquet),
                    // `format` is there, misspelled: reported already.
                    _ if self.is_misspelled(path, "format") => None,
                    _ => {
                        self.err(
                            &p("source"),
                            Anchor::Value,
                            format!(
                                "cannot tell the format of `{}` from its extension",
                                w.source
                            ),
                            Some("add `format: jsonl`, `format: csv` or `format: parquet`".into()),
                        );
                        None
                    }
                }
            }
            (None, None) => None,
        };
        let column = |cx: &mut Self, field: &str, value: &Option<String>| -> Option<String> {
            let v = value.clone()?;
            if v.trim().is_empty() {
                cx.err(
                    &p(&format!("fields.{field}")),
                    Anchor::Value,
                    format!("`{field}` is empty"),
                    Some("give a column name or remove the line".into()),
                );
            }
            Some(v)
        };
        let prompt_field =
            column(self, "prompt", &w.fields.prompt).unwrap_or_else(|| "prompt".into());
        let id_field = column(self, "id", &w.fields.id);
        let system_field = column(self, "system", &w.fields.system);
        let messages_field = column(self, "messages", &w.fields.messages);
        if messages_field.is_some() && w.fields.prompt.is_some() {
            self.err(
                "prompts.fields.messages",
                Anchor::Key,
                "`messages` and `prompt` are exclusive: with `messages` the prompt is the conversation's last user turn",
                Some("map either a column of single prompts (`prompt`) or a column of conversations (`messages`)".into()),
            );
        }
        for (i, m) in w.fields.metadata.iter().enumerate() {
            if m.trim().is_empty() {
                self.err(
                    &p(&format!("fields.metadata[{i}]")),
                    Anchor::Value,
                    "metadata column name is empty",
                    None,
                );
            }
        }
        if let Some(sample) = w.sample {
            self.expect(&p("sample"), sample >= 1, "at least 1", sample);
        }
        let holdout = w.holdout.unwrap_or(0.0);
        self.expect(
            &p("holdout"),
            (0.0..1.0).contains(&holdout),
            "at least 0 and less than 1",
            holdout,
        );
        let leak_check = w.leak_check.as_ref().and_then(|l| {
            if path != "prompts" {
                self.err(
                    &p("leak_check"),
                    Anchor::Key,
                    "the leak check belongs to the rounds' `prompts`",
                    Some("it checks the Aligner's teaching prompts against the rounds' held-out prompts from there".into()),
                );
            }
            let max_similarity = l.max_similarity.unwrap_or(0.9);
            self.expect(
                &p("leak_check.max_similarity"),
                max_similarity > 0.0 && max_similarity <= 1.0,
                "more than 0 and at most 1",
                max_similarity,
            );
            let embedder = self.embedder_path(&p("leak_check.embedder"), &l.embedder)?;
            Some(LeakCheck {
                embedder,
                max_similarity,
            })
        });
        if w.holdout_source.is_some() {
            if path != "prompts" {
                self.err(
                    &p("holdout_source"),
                    Anchor::Key,
                    "a fixed held-out file belongs to the rounds' `prompts`",
                    Some(
                        "the Aligner's teaching prompts hold out rows with `aligner.holdout`"
                            .into(),
                    ),
                );
            } else if holdout > 0.0 {
                self.err(
                    &p("holdout_source"),
                    Anchor::Key,
                    "both `holdout` and `holdout_source` are set",
                    Some("use one: `holdout` splits a fraction off `source` at random, `holdout_source` is a fixed file of held-out prompts".into()),
                );
            }
        }
        if self.errors.len() != errors_before {
            return None;
        }
        Some(PromptsSpec {
            source: source?,
            format: format?,
            prompt_field,
            id_field,
            system_field,
            messages_field,
            metadata_fields: w.fields.metadata.clone(),
            system_prompt: w.system_prompt.clone(),
            sample: w.sample,
            seed: w.seed.unwrap_or(0),
            holdout,
            holdout_source: holdout_source.flatten(),
            leak_check,
        })
    }

    /// A prompts file at `path` in the YAML: resolved, and an error unless it is a file.
    fn prompts_file(&mut self, path: &str, value: &str) -> Option<std::path::PathBuf> {
        let (shown, resolved) = self.path_value(path, value)?;
        if resolved.is_file() {
            return Some(resolved);
        }
        let what = if resolved.is_dir() {
            "is a folder, not a file"
        } else {
            "does not exist"
        };
        self.err(
            path,
            Anchor::Value,
            format!("prompts file `{shown}` {what}"),
            Some(format!("resolved to `{}`", resolved.display())),
        );
        None
    }
}
