//! The trainer as the pipeline uses it: the engine's [`Trainer`] behind
//! `rounds.train.backend: {kind: builtin}` (this crate on the round's kept pairs, prompts
//! rendered with the model's own chat template exactly as the generate stage rendered them,
//! completions ended with the end-of-turn token) and the round-0 Aligner, plus the jobs behind
//! `aligner train-aligner` and `aligner export-gguf`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::checkpoint::{save_hf, CheckpointMeta};
use crate::data::{Example, Pair};
use crate::gguf_export;
use crate::loss::{DpoKind, DpoOptions};
use crate::model::{LoraConfig, TrainModel, Trainable};
use crate::optim::OptimConfig;
use crate::trainer::{self, LoopConfig, StepLog};
use aligner_backend::Message;
use aligner_engine::{AlignerTrainRequest, TrainEvent, TrainRequest, Trainer};
use aligner_local::chat::ChatTemplate;
use aligner_local::gguf::GgufFile;
use aligner_local::tokenizer::TextTokenizer;
use aligner_spec::{DpoLoss, Invalid, LocalModel, LocalSource, TrainMethod};

pub struct BuiltinTrainer;

impl Trainer for BuiltinTrainer {
    fn train(
        &self,
        request: &TrainRequest,
        events: &mut dyn FnMut(TrainEvent),
    ) -> anyhow::Result<()> {
        run(request, events)
    }

    fn train_aligner(
        &self,
        request: &AlignerTrainRequest,
        events: &mut dyn FnMut(TrainEvent),
    ) -> anyhow::Result<()> {
        let job = AlignerJob {
            base: model_path(&request.base)?,
            template: request.template.clone(),
            stream: false,
            examples: request.examples.clone(),
            settings: request.spec.clone(),
            out: request.out_dir.clone(),
            state_dir: request.state_dir.clone(),
            interrupt: Some(request.interrupt.clone()),
        };
        run_aligner_job(&job, events)
    }
}

/// What trains: LoRA adapters, the last N layers, or every weight.
fn trainable_of(opts: &aligner_spec::BuiltinTrainer) -> Trainable {
    match (&opts.lora, opts.train_layers) {
        (Some(l), _) => Trainable::Lora(LoraConfig {
            rank: l.rank as usize,
            alpha: l.alpha,
            dropout: l.dropout as f32,
            targets: l.targets.clone(),
        }),
        (None, Some(n)) => Trainable::TopLayers(n as usize),
        (None, None) => Trainable::Full,
    }
}

/// The file or folder a local model spec points at.
pub fn model_path(m: &LocalModel) -> Result<PathBuf> {
    match &m.source {
        LocalSource::Gguf { path, .. } | LocalSource::HfFolder { path, .. } => Ok(path.clone()),
        LocalSource::HubId { id, revision } => {
            aligner_local::backend::resolve_hub_id(id, revision.as_deref())
        }
    }
}

/// The tokenizer and chat template of a GGUF file or Hugging Face folder.
pub fn tokenizer_for(path: &Path) -> Result<(TextTokenizer, Option<ChatTemplate>)> {
    let tok = if path.is_dir() {
        TextTokenizer::from_hf_folder(path)?
    } else {
        TextTokenizer::from_gguf(&GgufFile::open(path)?.content)?
    };
    let chat = match tok.chat_template() {
        Some(t) => Some(ChatTemplate::new(
            t,
            tok.bos_token().map(String::from),
            tok.eos_token().map(String::from),
        )?),
        None => None,
    };
    Ok((tok, chat))
}

/// Prompt ids as the generate stage produced them (system + user message through the chat
/// template, generation prompt added), or the plain text without a template.
pub fn prompt_ids(
    tok: &TextTokenizer,
    chat: Option<&ChatTemplate>,
    system: Option<&str>,
    history: &[(String, String)],
    prompt: &str,
) -> Result<Vec<u32>> {
    let text = match chat {
        Some(c) => {
            let mut msgs = Vec::new();
            if let Some(s) = system {
                msgs.push(Message::new("system", s));
            }
            for (role, content) in history {
                msgs.push(Message::new(role.as_str(), content.as_str()));
            }
            msgs.push(Message::new("user", prompt));
            c.render(&msgs, true)?
        }
        None => prompt.to_string(),
    };
    tok.encode(&text, true)
}

/// A completion's ids, ended with the end-of-turn token so the model learns to stop.
pub fn completion_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, false)?;
    if let Some(&eos) = tok.eos_ids().first() {
        ids.push(eos);
    }
    Ok(ids)
}

fn run(req: &TrainRequest, events: &mut dyn FnMut(TrainEvent)) -> Result<()> {
    run_on(req, events, &Device::Cpu)
}

/// [`run`] on `device` (a GPU with the `cuda` feature: `aligner train --device cuda`).
fn run_on(req: &TrainRequest, events: &mut dyn FnMut(TrainEvent), device: &Device) -> Result<()> {
    let device = device.clone();
    let stage = &req.stage;
    let opts = &req.options;
    let base_path = model_path(&req.base)?;
    let (tok, chat) = tokenizer_for(&base_path)?;
    let trainable = trainable_of(opts);
    events(TrainEvent::Log(format!(
        "loading {} to train ({trainable:?})",
        base_path.display()
    )));
    let started = std::time::Instant::now();
    let model = TrainModel::load(&base_path, &trainable, &device)
        .with_context(|| format!("loading {}", base_path.display()))?;
    let pad = tok.eos_ids().first().copied().unwrap_or(0);
    let mut pairs = Vec::with_capacity(req.pairs.len());
    for p in &req.pairs {
        pairs.push(Pair {
            prompt: prompt_ids(
                &tok,
                chat.as_ref(),
                p.system.as_deref(),
                &p.history,
                &p.prompt,
            )?,
            chosen: completion_ids(&tok, &p.chosen)?,
            rejected: completion_ids(&tok, &p.rejected)?,
        });
    }
    let cfg = LoopConfig {
        epochs: stage.epochs as usize,
        batch_size: stage.batch_size as usize,
        max_length: stage.max_length as usize,
        seed: opts.seed,
        optim: OptimConfig {
            learning_rate: stage.learning_rate,
            weight_decay: opts.weight_decay,
            warmup_ratio: stage.warmup_ratio,
            accumulation: stage.gradient_accumulation as usize,
            max_grad_norm: (opts.max_grad_norm > 0.0).then_some(opts.max_grad_norm),
            ..Default::default()
        },
        state_dir: Some(req.state_dir.join("optimizer")),
        save_every: opts.save_every as usize,
        pad,
    };
    // DPO: the loss, and the reference log-probs (before any step).
    let dpo = match stage.method {
        TrainMethod::Sft => None,
        TrainMethod::Dpo => {
            let kind = match stage.loss {
                DpoLoss::Sigmoid => DpoKind::Sigmoid,
                DpoLoss::Ipo => DpoKind::Ipo,
                DpoLoss::SigmoidNll => DpoKind::SigmoidNll { alpha: 1.0 },
                other => bail!(
                    "the built-in trainer has no `{other:?}` loss; use sigmoid, ipo or sigmoid_nll"
                ),
            };
            let options = DpoOptions {
                beta: stage.beta,
                kind,
                label_smoothing: 0.0,
            };
            let refs = reference_logps(req, &model, &pairs, &cfg, &device, events)?;
            Some((options, refs))
        }
    };
    let interrupt = req.interrupt.clone();
    let mut report = |log: &StepLog| -> Result<()> {
        let mut values = vec![
            ("loss".to_string(), log.loss),
            ("learning_rate".to_string(), log.learning_rate),
            ("grad_norm".to_string(), log.grad_norm),
            ("epoch".to_string(), log.epoch),
            ("num_tokens".to_string(), log.tokens as f64),
        ];
        if let Some(d) = &log.dpo {
            values.extend([
                ("rewards/chosen".to_string(), d.rewards_chosen),
                ("rewards/rejected".to_string(), d.rewards_rejected),
                ("rewards/margins".to_string(), d.rewards_margins),
                ("rewards/accuracies".to_string(), d.rewards_accuracies),
                ("logps/chosen".to_string(), d.logps_chosen),
                ("logps/rejected".to_string(), d.logps_rejected),
            ]);
        }
        events(TrainEvent::Metrics {
            step: log.step as u64,
            values,
        });
        if interrupt.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    };
    let summary = match &dpo {
        None => {
            let data: Vec<Example> = pairs
                .iter()
                .map(|p| Example {
                    prompt: p.prompt.clone(),
                    completion: p.chosen.clone(),
                })
                .collect();
            trainer::sft(&model, &data, &cfg, &mut report)?
        }
        Some((options, refs)) => trainer::dpo(&model, &pairs, refs, options, &cfg, &mut report)?,
    };
    if summary.resumed_from > 0 {
        events(TrainEvent::Log(format!(
            "resumed from optimizer step {}",
            summary.resumed_from
        )));
    }
    let meta = CheckpointMeta {
        method: format!("{:?}", stage.method).to_lowercase(),
        aligner_template: None,
        base_model: base_path.display().to_string(),
        optimizer_steps: summary.steps,
        extra: serde_json::json!({ "round": req.round, "pairs": req.pairs.len() }),
    };
    save_hf(&model, &tok, &meta, &req.out_dir)?;
    events(TrainEvent::Log(format!(
        "{} optimizer steps in {:.1} s; checkpoint written to {}",
        summary.steps,
        started.elapsed().as_secs_f64(),
        req.out_dir.display()
    )));
    Ok(())
}

/// The reference log-probs of every pair, computed once per round and kept in the state
/// folder (a resumed round reads them back instead of recomputing).
fn reference_logps(
    req: &TrainRequest,
    model: &TrainModel,
    pairs: &[Pair],
    cfg: &LoopConfig,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
) -> Result<Vec<(f32, f32)>> {
    let file = req.state_dir.join("reference_logps.json");
    let ref_path = model_path(&req.reference)?;
    let fingerprint = format!(
        "{} pairs={} max_length={} first={:?}",
        ref_path.display(),
        pairs.len(),
        cfg.max_length,
        pairs.first().map(|p| (&p.prompt, &p.chosen, &p.rejected))
    );
    if let Ok(text) = std::fs::read_to_string(&file) {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        if v["fingerprint"].as_str() == Some(fingerprint.as_str()) {
            let refs: Vec<(f32, f32)> = serde_json::from_value(v["logps"].clone())?;
            events(TrainEvent::Log(format!(
                "reference log-probs of {} pairs read from {}",
                refs.len(),
                file.display()
            )));
            return Ok(refs);
        }
    }
    let t = std::time::Instant::now();
    let refs = if req.reference == req.base {
        // The policy before its first step is the reference (LoRA adapters start at zero).
        trainer::reference_logps(model, pairs, cfg)?
    } else {
        events(TrainEvent::Log(format!(
            "loading the reference {}",
            ref_path.display()
        )));
        let reference = TrainModel::load(&ref_path, &Trainable::None, device)?;
        trainer::reference_logps(&reference, pairs, cfg)?
    };
    let tmp = file.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::json!({ "fingerprint": fingerprint, "logps": refs }).to_string(),
    )?;
    std::fs::rename(&tmp, &file)?;
    events(TrainEvent::Log(format!(
        "reference log-probs of {} pairs computed in {:.1} s",
        refs.len(),
        t.elapsed().as_secs_f64()
    )));
    Ok(refs)
}

/// `aligner train-aligner`: an Aligner from the question-answer-correction rows of `data`
/// (JSONL, CSV or Parquet), starting from `base`, into `out`. An identity warm-up (a seeded
/// fraction of the data as question-answer-answer, the paper's "residual correction" start)
/// runs first, then the corrections; the loss covers the target tokens and the
/// end-of-sequence token only. The checkpoint records its prompt template byte for byte.
/// `template` is a built-in id or a custom text with `{question}` and `{answer}`.
pub fn train_aligner(
    data: &Path,
    base: &Path,
    out: &Path,
    template_arg: &str,
    settings: aligner_spec::AlignerTrain,
    state_dir: Option<PathBuf>,
) -> Result<()> {
    let stream = template_arg == aligner_spec::StreamTemplate.id();
    let template = aligner_spec::Template::builtin(template_arg)
        .unwrap_or_else(|| aligner_spec::Template::Custom(template_arg.to_string()));
    if let (false, aligner_spec::Template::Custom(t)) = (stream, &template) {
        if !t.contains("{question}") || !t.contains("{answer}") {
            return Err(anyhow::Error::new(Invalid::Message(format!(
                "--template `{}` is neither a built-in template ({}) nor a text with `{{question}}` and `{{answer}}`",
                template_arg,
                aligner_spec::Template::BUILTIN_IDS.join(", ")
            ))));
        }
    }
    if !(0.0..1.0).contains(&settings.warmup_fraction) {
        return Err(anyhow::Error::new(Invalid::Message(
            "--warmup-fraction must be at least 0 and less than 1".into(),
        )));
    }
    let format = match data.extension().and_then(|e| e.to_str()) {
        Some("parquet") => aligner_dataset::Format::Parquet,
        Some("csv") => aligner_dataset::Format::Csv,
        _ => aligner_dataset::Format::Jsonl,
    };
    let (records, report) = aligner_dataset::read_qac(data, format)?;
    eprintln!(
        "{}: {} examples ({} rows skipped: empty question, answer or correction)",
        data.display(),
        records.len(),
        report.skipped_empty
    );
    let job = AlignerJob {
        base: base.to_path_buf(),
        template,
        stream,
        examples: records
            .into_iter()
            .map(|r| aligner_engine::AlignerExample {
                history: Vec::new(),
                question: r.question,
                answer: r.answer,
                correction: r.correction,
            })
            .collect(),
        settings,
        out: out.to_path_buf(),
        state_dir: state_dir.unwrap_or_else(|| out.with_extension("state")),
        interrupt: None,
    };
    run_aligner_job(&job, &mut |ev| match ev {
        TrainEvent::Log(line) => eprintln!("{line}"),
        TrainEvent::Metrics { .. } => {}
    })
}

/// A local model spec for a path or hub id given on the command line.
fn local_model(model: &str) -> LocalModel {
    let path = PathBuf::from(model);
    let source = if path.is_file() {
        LocalSource::Gguf {
            path,
            architecture: None,
        }
    } else if path.is_dir() {
        LocalSource::HfFolder {
            path,
            architecture: None,
        }
    } else {
        LocalSource::HubId {
            id: model.to_string(),
            revision: None,
        }
    };
    LocalModel {
        source,
        dtype: "q8_0".into(),
    }
}

/// Where `aligner train` reads and writes, and on what it runs.
pub struct PairsJob<'a> {
    /// The exported pairs.
    pub data: &'a Path,
    /// A GGUF file, a checkpoint folder or a hub id.
    pub base: &'a str,
    pub reference: &'a str,
    pub out: &'a Path,
    /// Default: `<out>.state`.
    pub state_dir: Option<PathBuf>,
    pub device: &'a str,
}

/// `aligner train`: one round's DPO or SFT over an exported pairs file, by the built-in
/// trainer, as any job (a Ray or Slurm job, a shell) can run it, on `device` (`cpu`, `cuda`
/// or `cuda:N`; CUDA needs a build with the `cuda` feature). Each optimizer step's metrics
/// go to stdout as one JSON object under TRL's names (`{"step": 1, "loss": 0.69, ...}`, what
/// the train stage reads into `training_metrics`); progress goes to stderr.
pub fn train_pairs(
    job: PairsJob<'_>,
    stage: aligner_spec::TrainStage,
    options: aligner_spec::BuiltinTrainer,
) -> Result<()> {
    use std::io::Write;
    let PairsJob {
        data,
        base,
        reference,
        out,
        state_dir,
        device,
    } = job;
    let device = match device {
        "cpu" => Device::Cpu,
        d => {
            let ordinal = match d.strip_prefix("cuda") {
                Some("") => 0,
                Some(n) => n
                    .trim_start_matches(':')
                    .parse()
                    .with_context(|| format!("--device {d}: expected cpu, cuda or cuda:N"))?,
                None => bail!("--device {d}: expected cpu, cuda or cuda:N"),
            };
            Device::new_cuda(ordinal).with_context(|| format!("--device {d}: this build has no CUDA (build with `--features cuda`), or no GPU {ordinal}"))?
        }
    };
    let pairs = aligner_dataset::read_pairs(data)?;
    eprintln!("{}: {} pairs", data.display(), pairs.len());
    // Kept across attempts (a killed job's next attempt resumes from it).
    let state_dir = state_dir.unwrap_or_else(|| out.with_extension("state"));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create `{}`", state_dir.display()))?;
    let request = TrainRequest {
        round: 0,
        stage,
        options,
        base: local_model(base),
        reference: local_model(reference),
        pairs,
        out_dir: out.to_path_buf(),
        state_dir,
        interrupt: Default::default(),
    };
    run_on(
        &request,
        &mut |ev| match ev {
            TrainEvent::Log(line) => eprintln!("{line}"),
            TrainEvent::Metrics { step, values } => {
                let mut object = serde_json::Map::new();
                object.insert("step".into(), step.into());
                for (k, v) in values {
                    object.insert(k, serde_json::Value::from(v));
                }
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{}", serde_json::Value::Object(object));
                let _ = stdout.flush();
            }
        },
        &device,
    )
}

/// One Aligner training, from the command or from a pipeline's `train_aligner` stage.
pub struct AlignerJob {
    /// A GGUF file or a Hugging Face folder.
    pub base: PathBuf,
    /// The whole-answer template; unused with `stream`.
    pub template: aligner_spec::Template,
    /// Teach sentence-by-sentence correction (`stream-aligner-v1`): each row becomes one
    /// prefix-conditioned example per sentence of its answer
    /// ([`aligner_spec::sentences::stream_steps`]).
    pub stream: bool,
    /// The question-answer-correction rows.
    pub examples: Vec<aligner_engine::AlignerExample>,
    pub settings: aligner_spec::AlignerTrain,
    pub out: PathBuf,
    pub state_dir: PathBuf,
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// An Aligner from question-answer-correction rows: an identity warm-up (a seeded fraction of
/// the rows as question-answer-answer, the paper's "residual correction" start), then the
/// corrections; the loss covers the target tokens and the end-of-sequence token only. The
/// checkpoint records its prompt template byte for byte.
pub fn run_aligner_job(job: &AlignerJob, events: &mut dyn FnMut(TrainEvent)) -> Result<()> {
    let s = &job.settings;
    let template = &job.template;
    let (tok, _) = tokenizer_for(&job.base)?;
    let eos = tok.eos_ids().first().copied().unwrap_or(0);
    // The question (with the conversation before it, for a template that shows it) and
    // the answer, rendered; the target after them.
    let example = |x: &aligner_engine::AlignerExample, target: &str| -> Result<Example> {
        let turns: Vec<(&str, &str)> = x
            .history
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        Ok(Example {
            prompt: tok.encode(&template.render_turns(&turns, &x.question, &x.answer), true)?,
            completion: completion_ids(&tok, target)?,
        })
    };
    let stream = aligner_spec::StreamTemplate;
    let step_examples = |q: &str, a: &str, c: &str| -> Result<Vec<Example>> {
        aligner_spec::sentences::stream_steps(a, c)
            .into_iter()
            .map(|st| {
                Ok(Example {
                    prompt: tok.encode(&stream.render(q, &st.prefix, &st.sentence), true)?,
                    completion: completion_ids(&tok, &st.target)?,
                })
            })
            .collect()
    };
    let mut main = Vec::with_capacity(job.examples.len());
    for x in &job.examples {
        if job.stream {
            main.extend(step_examples(&x.question, &x.answer, &x.correction)?);
        } else {
            main.push(example(x, &x.correction)?);
        }
    }
    let mut order: Vec<usize> = (0..job.examples.len()).collect();
    {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(s.options.seed));
    }
    let n_warm = (job.examples.len() as f64 * s.warmup_fraction).round() as usize;
    let mut warm = Vec::with_capacity(n_warm);
    for &i in &order[..n_warm] {
        let x = &job.examples[i];
        if job.stream {
            warm.extend(step_examples(&x.question, &x.answer, &x.answer)?);
        } else {
            warm.push(example(x, &x.answer)?);
        }
    }
    let trainable = trainable_of(&s.options);
    let started = std::time::Instant::now();
    events(TrainEvent::Log(format!(
        "loading {} to train ({trainable:?})",
        job.base.display()
    )));
    let model = TrainModel::load(&job.base, &trainable, &Device::Cpu)
        .with_context(|| format!("loading {}", job.base.display()))?;
    let cfg = |epochs: usize, phase: &str| LoopConfig {
        epochs,
        batch_size: s.batch_size as usize,
        max_length: s.max_length as usize,
        seed: s.options.seed,
        optim: OptimConfig {
            learning_rate: s.learning_rate,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: s.options.weight_decay,
            warmup_ratio: s.warmup_ratio,
            accumulation: s.gradient_accumulation as usize,
            max_grad_norm: (s.options.max_grad_norm > 0.0).then_some(s.options.max_grad_norm),
            ..Default::default()
        },
        state_dir: Some(job.state_dir.join(phase)),
        save_every: s.options.save_every as usize,
        pad: eos,
    };
    // Warm-up steps are numbered first, then the correction steps continue the count.
    let mut offset = 0usize;
    let report = |phase: &'static str, offset: usize| {
        let interrupt = job.interrupt.clone();
        move |l: &StepLog, events: &mut dyn FnMut(TrainEvent)| -> Result<()> {
            events(TrainEvent::Log(format!(
                "{phase} step {:>4}  epoch {:.2}  loss {:.4}  lr {:.2e}  grad_norm {:.3}",
                l.step, l.epoch, l.loss, l.learning_rate, l.grad_norm
            )));
            events(TrainEvent::Metrics {
                step: (offset + l.step) as u64,
                values: vec![
                    ("loss".to_string(), l.loss),
                    ("learning_rate".to_string(), l.learning_rate),
                    ("grad_norm".to_string(), l.grad_norm),
                    ("epoch".to_string(), l.epoch),
                    ("num_tokens".to_string(), l.tokens as f64),
                    (
                        "warmup".to_string(),
                        if phase == "warm-up" { 1.0 } else { 0.0 },
                    ),
                ],
            });
            if interrupt.as_ref().is_some_and(|i| i.load(Ordering::SeqCst)) {
                bail!("interrupted");
            }
            Ok(())
        }
    };
    let mut steps = 0;
    if !warm.is_empty() && s.warmup_epochs > 0 {
        events(TrainEvent::Log(format!(
            "identity warm-up: {} question-answer-answer rows",
            warm.len()
        )));
        let f = report("warm-up", offset);
        let summary = trainer::sft(
            &model,
            &warm,
            &cfg(s.warmup_epochs as usize, "warmup"),
            &mut |l: &StepLog| f(l, events),
        )?;
        steps += summary.steps;
        offset = summary.steps;
    }
    events(TrainEvent::Log(format!(
        "corrections: {} question-answer-correction rows",
        main.len()
    )));
    let f = report("correct", offset);
    steps += trainer::sft(
        &model,
        &main,
        &cfg(s.epochs as usize, "main"),
        &mut |l: &StepLog| f(l, events),
    )?
    .steps;
    let (template_id, template_text) = if job.stream {
        (stream.id().to_string(), stream.text().to_string())
    } else {
        (template.id().to_string(), template.text())
    };
    let meta = CheckpointMeta {
        method: "train_aligner".into(),
        aligner_template: Some(template_id.clone()),
        base_model: job.base.display().to_string(),
        optimizer_steps: steps,
        extra: serde_json::json!({
            "template_text": template_text,
            "examples": main.len(),
            "warmup_examples": warm.len(),
        }),
    };
    save_hf(&model, &tok, &meta, &job.out)?;
    events(TrainEvent::Log(format!(
        "{steps} optimizer steps in {:.1} s; Aligner written to {} (template `{}`)",
        started.elapsed().as_secs_f64(),
        job.out.display(),
        template_id
    )));
    Ok(())
}

/// `aligner export-gguf`: `model` (a checkpoint folder, or any GGUF) as a re-quantized GGUF
/// at `out` of matrix type `dtype` (q8_0, q4_0, q4_1, f16 or f32), for fast local inference
/// (`kind: local`, `aligner serve`, llama.cpp). Metadata (tokenizer, chat template, model
/// constants) comes from `base`, by default the checkpoint's base model when that is a GGUF
/// file (recorded in its `aligner.json`), or `model` itself when it is one. Returns what was
/// written and the GGUF the metadata came from.
pub fn export_gguf(
    model: &Path,
    base: Option<&Path>,
    out: &Path,
    dtype: &str,
) -> Result<(gguf_export::Exported, PathBuf)> {
    use crate::model::{gguf_weights, hf_weights};
    let dtype = gguf_export::parse_type(dtype).map_err(|e| Invalid::Message(e.to_string()))?;
    let is_gguf = model.is_file();
    let base = match (base, is_gguf) {
        (Some(b), _) => b.to_path_buf(),
        (None, true) => model.to_path_buf(),
        (None, false) => {
            // Follow the checkpoints' bases (round 2 trained from round 1's checkpoint, ...) to
            // the GGUF the first one started from.
            let mut at = model.to_path_buf();
            let mut found = None;
            for _ in 0..64 {
                let Some(meta) = crate::checkpoint::read_meta(&at)? else {
                    break;
                };
                let p = PathBuf::from(meta.base_model);
                if p.is_file() && p.extension().is_some_and(|e| e == "gguf") {
                    found = Some(p);
                    break;
                }
                if !p.is_dir() {
                    break;
                }
                at = p;
            }
            found.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no GGUF to take the tokenizer and metadata from\nhint: pass --base FILE.gguf (the GGUF the checkpoint was trained from)",
                    model.display()
                )
            })?
        }
    };
    let (config, weights) = if is_gguf {
        gguf_weights(model)?
    } else {
        hf_weights(model)?
    };
    let info = gguf_export::export_gguf(&config, &weights, &base, out, dtype)?;
    Ok((info, base))
}
