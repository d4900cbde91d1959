//! Continuous batching: one scheduler thread owns the model; requests join and leave the
//! running batch at every step. A step runs every decoding sequence's next token together
//! with up to `prefill_chunk` prompt tokens of sequences still reading their prompt, so a
//! 1,000-prompt stage runs at batch throughput while each sequence keeps its own cache.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::model::{Chunk, KvCache, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoding at once.
    pub max_batch: usize,
    /// Prompt tokens processed per step across sequences still reading their prompt.
    pub prefill_chunk: usize,
    /// Longest prompt + output, capped by the model's context length.
    pub context: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            prefill_chunk: 512,
            context: 4096,
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<GenOutput, String>>;

struct Job {
    prompt: Vec<u32>,
    params: GenParams,
    reply: Reply,
    stream: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// Counters for benchmarks and logs.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub steps: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub peak_batch: usize,
}

pub struct Engine {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<std::sync::Mutex<EngineStats>>,
    context: usize,
}

impl Engine {
    pub fn start(model: Arc<Model>, tokenizer: Arc<TextTokenizer>, opts: EngineOptions) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(std::sync::Mutex::new(EngineStats::default()));
        let context = opts
            .context
            .min(model.config.context)
            .min(model.max_positions());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("aligner-local-engine".into())
            .spawn(move || {
                Scheduler {
                    model,
                    tokenizer,
                    opts: EngineOptions { context, ..opts },
                    rx,
                    active: Vec::new(),
                    stats: st,
                }
                .run()
            })
            .expect("spawning the engine thread");
        Engine {
            tx: Some(tx),
            thread: Some(thread),
            stats,
            context,
        }
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Generates from `prompt` (token ids). Text pieces go to `stream` as they are final.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        params: GenParams,
        stream: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> Result<GenOutput, String> {
        let rx = self.submit(prompt, params, stream)?;
        rx.await
            .map_err(|_| "the local model engine stopped during generation".to_string())?
    }

    /// Blocking variant for callers outside an async runtime (benchmarks).
    pub fn generate_blocking(
        &self,
        prompt: Vec<u32>,
        params: GenParams,
    ) -> Result<GenOutput, String> {
        let rx = self.submit(prompt, params, None)?;
        rx.blocking_recv()
            .map_err(|_| "the local model engine stopped during generation".to_string())?
    }

    /// Sends a job to the scheduler thread; returns the receiver its result will come on.
    fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenParams,
        stream: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<GenOutput, String>>, String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            prompt,
            params,
            reply,
            stream,
        };
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| "the local model engine has stopped".to_string())?;
        Ok(rx)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Seq {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
    max_stop: usize,
    done: Option<Finish>,
}

struct Scheduler {
    model: Arc<Model>,
    tokenizer: Arc<TextTokenizer>,
    opts: EngineOptions,
    rx: mpsc::Receiver<Job>,
    active: Vec<Seq>,
    stats: Arc<std::sync::Mutex<EngineStats>>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.active.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return,
                }
            }
            while self.active.len() < self.opts.max_batch {
                match self.rx.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => break,
                }
            }
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    fn admit(&mut self, job: Job) {
        let n = job.prompt.len();
        if n == 0 {
            let _ = job.reply.send(Err("empty prompt".into()));
            return;
        }
        if n >= self.opts.context {
            let _ = job.reply.send(Err(format!(
                "prompt is {n} tokens, the context is {} tokens\nhint: shorten the prompt or raise the model's `context`",
                self.opts.context
            )));
            return;
        }
        let max_stop = job.params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let sampler = Sampler::new(job.params.sampling.clone(), &job.prompt);
        self.active.push(Seq {
            cache: KvCache::new(self.model.config.layers),
            fed: 0,
            generated: Vec::new(),
            sampler,
            text: String::new(),
            sent: 0,
            max_stop,
            done: None,
            job,
        });
    }

    fn step(&mut self) {
        let started = Instant::now();
        // Clients that went away free their slot.
        self.active.retain(|s| !s.job.reply.is_closed());
        if self.active.is_empty() {
            return;
        }
        let mut budget = self.opts.prefill_chunk;
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (seq, from, to) in its token stream
        let mut prompt_tokens = 0;
        for (i, s) in self.active.iter().enumerate() {
            if s.fed < s.job.prompt.len() {
                if budget == 0 {
                    continue;
                }
                let take = (s.job.prompt.len() - s.fed).min(budget);
                budget -= take;
                prompt_tokens += take;
                plan.push((i, s.fed, s.fed + take));
            } else {
                plan.push((i, 0, 0));
            }
        }
        // Token slices: prompt pieces, or the last generated token.
        let mut feeds: Vec<Vec<u32>> = Vec::with_capacity(plan.len());
        for &(i, from, to) in &plan {
            let s = &self.active[i];
            if to > 0 {
                feeds.push(s.job.prompt[from..to].to_vec());
            } else {
                feeds.push(vec![*s
                    .generated
                    .last()
                    .expect("decoding sequence has a token")]);
            }
        }
        let wants: Vec<bool> = plan
            .iter()
            .map(|&(i, _, to)| to == 0 || to == self.active[i].job.prompt.len())
            .collect();
        let logits = {
            let mut by_index: Vec<Option<&mut Seq>> = self.active.iter_mut().map(Some).collect();
            let mut chunks = Vec::with_capacity(plan.len());
            for (j, &(i, _, _)) in plan.iter().enumerate() {
                let s = by_index[i].take().expect("each sequence planned once");
                chunks.push(Chunk {
                    cache: &mut s.cache,
                    tokens: &feeds[j],
                    logits: wants[j],
                });
            }
            self.model.forward(&mut chunks)
        };
        let mut logits = logits.into_iter();
        let mut generated = 0;
        for (j, &(i, _, to)) in plan.iter().enumerate() {
            let s = &mut self.active[i];
            if to > 0 {
                s.fed = to;
            }
            if !wants[j] {
                continue;
            }
            let mut l = logits.next().expect("logits for every sequence that asked");
            let token = s.sampler.sample(&mut l);
            generated += 1;
            self.advance(i, token);
        }
        {
            let mut st = self.stats.lock().expect("stats lock");
            st.steps += 1;
            st.prompt_tokens += prompt_tokens as u64;
            st.generated_tokens += generated;
            st.peak_batch = st.peak_batch.max(plan.len());
        }
        tracing::trace!(
            batch = plan.len(),
            prompt_tokens,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        // Finished sequences answer and leave.
        let mut k = 0;
        while k < self.active.len() {
            if let Some(finish) = self.active[k].done {
                let s = self.active.swap_remove(k);
                finish_seq(s, finish);
            } else {
                k += 1;
            }
        }
    }

    fn advance(&mut self, i: usize, token: u32) {
        let eos =
            !self.active[i].job.params.ignore_eos && self.tokenizer.eos_ids().contains(&token);
        let s = &mut self.active[i];
        if eos {
            s.done = Some(Finish::Stop);
        } else {
            s.generated.push(token);
            // Whole-text decode: robust to tokens that split a UTF-8 character.
            if let Ok(t) = self.tokenizer.decode(&s.generated, true) {
                s.text = t;
            }
            if let Some(cut) = find_stop(&s.text, &s.job.params.stop, s.sent) {
                s.text.truncate(cut);
                s.done = Some(Finish::Stop);
            } else if s.generated.len() >= s.job.params.max_tokens
                || s.job.prompt.len() + s.generated.len() >= self.opts.context
            {
                s.done = Some(Finish::Length);
            }
        }
        // Stream what can no longer be part of a stop string or an unfinished character.
        if let Some(tx) = &s.job.stream {
            let end = if s.done.is_some() {
                s.text.len()
            } else {
                let mut e = s.text.len().saturating_sub(s.max_stop.saturating_sub(1));
                if s.text.ends_with('\u{fffd}') {
                    e = e.min(s.text.len() - '\u{fffd}'.len_utf8());
                }
                while e > s.sent && !s.text.is_char_boundary(e) {
                    e -= 1;
                }
                e
            };
            if end > s.sent {
                let _ = tx.send(s.text[s.sent..end].to_string());
                s.sent = end;
            }
        }
    }
}

/// The byte offset where the earliest stop string starts, searching from a little before
/// what was already streamed.
fn find_stop(text: &str, stops: &[String], sent: usize) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let mut from = sent.saturating_sub(s.len());
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|p| from + p)
        })
        .min()
}

fn finish_seq(s: Seq, finish: Finish) {
    let out = GenOutput {
        text: s.text,
        tokens: s.generated,
        finish,
        prompt_tokens: s.job.prompt.len(),
    };
    let _ = s.job.reply.send(Ok(out));
}

#[cfg(test)]
mod tests {
    use super::find_stop;

    #[test]
    fn stop_strings_cut_at_the_earliest_match() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc END x\n\n", &stops, 0), Some(4));
        assert_eq!(find_stop("abc", &stops, 0), None);
        assert_eq!(find_stop("héllo END", &stops, 3), Some(7));
    }
}
