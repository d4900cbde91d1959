//! The invariants ARCHITECTURE.md states, checked: which crates may depend on the heavy
//! dependencies (read from `cargo metadata`), where `unsafe` may appear, and that every source
//! file says what it is for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::repo;

/// Each workspace crate with its direct dependencies (normal, dev and build alike).
fn workspace_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("name").to_string())
                .collect();
            (p["name"].as_str().expect("name").to_string(), deps)
        })
        .collect()
}

/// The heavy dependencies and the only crates allowed to name them.
const OWNERS: &[(&str, &[&str])] = &[
    ("sqlx", &["aligner-store"]),
    ("polars", &["aligner-dataset"]),
    ("candle-core", &["aligner-local", "aligner-train"]),
    ("candle-nn", &["aligner-local", "aligner-train"]),
    ("candle-transformers", &["aligner-local"]),
    (
        "reqwest",
        &["aligner-openai", "aligner-daemon", "aligner-cluster"],
    ),
    (
        "axum",
        &["aligner-server", "aligner-daemon", "aligner-mockserver"],
    ),
    // The proxy's flags are defined once, on `aligner_server::proxy::ProxyOptions`.
    ("clap", &["aligner-cli", "aligner-server"]),
    ("plotters", &["aligner-report"]),
];

#[test]
fn heavy_dependencies_live_in_one_place_each() {
    let crates = workspace_dependencies();
    assert!(crates.contains_key("aligner-engine"), "{crates:?}");
    let mut wrong = Vec::new();
    for (krate, deps) in &crates {
        for (dep, owners) in OWNERS {
            if deps.contains(*dep) && !owners.contains(&krate.as_str()) {
                wrong.push(format!(
                    "`{krate}` depends on `{dep}` (only {owners:?} may)"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_engine_reaches_no_model_http_or_server_code() {
    let crates = workspace_dependencies();
    // Every workspace crate the engine builds on, however indirectly.
    let mut reach = BTreeSet::from(["aligner-engine".to_string()]);
    let mut todo = vec!["aligner-engine".to_string()];
    while let Some(k) = todo.pop() {
        for dep in &crates[&k] {
            if crates.contains_key(dep) && reach.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    for forbidden in [
        "aligner-local",
        "aligner-train",
        "aligner-openai",
        "aligner-server",
    ] {
        assert!(
            !reach.contains(forbidden),
            "the engine reaches `{forbidden}`"
        );
    }
    for k in &reach {
        for dep in ["candle-core", "candle-nn", "reqwest", "axum", "clap"] {
            assert!(
                !crates[k].contains(dep),
                "the engine reaches `{dep}` through `{k}`"
            );
        }
    }
}

#[test]
fn every_source_file_says_what_it_is_for() {
    let mut missing = Vec::new();
    let crates = repo().join("crates");
    for entry in std::fs::read_dir(&crates).unwrap() {
        visit(&entry.unwrap().path().join("src"), &mut missing);
    }
    assert!(
        missing.is_empty(),
        "files without a `//!` line first:\n{}",
        missing.join("\n")
    );
}

fn visit(dir: &Path, missing: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            visit(&path, missing);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.trim_start().starts_with("//!") {
                missing.push(path.display().to_string());
            }
        }
    }
}

/// Where `unsafe` is allowed in a crate's `src` (`#![allow]` or `#[allow]` lines) and where a
/// type is made `Send`/`Sync` by hand (`unsafe impl` lines), as sorted file names.
fn unsafe_sites(krate: &str) -> (Vec<String>, Vec<String>) {
    let src = repo().join("crates").join(krate).join("src");
    let (mut allowing, mut impls) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let lines = || text.lines().map(str::trim_start);
        if lines().any(|l| {
            l.starts_with("#![allow(unsafe_code)]") || l.starts_with("#[allow(unsafe_code)]")
        }) {
            allowing.push(name.clone());
        }
        if lines().any(|l| l.starts_with("unsafe impl")) {
            impls.push(name);
        }
    }
    allowing.sort();
    impls.sort();
    (allowing, impls)
}

/// `unsafe` stays where it is audited: the local kernels and the one shared output pointer
/// (`aligner_local::sync_ptr`, the only hand-made `Send`/`Sync`), the trainer's fused blocks
/// and its allocator tuning.
#[test]
fn unsafe_code_is_allowed_only_in_the_audited_modules() {
    let (allowing, impls) = unsafe_sites("aligner-local");
    assert_eq!(
        allowing,
        [
            "model.rs",
            "quant.rs",
            "safetensors.rs",
            "sync_ptr.rs",
            "tiled.rs"
        ]
    );
    assert_eq!(impls, ["sync_ptr.rs"]);
    let (allowing, impls) = unsafe_sites("aligner-train");
    assert_eq!(allowing, ["fused.rs", "lib.rs"]);
    assert!(impls.is_empty(), "{impls:?}");
}

#[test]
fn the_cli_is_a_shell() {
    let src = repo().join("crates/aligner-cli/src");
    let mut lines = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            lines += std::fs::read_to_string(&path).unwrap().lines().count();
        }
    }
    assert!(
        lines < 1500,
        "crates/aligner-cli/src has {lines} lines; product code belongs in a library crate"
    );
}
