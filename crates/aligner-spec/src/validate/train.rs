//! `rounds.train:` ([`TrainWire`], [`BackendWire`]) and the built-in trainer's options
//! ([`LoraWire`] and the rest), which `aligner.train` shares.

use super::Ctx;
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

impl Ctx<'_> {
    /// The built-in trainer's options (`rounds.train.backend` and `aligner.train` share them).
    pub(super) fn builtin_options(
        &mut self,
        path: &str,
        w: BuiltinWire<'_>,
        default_save_every: u32,
    ) -> crate::types::BuiltinTrainer {
        let q = |f: &str| join(path, f);
        let lora = w.lora.map(|l| {
            let rank = l.rank.unwrap_or(16);
            self.expect(&q("lora.rank"), rank >= 1, "at least 1", rank);
            let alpha = l.alpha.unwrap_or(2.0 * rank as f64);
            self.expect(&q("lora.alpha"), alpha > 0.0, "more than 0", alpha);
            let dropout = l.dropout.unwrap_or(0.0);
            self.expect(
                &q("lora.dropout"),
                (0.0..1.0).contains(&dropout),
                "at least 0 and less than 1",
                dropout,
            );
            use crate::LORA_TARGETS as TARGETS;
            let targets = l
                .targets
                .clone()
                .unwrap_or_else(|| TARGETS.iter().map(|t| t.to_string()).collect());
            for t in &targets {
                if !TARGETS.contains(&t.as_str()) {
                    self.err(
                        &q("lora.targets"),
                        Anchor::Value,
                        format!("`{t}` is not a linear layer of a llama-family model"),
                        Some(format!("targets are {}", TARGETS.join(", "))),
                    );
                }
            }
            crate::types::LoraSpec {
                rank,
                alpha,
                dropout,
                targets,
            }
        });
        if let Some(n) = w.train_layers {
            self.expect(&q("train_layers"), n >= 1, "at least 1", n);
            if lora.is_some() {
                self.err(
                    &q("train_layers"),
                    Anchor::Key,
                    "`train_layers` and `lora` exclude each other",
                    Some("LoRA adapts every layer's named projections; `train_layers` trains the last N layers fully".into()),
                );
            }
        }
        let max_grad_norm = w.max_grad_norm.unwrap_or(1.0);
        self.expect(
            &q("max_grad_norm"),
            max_grad_norm >= 0.0,
            "at least 0",
            max_grad_norm,
        );
        let weight_decay = w.weight_decay.unwrap_or(0.0);
        self.expect(
            &q("weight_decay"),
            (0.0..1.0).contains(&weight_decay),
            "at least 0 and less than 1",
            weight_decay,
        );
        let save_every = w.save_every.unwrap_or(default_save_every);
        self.expect(&q("save_every"), save_every >= 1, "at least 1", save_every);
        crate::types::BuiltinTrainer {
            lora,
            train_layers: w.train_layers,
            seed: w.seed.unwrap_or(42),
            weight_decay,
            max_grad_norm,
            save_every,
        }
    }

    pub(super) fn train(
        &mut self,
        w: &TrainWire,
        (generate_is_openai, generate_has_weights): (bool, bool),
        generate_model: &str,
    ) -> Option<TrainStage> {
        let p = |f: &str| join("rounds.train", f);
        let beta = w.beta.unwrap_or(0.1);
        self.expect(
            &p("beta"),
            beta.is_finite() && beta > 0.0,
            "more than 0",
            beta,
        );
        let learning_rate = w.learning_rate.unwrap_or(1e-6);
        self.expect(
            &p("learning_rate"),
            learning_rate > 0.0 && learning_rate < 1.0,
            "more than 0 and less than 1",
            learning_rate,
        );
        let epochs = w.epochs.unwrap_or(3);
        self.expect(&p("epochs"), epochs >= 1, "at least 1", epochs);
        let batch_size = w.batch_size.unwrap_or(8);
        self.expect(&p("batch_size"), batch_size >= 1, "at least 1", batch_size);
        let gradient_accumulation = w.gradient_accumulation.unwrap_or(1);
        self.expect(
            &p("gradient_accumulation"),
            gradient_accumulation >= 1,
            "at least 1",
            gradient_accumulation,
        );
        let max_length = w.max_length.unwrap_or(1024);
        self.expect(&p("max_length"), max_length >= 1, "at least 1", max_length);
        let warmup_ratio = w.warmup_ratio.unwrap_or(0.03);
        self.expect(
            &p("warmup_ratio"),
            (0.0..1.0).contains(&warmup_ratio),
            "at least 0 and less than 1",
            warmup_ratio,
        );

        let b = &w.backend;
        let backend = match b.kind {
            BackendKind::Builtin => {
                let set = [
                    ("command", b.command.is_some()),
                    ("format", b.format.is_some()),
                    ("conversational", b.conversational.is_some()),
                    ("serve_model", b.serve_model.is_some()),
                ]
                .into_iter()
                .chain(cluster_only_fields(b));
                for (field, _) in set.filter(|(_, is_set)| *is_set) {
                    self.err(
                        &p(&format!("backend.{field}")),
                        Anchor::Key,
                        format!("field `{field}` does not apply to `kind: builtin`"),
                        None,
                    );
                }
                if generate_is_openai {
                    self.err(
                        &p("backend.kind"),
                        Anchor::Value,
                        format!("the built-in trainer trains local models; the generate model `{generate_model}` is `kind: openai`"),
                        Some("make the generate model `kind: local` (a GGUF file or a Hugging Face folder), or use `kind: command` with your own trainer and `serve_model`".into()),
                    );
                }
                if let Some(loss) = &w.loss {
                    use DpoLoss as L;
                    if !matches!(loss, L::Sigmoid | L::Ipo | L::SigmoidNll) {
                        self.err(
                            &p("loss"),
                            Anchor::Value,
                            "the built-in trainer implements the `sigmoid`, `ipo` and `sigmoid_nll` losses",
                            Some("use one of those, or `kind: command` with TRL for the others".into()),
                        );
                    }
                }
                Some(TrainBackend::Builtin(self.builtin_options(
                    &p("backend"),
                    b.builtin(),
                    50,
                )))
            }
            BackendKind::Command | BackendKind::Ray | BackendKind::Slurm => {
                let kind = match b.kind {
                    BackendKind::Ray => "ray",
                    BackendKind::Slurm => "slurm",
                    _ => "command",
                };
                for (owner, k) in [("ray", BackendKind::Ray), ("slurm", BackendKind::Slurm)] {
                    if k == b.kind {
                        continue;
                    }
                    for (field, _) in cluster_fields(b, k).into_iter().filter(|f| f.1) {
                        self.err(
                            &p(&format!("backend.{field}")),
                            Anchor::Key,
                            format!("field `{field}` applies to `kind: {owner}` only"),
                            None,
                        );
                    }
                }
                if b.kind == BackendKind::Command && b.poll_seconds.is_some() {
                    self.err(
                        &p("backend.poll_seconds"),
                        Anchor::Key,
                        "field `poll_seconds` applies to `kind: ray` and `kind: slurm` only",
                        None,
                    );
                }
                for field in b.builtin().set() {
                    self.err(
                        &p(&format!("backend.{field}")),
                        Anchor::Key,
                        format!("field `{field}` applies to `kind: builtin` only"),
                        Some(
                            "your train command takes its own options; pass them in `command`"
                                .into(),
                        ),
                    );
                }
                let cmd_path = p("backend.command");
                let command = match &b.command {
                    None => {
                        self.missing(
                            &p("backend"),
                            "command",
                            format!("missing field `command` for `kind: {kind}`"),
                            Some("e.g. `command: \"python train.py --data {data} --model {base_model} --out {output_dir}\"`".into()),
                        );
                        None
                    }
                    Some(c) => self.interpolate(&cmd_path, c).filter(|c| {
                        if c.trim().is_empty() {
                            self.err(&cmd_path, Anchor::Value, "`command` is empty", None);
                            false
                        } else if !c.contains("{output_dir}") {
                            self.err(
                                &cmd_path,
                                Anchor::Value,
                                "`command` does not use `{output_dir}`",
                                Some("the trainer must write the new checkpoint to `{output_dir}`; also available: `{data}`, `{base_model}`, `{round}`".into()),
                            );
                            false
                        } else {
                            true
                        }
                    }),
                };
                if generate_is_openai && !generate_has_weights {
                    self.missing(
                        &format!("models.{generate_model}"),
                        "weights",
                        format!("`weights` is required: the generate model `{generate_model}` is `kind: openai` and round 1's trainer gets its weights as `{{base_model}}`, not the name a server gives them"),
                        Some("the path or hub id of the served model's weights, e.g. `weights: Qwen/Qwen2.5-7B-Instruct` or `weights: /models/upstream`".into()),
                    );
                }
                if b.serve_model.is_none() && generate_is_openai {
                    self.missing(
                        &p("backend"),
                        "serve_model",
                        format!("`serve_model` is required: the generate model `{generate_model}` is `kind: openai`"),
                        Some("the name under which your server will serve the new checkpoint, e.g. `serve_model: \"ckpt-round-{round}\"` (`{round}` and `{output_dir}` are filled in)".into()),
                    );
                }
                if let Some(s) = &b.serve_model {
                    if s.trim().is_empty() {
                        self.err(
                            &p("backend.serve_model"),
                            Anchor::Value,
                            "`serve_model` is empty",
                            None,
                        );
                    }
                }
                let scheduler = match b.kind {
                    BackendKind::Ray => Some(self.ray_cluster(&p("backend"), b).map(Cluster::Ray)),
                    BackendKind::Slurm => {
                        Some(self.slurm_cluster(&p("backend"), b).map(Cluster::Slurm))
                    }
                    _ => None,
                };
                let trainer = command.map(|command| ExternalTrainer {
                    command,
                    format: match b.format.unwrap_or(ExportFormatWire::Jsonl) {
                        ExportFormatWire::Jsonl => ExportFormat::Jsonl,
                        ExportFormatWire::Parquet => ExportFormat::Parquet,
                    },
                    conversational: b.conversational.unwrap_or(false),
                    serve_model: b.serve_model.clone(),
                });
                match scheduler {
                    None => trainer.map(TrainBackend::Command),
                    Some(cluster) => match (trainer?, cluster?) {
                        (trainer, Cluster::Ray(cluster)) => {
                            Some(TrainBackend::Ray { trainer, cluster })
                        }
                        (trainer, Cluster::Slurm(cluster)) => {
                            Some(TrainBackend::Slurm { trainer, cluster })
                        }
                    },
                }
            }
        };
        let serve = match &w.serve {
            None => Some(None),
            Some(sw) => {
                let served = matches!(&backend, Some(b) if b.external().is_some_and(|t| t.serve_model.is_some()));
                if !generate_is_openai || (backend.is_some() && !served) {
                    self.err(
                        &p("serve"),
                        Anchor::Key,
                        "`serve` puts a checkpoint behind an `openai` upstream's endpoint, under the backend's `serve_model`",
                        Some(format!("it needs the generate model `{generate_model}` to be `kind: openai` and a `command`, `ray` or `slurm` backend with `serve_model`; a local upstream answers from the checkpoint folder by itself")),
                    );
                    None
                } else {
                    self.serve(&p("serve"), sw).map(Some)
                }
            }
        };
        Some(TrainStage {
            method: w.method.unwrap_or(TrainMethod::Dpo),
            beta,
            loss: w.loss.unwrap_or(DpoLoss::Sigmoid),
            learning_rate,
            epochs,
            batch_size,
            gradient_accumulation,
            max_length,
            warmup_ratio,
            reference: match w.reference.unwrap_or(ReferenceWire::Initial) {
                ReferenceWire::Initial => ReferencePolicy::Initial,
                ReferenceWire::Previous => ReferencePolicy::Previous,
            },
            backend: backend?,
            serve: serve?,
            replay: match &w.replay {
                None => None,
                Some(r) => Some(self.replay(&p("replay"), r)?),
            },
        })
    }

    /// `rounds.train.replay`.
    fn replay(&mut self, path: &str, w: &ReplayWire) -> Option<Replay> {
        let ok = self.expect(
            &join(path, "min_pairs"),
            w.min_pairs >= 1,
            "at least 1",
            w.min_pairs,
        );
        let origins = w
            .origins
            .clone()
            .unwrap_or_else(|| vec![PairKind::Correction]);
        if origins.is_empty() {
            self.err(
                &join(path, "origins"),
                Anchor::Value,
                "`origins` is empty: nothing could be replayed",
                Some("list the pair kinds to replay, e.g. `origins: [correction]` (the default), or remove `replay`".into()),
            );
            return None;
        }
        ok.then_some(Replay {
            min_pairs: w.min_pairs,
            origins,
        })
    }

    /// `rounds.train.serve`.
    fn serve(&mut self, path: &str, w: &ServeWire) -> Option<ServeSpec> {
        let q = |f: &str| join(path, f);
        let timeout_secs = w.timeout_secs.unwrap_or(600.0);
        self.expect(
            &q("timeout_secs"),
            timeout_secs > 0.0,
            "more than 0",
            timeout_secs,
        );
        let base_url = match &w.base_url {
            Some(u) => {
                let u = self.interpolate(&q("base_url"), u)?;
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    self.err(
                        &q("base_url"),
                        Anchor::Value,
                        format!("`base_url` must be an http(s) URL, got `{u}`"),
                        None,
                    );
                    return None;
                }
                Some(u.trim_end_matches('/').to_string())
            }
            None => None,
        };
        let how = match w.kind {
            ServeKindWire::Command => {
                let command = match &w.command {
                    None => {
                        self.missing(path, "command", "missing field `command` for `kind: command`", Some("e.g. `command: \"vllm serve {checkpoint} --port {port} --served-model-name {name}\"` or `\"aligner serve {checkpoint} --port {port} --name {name}\"`".into()));
                        None
                    }
                    Some(c) => self.interpolate(&q("command"), c).filter(|c| {
                        let ok = c.contains("{checkpoint}");
                        if !ok {
                            self.err(&q("command"), Anchor::Value, "`command` does not use `{checkpoint}`", Some("the server must load the round's checkpoint: `{checkpoint}`; also available: `{port}`, `{name}`, `{round}`".into()));
                        }
                        ok
                    }),
                };
                let port = w.port.or_else(|| {
                    self.missing(path, "port", "missing field `port` for `kind: command`", Some("the port round 1's checkpoint is served on (round k's: port + k - 1), e.g. `port: 8100`".into()));
                    None
                });
                let base_url = base_url.unwrap_or_else(|| "http://127.0.0.1:{port}/v1".to_string());
                ServeHow::Command {
                    command: command?,
                    port: port?,
                    base_url,
                }
            }
            ServeKindWire::VllmLora | ServeKindWire::SglangReload => {
                for (field, set) in [("command", w.command.is_some()), ("port", w.port.is_some())] {
                    if set {
                        self.err(
                            &q(field),
                            Anchor::Key,
                            format!("field `{field}` applies to `kind: command` only"),
                            None,
                        );
                    }
                }
                if w.kind == ServeKindWire::VllmLora {
                    ServeHow::VllmLora { base_url }
                } else {
                    ServeHow::SglangReload { base_url }
                }
            }
        };
        Some(ServeSpec { how, timeout_secs })
    }
}

/// The fields of one cluster kind (`ray` or `slurm`), and whether each is set.
fn cluster_fields(b: &BackendWire, kind: BackendKind) -> Vec<(&'static str, bool)> {
    match kind {
        BackendKind::Ray => vec![
            ("address", b.address.is_some()),
            ("runtime_env", b.runtime_env.is_some()),
            ("entrypoint_num_cpus", b.entrypoint_num_cpus.is_some()),
            ("entrypoint_num_gpus", b.entrypoint_num_gpus.is_some()),
            ("metadata", b.metadata.is_some()),
        ],
        BackendKind::Slurm => vec![
            ("partition", b.partition.is_some()),
            ("time", b.time.is_some()),
            ("nodes", b.nodes.is_some()),
            ("gpus", b.gpus.is_some()),
            ("cpus_per_task", b.cpus_per_task.is_some()),
            ("mem", b.mem.is_some()),
            ("sbatch", b.sbatch.is_some()),
        ],
        BackendKind::Command | BackendKind::Builtin => vec![],
    }
}

/// Every cluster-only field, and whether each is set (`kind: command` and `kind: builtin`
/// take none of them).
fn cluster_only_fields(b: &BackendWire) -> impl Iterator<Item = (&'static str, bool)> {
    let mut all = cluster_fields(b, BackendKind::Ray);
    all.extend(cluster_fields(b, BackendKind::Slurm));
    all.push(("poll_seconds", b.poll_seconds.is_some()));
    all.into_iter()
}

impl Ctx<'_> {
    /// `kind: ray`'s cluster: where the dashboard is and what the job asks for.
    fn ray_cluster(&mut self, path: &str, b: &BackendWire) -> Option<RayCluster> {
        let q = |f: &str| join(path, f);
        let address = match &b.address {
            None => {
                self.missing(
                    path,
                    "address",
                    "missing field `address` for `kind: ray`",
                    Some("the Ray dashboard's address, e.g. `address: ${RAY_ADDRESS:-http://127.0.0.1:8265}`".into()),
                );
                None
            }
            Some(a) => self.interpolate(&q("address"), a).filter(|a| {
                let ok = a.starts_with("http://") || a.starts_with("https://");
                if !ok {
                    self.err(
                        &q("address"),
                        Anchor::Value,
                        format!("`address` must be the dashboard's http(s) URL, got `{a}`"),
                        Some("e.g. `http://127.0.0.1:8265` (the dashboard port, not the GCS port 6379)".into()),
                    );
                }
                ok
            }),
        };
        if let Some(env) = &b.runtime_env {
            if !env.is_object() {
                self.err(
                    &q("runtime_env"),
                    Anchor::Value,
                    "`runtime_env` must be a mapping (Ray's runtime environment)",
                    Some("e.g. `runtime_env: {env_vars: {HF_HOME: /shared/hf}}`".into()),
                );
            }
        }
        for (field, value) in [
            ("entrypoint_num_cpus", b.entrypoint_num_cpus),
            ("entrypoint_num_gpus", b.entrypoint_num_gpus),
        ] {
            if let Some(v) = value {
                self.expect(&q(field), v >= 0.0, "at least 0", v);
            }
        }
        let poll_seconds = b.poll_seconds.unwrap_or(2.0);
        self.expect(
            &q("poll_seconds"),
            poll_seconds > 0.0 && poll_seconds <= 3600.0,
            "more than 0 and at most 3600",
            poll_seconds,
        );
        Some(RayCluster {
            address: address?.trim_end_matches('/').to_string(),
            runtime_env: b.runtime_env.clone().filter(|e| e.is_object()),
            entrypoint_num_cpus: b.entrypoint_num_cpus,
            entrypoint_num_gpus: b.entrypoint_num_gpus,
            metadata: b.metadata.clone().unwrap_or_default(),
            poll_seconds,
        })
    }
}

/// A validated cluster block, before it joins its trainer.
enum Cluster {
    Ray(RayCluster),
    Slurm(SlurmCluster),
}

impl Ctx<'_> {
    /// `kind: slurm`'s batch options.
    fn slurm_cluster(&mut self, path: &str, b: &BackendWire) -> Option<SlurmCluster> {
        let q = |f: &str| join(path, f);
        let mut text = |field: &str, value: &Option<String>| -> Option<String> {
            let v = self.interpolate(&q(field), value.as_deref()?)?;
            if v.trim().is_empty() || v.contains('\n') {
                self.err(
                    &q(field),
                    Anchor::Value,
                    format!("`{field}` must be one non-empty line"),
                    None,
                );
                return None;
            }
            Some(v)
        };
        let partition = text("partition", &b.partition);
        let time = text("time", &b.time);
        let gpus = text("gpus", &b.gpus);
        let mem = text("mem", &b.mem);
        for (field, value) in [("nodes", b.nodes), ("cpus_per_task", b.cpus_per_task)] {
            if let Some(v) = value {
                self.expect(&q(field), v >= 1, "at least 1", v);
            }
        }
        let mut sbatch = Vec::new();
        for (i, line) in b.sbatch.iter().flatten().enumerate() {
            let at = q(&format!("sbatch[{i}]"));
            if let Some(line) = self.interpolate(&at, line) {
                if !line.starts_with('-') || line.contains('\n') {
                    self.err(
                        &at,
                        Anchor::Value,
                        format!("`{line}` is not an sbatch option"),
                        Some("write options as sbatch takes them, e.g. `--account=alignment` or `--constraint=a100`".into()),
                    );
                } else {
                    sbatch.push(line);
                }
            }
        }
        let poll_seconds = b.poll_seconds.unwrap_or(5.0);
        self.expect(
            &q("poll_seconds"),
            poll_seconds > 0.0 && poll_seconds <= 3600.0,
            "more than 0 and at most 3600",
            poll_seconds,
        );
        Some(SlurmCluster {
            partition,
            time,
            nodes: b.nodes,
            gpus,
            cpus_per_task: b.cpus_per_task,
            mem,
            sbatch,
            poll_seconds,
        })
    }
}
