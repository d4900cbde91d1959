//! Prompt sets in (JSONL, CSV, Parquet) and preference data out, through polars.
//!
//! Reading maps user columns onto prompt records; writing produces the files TRL, OpenRLHF and
//! LLaMA-Factory load as they are: `prompt`/`chosen`/`rejected` for DPO, `prompt`/`completion`
//! for SFT, either plain strings or conversational `[{role, content}]` lists.
//!
//! [`prompt_sets`] fetches the public prompt sets the quickstart and the tests read.

pub mod prompt_sets;

use std::fs::File;
use std::io::{BufWriter, Cursor, Write};
use std::path::{Path, PathBuf};

use polars::prelude::*;
#[cfg(test)]
use serde_json::json;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read `{path}` as {format}: {message}")]
    Read {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("`{path}` has no column `{column}` (columns: {available})\nhint: map it with `prompts.fields.{field}: <column>`")]
    MissingColumn {
        path: PathBuf,
        column: String,
        field: &'static str,
        available: String,
    },
    #[error("`{path}` has no usable prompt: every `{column}` value is empty")]
    NoPrompts { path: PathBuf, column: String },
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "JSONL",
            Format::Csv => "CSV",
            Format::Parquet => "Parquet",
        }
    }
}

/// Which columns hold what.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub prompt: String,
    pub id: Option<String>,
    pub system: Option<String>,
    /// A column of OpenAI-style conversations (`[{"role", "content"}]`, or that as a JSON
    /// string): the last `user` turn is the prompt, a leading `system` turn the system prompt
    /// (unless `system` maps a column), the turns between them the history. Replaces `prompt`,
    /// except in a row whose conversation is null or empty: that row's `prompt` column, when
    /// the file has one, is a single question.
    pub messages: Option<String>,
    pub metadata: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// The id column's value, or the 0-based row number.
    pub source_id: String,
    pub prompt: String,
    pub system: Option<String>,
    /// The turns before the prompt (role, content), oldest first; empty for a single turn.
    pub history: Vec<(String, String)>,
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    pub rows: usize,
    /// Rows whose prompt was null or blank; they are skipped.
    pub skipped_empty: usize,
}

fn read_frame(path: &Path, format: Format) -> Result<DataFrame> {
    let err = |e: PolarsError| Error::Read {
        path: path.into(),
        format: format.name(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(|e| Error::Read {
        path: path.into(),
        format: format.name(),
        message: e.to_string(),
    })?;
    match format {
        Format::Jsonl => JsonLineReader::new(file).finish().map_err(err),
        Format::Parquet => ParquetReader::new(file).finish().map_err(err),
        Format::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(10_000))
            .try_into_reader_with_file_path(Some(path.into()))
            .map_err(err)?
            .finish()
            .map_err(err),
    }
}

/// A conversation's leading system message, the turns before its last user message, and that
/// message (`None` when there is none).
type Conversation = (Option<String>, Vec<(String, String)>, Option<String>);

/// A column of the file, or the error naming it, what it was for and the columns there are.
fn column_of<'a>(
    df: &'a DataFrame,
    path: &Path,
    column: &str,
    field: &'static str,
) -> Result<&'a Column> {
    df.column(column).map_err(|_| Error::MissingColumn {
        path: path.into(),
        column: column.into(),
        field,
        available: df
            .get_column_names()
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The conversations of a `messages` column: a list of `{role, content}` structs (JSONL,
/// Parquet) or a JSON string of one (CSV).
fn messages_column(df: &DataFrame, path: &Path, column: &str) -> Result<Vec<Conversation>> {
    let col = column_of(df, path, column, "messages")?;
    let bad = |row: usize, what: &str| {
        Error::Read {
        path: path.into(),
        format: "messages",
        message: format!("column `{column}`, row {}: {what}; expected a list of {{\"role\", \"content\"}} objects", row + 1),
    }
    };
    let mut out = Vec::with_capacity(df.height());
    if col.dtype() == &DataType::String {
        let ca = col.str().map_err(|e| bad(0, &e.to_string()))?;
        for (row, text) in ca.into_iter().enumerate() {
            let turns: Vec<(String, String)> = match text {
                None => Vec::new(),
                Some(t) => {
                    let v: Vec<Value> =
                        serde_json::from_str(t).map_err(|e| bad(row, &e.to_string()))?;
                    v.iter()
                        .map(|m| match (m["role"].as_str(), m["content"].as_str()) {
                            (Some(r), Some(c)) => Ok((r.to_string(), c.to_string())),
                            _ => Err(bad(row, "a message without a string `role` and `content`")),
                        })
                        .collect::<Result<_>>()?
                }
            };
            out.push(conversation(turns));
        }
        return Ok(out);
    }
    let list = col
        .as_materialized_series()
        .list()
        .map_err(|e| bad(0, &e.to_string()))?;
    for (row, messages) in list.into_iter().enumerate() {
        let mut turns = Vec::new();
        if let Some(s) = messages {
            let st = s.struct_().map_err(|e| bad(row, &e.to_string()))?;
            let field = |name: &str| -> Result<Vec<Option<String>>> {
                let f = st
                    .field_by_name(name)
                    .map_err(|_| bad(row, &format!("no `{name}`")))?;
                let f = f
                    .cast(&DataType::String)
                    .map_err(|e| bad(row, &e.to_string()))?;
                Ok(f.str()
                    .map_err(|e| bad(row, &e.to_string()))?
                    .into_iter()
                    .map(|v| v.map(str::to_string))
                    .collect())
            };
            for (r, c) in field("role")?.into_iter().zip(field("content")?) {
                turns.push((r.unwrap_or_default(), c.unwrap_or_default()));
            }
        }
        out.push(conversation(turns));
    }
    Ok(out)
}

/// Splits a conversation into its system message, its history and its last user message
/// (what follows that message, an assistant reply to it, is not part of the prompt).
fn conversation(mut turns: Vec<(String, String)>) -> Conversation {
    let system = match turns.first() {
        Some((r, _)) if r == "system" => Some(turns.remove(0).1),
        _ => None,
    };
    match turns.iter().rposition(|(r, _)| r == "user") {
        Some(last) => {
            turns.truncate(last + 1);
            let prompt = turns.pop().map(|(_, c)| c);
            (system, turns, prompt)
        }
        None => (system, Vec::new(), None),
    }
}

fn string_column(
    df: &DataFrame,
    path: &Path,
    column: &str,
    field: &'static str,
) -> Result<Vec<Option<String>>> {
    let col = column_of(df, path, column, field)?;
    let as_str = col.cast(&DataType::String).map_err(|e| Error::Read {
        path: path.into(),
        format: "text",
        message: format!("column `{column}`: {e}"),
    })?;
    let ca = as_str.str().map_err(|e| Error::Read {
        path: path.into(),
        format: "text",
        message: format!("column `{column}`: {e}"),
    })?;
    Ok(ca.into_iter().map(|v| v.map(str::to_string)).collect())
}

/// Reads every prompt of a file. Rows with an empty prompt are skipped and counted.
pub fn read_prompts(
    path: &Path,
    format: Format,
    mapping: &Mapping,
) -> Result<(Vec<PromptRecord>, ReadReport)> {
    let df = read_frame(path, format)?;
    let conversations = mapping
        .messages
        .as_deref()
        .map(|c| messages_column(&df, path, c))
        .transpose()?;
    let prompts = match &conversations {
        // A row without a conversation (null `messages`) is a single question when the file
        // also has the prompt column: files that mix the two forms lose no row.
        Some(c) => {
            let single = if df.column(&mapping.prompt).is_ok() {
                Some(string_column(&df, path, &mapping.prompt, "prompt")?)
            } else {
                None
            };
            c.iter()
                .enumerate()
                .map(|(row, (_, turns, p))| match (p, &single) {
                    (None, Some(single)) if turns.is_empty() => single[row].clone(),
                    _ => p.clone(),
                })
                .collect()
        }
        None => string_column(&df, path, &mapping.prompt, "prompt")?,
    };
    let ids = mapping
        .id
        .as_deref()
        .map(|c| string_column(&df, path, c, "id"))
        .transpose()?;
    let systems = mapping
        .system
        .as_deref()
        .map(|c| string_column(&df, path, c, "system"))
        .transpose()?;
    let metadata = mapping
        .metadata
        .iter()
        .map(|c| Ok((c.clone(), string_column(&df, path, c, "metadata")?)))
        .collect::<Result<Vec<_>>>()?;
    let mut report = ReadReport {
        rows: df.height(),
        skipped_empty: 0,
    };
    let mut out = Vec::with_capacity(df.height());
    for (row, prompt) in prompts.into_iter().enumerate() {
        let Some(prompt) = prompt.filter(|p| !p.trim().is_empty()) else {
            report.skipped_empty += 1;
            continue;
        };
        let source_id = ids
            .as_ref()
            .and_then(|ids| ids[row].clone())
            .unwrap_or_else(|| row.to_string());
        let (turn_system, history) = match &conversations {
            Some(c) => (c[row].0.clone(), c[row].1.clone()),
            None => (None, Vec::new()),
        };
        let system = systems
            .as_ref()
            .and_then(|s| s[row].clone())
            .or(turn_system)
            .filter(|s| !s.is_empty());
        let meta = (!metadata.is_empty()).then(|| {
            Value::Object(
                metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v[row].clone().map_or(Value::Null, Value::String)))
                    .collect::<Map<_, _>>(),
            )
        });
        out.push(PromptRecord {
            source_id,
            prompt,
            system,
            history,
            metadata: meta,
        });
    }
    if out.is_empty() {
        return Err(Error::NoPrompts {
            path: path.into(),
            column: mapping.messages.clone().unwrap_or(mapping.prompt.clone()),
        });
    }
    Ok((out, report))
}

/// One Aligner training example: a question, an upstream answer, and its correction.
#[derive(Debug, Clone, PartialEq)]
pub struct QacRecord {
    pub question: String,
    pub answer: String,
    pub correction: String,
}

/// Reads Q-A-C data (columns `question`, `answer`, `correction`; JSONL, CSV or Parquet). Rows
/// with an empty question or answer are skipped and counted; an empty correction is an empty
/// target, which is rarely wanted, so those rows are skipped too.
pub fn read_qac(path: &Path, format: Format) -> Result<(Vec<QacRecord>, ReadReport)> {
    let df = read_frame(path, format)?;
    let q = string_column(&df, path, "question", "question")?;
    let a = string_column(&df, path, "answer", "answer")?;
    let c = string_column(&df, path, "correction", "correction")?;
    let mut report = ReadReport {
        rows: df.height(),
        skipped_empty: 0,
    };
    let mut out = Vec::with_capacity(df.height());
    for ((q, a), c) in q.into_iter().zip(a).zip(c) {
        match (q, a, c) {
            (Some(q), Some(a), Some(c))
                if !q.trim().is_empty() && !a.trim().is_empty() && !c.trim().is_empty() =>
            {
                out.push(QacRecord {
                    question: q,
                    answer: a,
                    correction: c,
                })
            }
            _ => report.skipped_empty += 1,
        }
    }
    if out.is_empty() {
        return Err(Error::NoPrompts {
            path: path.into(),
            column: "question".into(),
        });
    }
    Ok((out, report))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// prompt / chosen / rejected
    Dpo,
    /// prompt / completion (the correction)
    Sft,
}

/// One preference pair to export.
#[derive(Debug, Clone)]
pub struct PairRecord {
    pub system: Option<String>,
    /// The turns before the prompt (role, content), oldest first; empty for a single turn.
    pub history: Vec<(String, String)>,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

#[derive(serde::Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

/// One exported record; field order is the order users see in the file.
#[derive(serde::Serialize)]
struct Record<'a, P: serde::Serialize, C: serde::Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    prompt: P,
    #[serde(skip_serializing_if = "Option::is_none")]
    chosen: Option<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion: Option<C>,
}

fn write_record(
    out: &mut Vec<u8>,
    pair: &PairRecord,
    kind: Kind,
    conversational: bool,
) -> serde_json::Result<()> {
    let (chosen, rejected, completion) = match kind {
        Kind::Dpo => (
            Some(pair.chosen.as_str()),
            Some(pair.rejected.as_str()),
            None,
        ),
        Kind::Sft => (None, None, Some(pair.chosen.as_str())),
    };
    let v = if conversational {
        let mut prompt = Vec::new();
        if let Some(system) = &pair.system {
            prompt.push(Msg {
                role: "system",
                content: system,
            });
        }
        for (role, content) in &pair.history {
            prompt.push(Msg { role, content });
        }
        prompt.push(Msg {
            role: "user",
            content: &pair.prompt,
        });
        fn turn(t: Option<&str>) -> Option<Vec<Msg<'_>>> {
            t.map(|content| {
                vec![Msg {
                    role: "assistant",
                    content,
                }]
            })
        }
        serde_json::to_writer(
            out,
            &Record {
                system: None,
                prompt,
                chosen: turn(chosen),
                rejected: turn(rejected),
                completion: turn(completion),
            },
        )
    } else {
        serde_json::to_writer(
            out,
            &Record {
                system: pair.system.as_deref(),
                prompt: pair.prompt.as_str(),
                chosen,
                rejected,
                completion,
            },
        )
    };
    v
}

/// Reads preference pairs as [`write_pairs`] writes them (what `aligner train` trains on):
/// `prompt`, `chosen`, `rejected` and an optional `system`, each a string or, in the
/// conversational form, a list of `{role, content}` messages. JSONL, or Parquet in the plain
/// form.
pub fn read_pairs(path: &Path) -> Result<Vec<PairRecord>> {
    let parquet = path.extension().is_some_and(|e| e == "parquet");
    let rerr = |m: String| Error::Read {
        path: path.into(),
        format: if parquet { "Parquet" } else { "JSONL" },
        message: m,
    };
    if parquet {
        let df = read_frame(path, Format::Parquet)?;
        let p = string_column(&df, path, "prompt", "prompt")?;
        let c = string_column(&df, path, "chosen", "chosen")?;
        let r = string_column(&df, path, "rejected", "rejected")?;
        let sys = string_column(&df, path, "system", "system").ok();
        let mut out = Vec::with_capacity(df.height());
        for (i, ((p, c), r)) in p.into_iter().zip(c).zip(r).enumerate() {
            let (Some(prompt), Some(chosen), Some(rejected)) = (p, c, r) else {
                return Err(rerr(format!(
                    "row {} has an empty prompt, chosen or rejected",
                    i + 1
                )));
            };
            let system = sys.as_ref().and_then(|s| s[i].clone());
            out.push(PairRecord {
                system,
                history: Vec::new(),
                prompt,
                chosen,
                rejected,
            });
        }
        return Ok(out);
    }
    let text = std::fs::read_to_string(path).map_err(|e| rerr(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = |m: String| rerr(format!("line {}: {m}", i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        // A string, or the messages of a conversational record: (system, text of the turns).
        let field = |name: &str| -> std::result::Result<(Option<String>, String), String> {
            match &v[name] {
                serde_json::Value::String(s) => Ok((None, s.clone())),
                serde_json::Value::Array(messages) => {
                    let mut system = None;
                    let mut text = Vec::new();
                    for m in messages {
                        let content = m["content"].as_str().unwrap_or_default().to_string();
                        if m["role"] == "system" {
                            system = Some(content);
                        } else {
                            text.push(content);
                        }
                    }
                    Ok((system, text.join("\n\n")))
                }
                _ => Err(format!(
                    "`{name}` is missing or is neither a string nor a list of messages"
                )),
            }
        };
        // A conversational prompt: its system message, the turns before its last user
        // message, and that message.
        let (in_prompt, history, prompt) = match &v["prompt"] {
            serde_json::Value::Array(messages) => {
                let turns: Vec<(String, String)> = messages
                    .iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or_default().to_string(),
                            m["content"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                let (system, history, prompt) = conversation(turns);
                let prompt = prompt.ok_or_else(|| at("`prompt` has no user message".into()))?;
                (system, history, prompt)
            }
            _ => {
                let (s, p) = field("prompt").map_err(at)?;
                (s, Vec::new(), p)
            }
        };
        let (_, chosen) = field("chosen").map_err(at)?;
        let (_, rejected) = field("rejected").map_err(at)?;
        let system = v["system"].as_str().map(str::to_string).or(in_prompt);
        out.push(PairRecord {
            system,
            history,
            prompt,
            chosen,
            rejected,
        });
    }
    if out.is_empty() {
        return Err(rerr("no pairs in the file".into()));
    }
    Ok(out)
}

/// Writes pairs as JSONL (one record per line) or Parquet. Returns the number of records.
pub fn write_pairs(
    path: &Path,
    format: Format,
    kind: Kind,
    conversational: bool,
    pairs: &[PairRecord],
) -> Result<usize> {
    let werr = |m: String| Error::Write {
        path: path.into(),
        message: m,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| werr(e.to_string()))?;
    }
    if let (false, Some(i)) = (
        conversational,
        pairs.iter().position(|p| !p.history.is_empty()),
    ) {
        return Err(werr(format!(
            "pair {} has earlier turns, which the plain format cannot hold\nhint: export conversationally (`conversational: true` on the backend, `aligner export --conversational`): TRL's conversational format keeps them as the prompt's messages",
            i + 1
        )));
    }
    let mut jsonl = Vec::new();
    for pair in pairs {
        write_record(&mut jsonl, pair, kind, conversational).map_err(|e| werr(e.to_string()))?;
        jsonl.push(b'\n');
    }
    // Write to a temporary name and rename, so a crash never leaves a half file that a
    // training command could pick up.
    let tmp = path.with_extension("partial");
    match format {
        Format::Jsonl => {
            let mut f = BufWriter::new(File::create(&tmp).map_err(|e| werr(e.to_string()))?);
            f.write_all(&jsonl).map_err(|e| werr(e.to_string()))?;
            f.into_inner()
                .map_err(|e| werr(e.to_string()))?
                .sync_all()
                .map_err(|e| werr(e.to_string()))?;
        }
        Format::Parquet => {
            let mut df = if pairs.is_empty() {
                let cols: &[&str] = match kind {
                    Kind::Dpo => &["prompt", "chosen", "rejected"],
                    Kind::Sft => &["prompt", "completion"],
                };
                DataFrame::new(
                    cols.iter()
                        .map(|c| Column::new((*c).into(), Vec::<String>::new()))
                        .collect(),
                )
                .map_err(|e| werr(e.to_string()))?
            } else {
                // polars infers List(Struct{role, content}) for conversational records.
                JsonLineReader::new(Cursor::new(jsonl))
                    .finish()
                    .map_err(|e| werr(e.to_string()))?
            };
            let f = File::create(&tmp).map_err(|e| werr(e.to_string()))?;
            ParquetWriter::new(f)
                .finish(&mut df)
                .map_err(|e| werr(e.to_string()))?;
        }
        Format::Csv => {
            return Err(werr(
                "preference data is written as JSONL or Parquet".into(),
            ))
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| werr(e.to_string()))?;
    Ok(pairs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        Mapping {
            messages: None,
            prompt: "question".into(),
            id: Some("qid".into()),
            system: None,
            metadata: vec!["category".into()],
        }
    }

    #[test]
    fn a_row_without_a_conversation_is_its_prompt_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"id": "a", "prompt": "And shorter?", "messages": [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "Roses."}, {"role": "user", "content": "And shorter?"}]}"#,
                "\n",
                r#"{"id": "b", "prompt": "Why is the sky blue?"}"#,
                "\n",
                r#"{"id": "c", "prompt": " ", "messages": null}"#,
                "\n",
            ),
        )
        .unwrap();
        let m = Mapping {
            prompt: "prompt".into(),
            id: Some("id".into()),
            system: None,
            messages: Some("messages".into()),
            metadata: Vec::new(),
        };
        let (rows, report) = read_prompts(&path, Format::Jsonl, &m).unwrap();
        assert_eq!(report.skipped_empty, 1);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].prompt, "And shorter?");
        assert_eq!(rows[0].history.len(), 2);
        assert_eq!(rows[1].prompt, "Why is the sky blue?");
        assert!(rows[1].history.is_empty());
    }

    #[test]
    fn reads_jsonl_csv_and_parquet_alike() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("p.jsonl");
        std::fs::write(
            &jsonl,
            "{\"qid\": 7, \"question\": \"How do I bake bread?\", \"category\": \"food\"}\n{\"qid\": 8, \"question\": \"  \", \"category\": \"x\"}\n{\"qid\": 9, \"question\": \"Why is the sky blue?\", \"category\": null}\n",
        )
        .unwrap();
        let (rows, report) = read_prompts(&jsonl, Format::Jsonl, &mapping()).unwrap();
        assert_eq!(report.skipped_empty, 1);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].source_id, "7");
        assert_eq!(rows[1].metadata, Some(json!({"category": null})));

        let csv = dir.path().join("p.csv");
        std::fs::write(
            &csv,
            "qid,question,category\n7,\"How do I bake bread?\",food\n9,\"Why, oh why?\",\n",
        )
        .unwrap();
        let (rows, _) = read_prompts(&csv, Format::Csv, &mapping()).unwrap();
        assert_eq!(rows[1].prompt, "Why, oh why?");

        // Parquet through our own writer, read back.
        let pq = dir.path().join("p.parquet");
        let pair = PairRecord {
            history: Vec::new(),
            system: None,
            prompt: "q".into(),
            chosen: "c".into(),
            rejected: "r".into(),
        };
        write_pairs(&pq, Format::Parquet, Kind::Dpo, false, &[pair]).unwrap();
        let m = Mapping {
            messages: None,
            prompt: "prompt".into(),
            id: None,
            system: None,
            metadata: vec![],
        };
        let (rows, _) = read_prompts(&pq, Format::Parquet, &m).unwrap();
        assert_eq!(
            rows,
            vec![PromptRecord {
                history: Vec::new(),
                source_id: "0".into(),
                prompt: "q".into(),
                system: None,
                metadata: None
            }]
        );
    }

    #[test]
    fn missing_column_names_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("p.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"hi\"}\n").unwrap();
        let m = Mapping {
            messages: None,
            prompt: "prompt".into(),
            id: None,
            system: None,
            metadata: vec![],
        };
        let err = read_prompts(&jsonl, Format::Jsonl, &m)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no column `prompt` (columns: `text`)"),
            "{err}"
        );
        assert!(
            err.contains("hint: map it with `prompts.fields.prompt"),
            "{err}"
        );
    }

    #[test]
    fn conversational_exports_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pair = PairRecord {
            history: Vec::new(),
            system: Some("be nice".into()),
            prompt: "q".into(),
            chosen: "c".into(),
            rejected: "r".into(),
        };
        let path = dir.path().join("d.jsonl");
        write_pairs(
            &path,
            Format::Jsonl,
            Kind::Dpo,
            true,
            std::slice::from_ref(&pair),
        )
        .unwrap();
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(
            line.starts_with(r#"{"prompt":[{"role":"system","content":"be nice"}"#),
            "{line}"
        );
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(
            v["prompt"][0],
            json!({"role": "system", "content": "be nice"})
        );
        assert_eq!(v["chosen"], json!([{"role": "assistant", "content": "c"}]));
        let pq = dir.path().join("d.parquet");
        write_pairs(&pq, Format::Parquet, Kind::Sft, true, &[pair]).unwrap();
        let df = ParquetReader::new(File::open(&pq).unwrap())
            .finish()
            .unwrap();
        assert_eq!(df.get_column_names(), ["prompt", "completion"]);
        assert!(matches!(
            df.column("prompt").unwrap().dtype(),
            DataType::List(_)
        ));
    }

    #[test]
    fn pairs_read_back_as_they_were_written_in_every_form() {
        let dir = tempfile::tempdir().unwrap();
        let pairs = vec![
            PairRecord {
                history: Vec::new(),
                system: Some("Be brief.".into()),
                prompt: "How do I lay off staff humanely?".into(),
                chosen: "Tell them in person, early.".into(),
                rejected: "I can't help with that.".into(),
            },
            PairRecord {
                history: Vec::new(),
                system: None,
                prompt: "Hi".into(),
                chosen: "Hello!".into(),
                rejected: "No.".into(),
            },
        ];
        for (name, format, conversational) in [
            ("plain.jsonl", Format::Jsonl, false),
            ("chat.jsonl", Format::Jsonl, true),
            ("plain.parquet", Format::Parquet, false),
        ] {
            let path = dir.path().join(name);
            write_pairs(&path, format, Kind::Dpo, conversational, &pairs).unwrap();
            let back = read_pairs(&path).unwrap();
            assert_eq!(back.len(), 2, "{name}");
            for (a, b) in back.iter().zip(&pairs) {
                assert_eq!(
                    (&a.system, &a.prompt, &a.chosen, &a.rejected),
                    (&b.system, &b.prompt, &b.chosen, &b.rejected),
                    "{name}"
                );
            }
        }
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"x\", \"chosen\": 3}\n").unwrap();
        let err = read_pairs(&bad).unwrap_err().to_string();
        assert!(err.contains("line 1: `chosen` is missing"), "{err}");
    }
}
