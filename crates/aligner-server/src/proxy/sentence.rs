//! Sentence-by-sentence correction (`--stream-correction sentence`, the Stream Aligner idea):
//! the upstream's answer is streamed, cut into sentences as it arrives
//! ([`aligner_spec::sentences`]), and each sentence is corrected as soon as it is complete,
//! the Aligner reading the question, the corrected answer so far and the next sentence
//! (`stream-aligner-v1`). The corrected words reach the client while the upstream is still
//! writing, instead of after its whole answer.
//!
//! Two tasks per request: the reader turns upstream pieces into sentences; the corrector
//! corrects them in order, streaming each correction's pieces to the client (as the
//! [`Progress`] reports the whole-answer path uses), and writes one record per answer with
//! every step in `proxy_records.sentences`.

use std::time::{Duration, Instant};

use aligner_backend::{Completion, CompletionRequest, Prompt, TextGenerator};
use aligner_spec::sentences::Splitter;
use aligner_spec::{join_step, StreamTemplate};
use aligner_store::NewProxyRecord;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::*;

/// One step of the trace, as `proxy_records.sentences` stores it.
#[derive(Debug, Clone, Serialize)]
struct Step {
    /// The upstream's sentence.
    sentence: String,
    /// What replaced it (the Aligner's text, with the sentence's trailing white space).
    correction: String,
    /// The Aligner's own output.
    output: String,
    /// From the request to the sentence being complete, and how long its correction took.
    complete_ms: f64,
    aligner_ms: f64,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    /// The Aligner failed on it and the sentence was passed through.
    #[serde(skip_serializing_if = "Option::is_none")]
    aligner_error: Option<String>,
}

/// What the reader hands the corrector.
enum Upstream {
    Sentence(String, Instant),
    /// The answer ended: the whole of it, or how it broke off (with the text that arrived).
    End(Result<Completion, (aligner_backend::Error, String)>),
}

/// The request, parsed.
pub(super) struct SentenceRequest {
    pub request: CompletionRequest,
    pub question: String,
    pub messages: Vec<aligner_backend::Message>,
    pub stream: bool,
    pub include_usage: bool,
    pub start: Instant,
    pub requested_ms: i64,
}

/// Answers one request by sentence-by-sentence correction.
pub(super) async fn respond(p: Shared, r: SentenceRequest) -> Result<Response, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    let id = super::super::new_id("chatcmpl");
    let created = super::super::unix_now();
    let model = r.request.model.clone().unwrap_or_default();
    let (stream, include_usage, start) = (r.stream, r.include_usage, r.start);
    tokio::spawn(correct(p.clone(), r, id.clone(), tx));
    let first = rx.recv().await;
    if let Some(Progress::Done(_, Err(e))) = &first {
        return Err(failed(&p, e));
    }
    if !stream {
        return whole(&p, first, rx, (id, created, model), start).await;
    }
    let mut out = sse::Writer::new(id, "chat.completion.chunk", created, model);
    let mut delta = AssistantMessage::assistant("");
    delta.extra.insert(
        "aligner".into(),
        json!({"aligner_model": p.aligner_name, "template": StreamTemplate.id(), "mode": "sentence"}),
    );
    out.chunk(
        vec![chunk_choice(0, delta, None)],
        None::<Option<Value>>,
        Map::new(),
    );
    let handler = Chunks { p, include_usage };
    Ok(sse::respond(rx, first, out, handler))
}

/// The error of a failed answer: the upstream's or the Aligner's (a 502 naming it).
fn failed(p: &Proxy, e: &aligner_backend::Error) -> ApiError {
    if e.message.starts_with(UPSTREAM_MARK) {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "upstream_error",
            message: e.message[UPSTREAM_MARK.len()..].to_string(),
            param: None,
            code: Some("upstream_error"),
        }
    } else {
        p.aligner_failed(e)
    }
}

fn stopped(message: &str) -> aligner_backend::Error {
    aligner_backend::Error {
        kind: aligner_backend::ErrorKind::Transient,
        message: message.to_string(),
        attempts: 1,
    }
}

/// Marks an error as the upstream's, so that the response names the right side.
const UPSTREAM_MARK: &str = "upstream: ";

/// A non-streamed answer: every step, then one body.
async fn whole(
    p: &Proxy,
    first: Option<Progress>,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    (id, created, model): (String, u64, String),
    start: Instant,
) -> Result<Response, ApiError> {
    let mut next = first;
    let done = loop {
        match next {
            Some(Progress::Done(_, result)) => break result,
            Some(Progress::Text(..)) => next = rx.recv().await,
            None => break Err(stopped("the correction ended without an answer")),
        }
    };
    let c = done.map_err(|e| failed(p, &e))?;
    let usage = c_usage(&c);
    let body = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "logprobs": null, "finish_reason": c.finish_reason.as_str()}],
        "usage": usage,
        "aligner": {"aligner_model": p.aligner_name, "template": StreamTemplate.id(), "mode": "sentence"},
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        SERVER_TIMING.clone(),
        timing_header(&[("total", start.elapsed())]),
    );
    Ok(response)
}

/// The usage a finished answer reports (the corrector puts both models' counts in the
/// completion it ends with: upstream in `prompt_tokens`, Aligner in `completion_tokens`).
fn c_usage(c: &Completion) -> Value {
    let n = |v: Option<u32>| u64::from(v.unwrap_or(0));
    json!(Usage::new(n(c.prompt_tokens), n(c.completion_tokens)))
}

/// Streams the steps as chunks, then the finish reason, usage and `[DONE]`; a failure after
/// the first words goes into the stream as an error event.
struct Chunks {
    p: Shared,
    include_usage: bool,
}

impl sse::Handler for Chunks {
    fn handle(&mut self, progress: Progress, out: &mut sse::Writer) {
        match progress {
            Progress::Text(i, text) => {
                if !text.is_empty() {
                    let choice = chunk_choice(i, AssistantMessage::piece(&text), None);
                    out.chunk(vec![choice], None::<Option<Value>>, Map::new());
                }
            }
            Progress::Done(i, Ok(c)) => {
                let choice = chunk_choice(
                    i,
                    AssistantMessage::default(),
                    Some(c.finish_reason.as_str()),
                );
                out.chunk(vec![choice], None::<Option<Value>>, Map::new());
                if self.include_usage {
                    out.chunk(
                        Vec::<ChunkChoice>::new(),
                        Some(Some(c_usage(&c))),
                        Map::new(),
                    );
                }
                out.done();
            }
            Progress::Done(_, Err(e)) => {
                let body = failed(&self.p, &e).body();
                out.raw(serde_json::to_string(&body).expect("an error body serializes"));
                out.done();
            }
        }
    }
}

/// Streams the upstream's answer, corrects it sentence by sentence, reports to `tx` and
/// records the answer.
async fn correct(p: Shared, r: SentenceRequest, id: String, tx: mpsc::UnboundedSender<Progress>) {
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Upstream>();
    let reader = tokio::spawn(read_upstream(
        p.upstream.clone(),
        r.request.clone(),
        sent_tx,
    ));
    let _abort = AbortOnDrop(reader);
    let mut corrected = String::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut first_ms: Option<f64> = None;
    let mut aligner_time = Duration::ZERO;
    let end = loop {
        let Some(msg) = sent_rx.recv().await else {
            break Err((stopped("the upstream reader stopped"), String::new()));
        };
        let (sentence, complete_at) = match msg {
            Upstream::Sentence(s, at) => (s, at),
            Upstream::End(result) => break result,
        };
        if tx.is_closed() {
            return;
        }
        let step_start = Instant::now();
        let request = CompletionRequest {
            prompt: Prompt::Raw(StreamTemplate.render(&r.question, &corrected, &sentence)),
            sampling: step_sampling(&p.sampling, corrected.is_empty(), &sentence),
            model: None,
        };
        let mut out = StepOut::new(&tx, &sentence, &mut first_ms, r.start);
        let result = run_step(&p.aligner, request, &mut out).await;
        let elapsed = step_start.elapsed();
        aligner_time += elapsed;
        let (output, text, error) = match result {
            Ok(c) => {
                let text = join_step(&c.text, &sentence);
                out.finish(&text);
                steps.push(Step {
                    sentence: sentence.clone(),
                    correction: text.clone(),
                    output: c.text.clone(),
                    complete_ms: millis(complete_at - r.start),
                    aligner_ms: millis(elapsed),
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                    aligner_error: None,
                });
                corrected.push_str(&text);
                continue;
            }
            Err(e) if p.on_error == OnAlignerError::Passthrough && !out.sent_any() => (
                String::new(),
                sentence.clone(),
                p.aligner_failed(&e).message,
            ),
            Err(e) => {
                let _ = tx.send(Progress::Done(0, Err(e)));
                return;
            }
        };
        out.finish(&text);
        steps.push(Step {
            sentence: sentence.clone(),
            correction: text.clone(),
            output,
            complete_ms: millis(complete_at - r.start),
            aligner_ms: millis(elapsed),
            prompt_tokens: None,
            completion_tokens: None,
            aligner_error: Some(error),
        });
        corrected.push_str(&text);
    };
    let sum = |f: fn(&Step) -> Option<u32>| steps.iter().filter_map(f).sum::<u32>();
    let (al_prompt, al_completion) = (sum(|s| s.prompt_tokens), sum(|s| s.completion_tokens));
    let (answer, upstream, upstream_error) = match &end {
        Ok(c) => (c.text.clone(), Some(c), None),
        Err((e, partial)) => (partial.clone(), None, Some(e.to_string())),
    };
    if let Some(rec) = &p.recorder {
        let passthrough = steps.iter().find_map(|s| s.aligner_error.clone());
        let _ = rec.send(NewProxyRecord {
            request_id: id,
            choice: 0,
            question: r.question.clone(),
            messages: serde_json::to_string(&r.messages).unwrap_or_default(),
            answer,
            correction: Some(corrected.clone()),
            aligner_error: passthrough,
            upstream_url: p.upstream_url.clone(),
            upstream_model: upstream.map_or_else(
                || r.request.model.clone().unwrap_or_default(),
                |c| c.model.clone(),
            ),
            aligner_model: p.aligner_name.clone(),
            template_id: StreamTemplate.id().to_string(),
            template_hash: hex::encode(Sha256::digest(StreamTemplate.text().as_bytes())),
            answer_finish_reason: upstream.map(|c| c.finish_reason.as_str().to_string()),
            correction_finish_reason: upstream.map(|c| c.finish_reason.as_str().to_string()),
            upstream_prompt_tokens: upstream.and_then(|c| c.prompt_tokens),
            upstream_completion_tokens: upstream.and_then(|c| c.completion_tokens),
            aligner_prompt_tokens: Some(al_prompt),
            aligner_completion_tokens: Some(al_completion),
            upstream_ms: upstream.map(|c| millis(c.latency)),
            aligner_ms: Some(millis(aligner_time)),
            aligner_cost_usd: p
                .aligner_price
                .map(|(i, o)| (f64::from(al_prompt) * i + f64::from(al_completion) * o) / 1e6),
            stream: r.stream,
            sentences: serde_json::to_string(&steps).ok(),
            first_correction_ms: first_ms,
            upstream_error: upstream_error.clone(),
            requested_at_ms: r.requested_ms,
            answered_at_ms: unix_ms(),
            corrected_at_ms: Some(unix_ms()),
        });
    }
    let done = match end {
        Ok(c) => Ok(Completion {
            text: corrected,
            finish_reason: c.finish_reason,
            model: c.model,
            prompt_tokens: Some(c.prompt_tokens.unwrap_or(0) + al_prompt),
            completion_tokens: Some(c.completion_tokens.unwrap_or(0) + al_completion),
            latency: r.start.elapsed(),
            attempts: 1,
            replica: None,
        }),
        Err((e, partial)) => Err(aligner_backend::Error {
            message: if partial.is_empty() {
                format!(
                    "{UPSTREAM_MARK}the upstream `{}` failed: {e}",
                    p.upstream_url
                )
            } else {
                format!(
                    "{UPSTREAM_MARK}the upstream `{}` broke off mid-answer, after {} characters and {} corrected sentences: {e}",
                    p.upstream_url,
                    partial.chars().count(),
                    steps.len(),
                )
            },
            ..e
        }),
    };
    let _ = tx.send(Progress::Done(0, done));
}

/// Reads the upstream's streamed answer into sentences.
async fn read_upstream(
    upstream: std::sync::Arc<dyn TextGenerator>,
    request: CompletionRequest,
    tx: mpsc::UnboundedSender<Upstream>,
) {
    let (sink, mut pieces) = mpsc::unbounded_channel::<String>();
    let call = upstream.complete_streaming(request, sink);
    tokio::pin!(call);
    let mut splitter = Splitter::new();
    let mut received = String::new();
    let mut take = |piece: String, splitter: &mut Splitter| {
        received.push_str(&piece);
        for s in splitter.push(&piece) {
            let _ = tx.send(Upstream::Sentence(s, Instant::now()));
        }
    };
    let result = loop {
        tokio::select! {
            biased;
            Some(piece) = pieces.recv() => take(piece, &mut splitter),
            result = &mut call => {
                while let Ok(piece) = pieces.try_recv() {
                    take(piece, &mut splitter);
                }
                break result;
            }
        }
    };
    let end = match result {
        Ok(c) => {
            for s in splitter.finish() {
                let _ = tx.send(Upstream::Sentence(s, Instant::now()));
            }
            Ok(c)
        }
        Err(e) => Err((e, received)),
    };
    let _ = tx.send(Upstream::End(end));
}

/// Runs one step, streaming its pieces through `out`.
/// The Aligner's sampling for one step. The first step may rewrite the whole answer (a refusal
/// in place of a harmful one), so it has the whole `--aligner-max-tokens`; a later step writes
/// one sentence's correction, so it stops at about twice the sentence's length (at least 24
/// tokens): an Aligner that runs on past its sentence would otherwise hold the stream for the
/// whole budget at every step. The template's own field markers are stop strings, so an
/// Aligner that goes on to write the next field stops there.
fn step_sampling(base: &Sampling, first: bool, sentence: &str) -> Sampling {
    let mut s = base.clone();
    if !first {
        // About four bytes a token: half the sentence's bytes is twice its tokens.
        let cap = (sentence.len() / 2).max(24) as u32;
        s.max_tokens = Some(s.max_tokens.map_or(cap, |m| m.min(cap)));
    }
    for marker in STEP_STOPS {
        if !s.stop.iter().any(|x| x == marker) {
            s.stop.push(marker.to_string());
        }
    }
    s
}

/// What `stream-aligner-v1` puts between its fields: text after them is not a correction.
const STEP_STOPS: [&str; 3] = [" | Next sentence:", " | Answer so far:", " | Question:"];

async fn run_step(
    aligner: &std::sync::Arc<dyn TextGenerator>,
    request: CompletionRequest,
    out: &mut StepOut<'_>,
) -> Result<Completion, aligner_backend::Error> {
    let (sink, mut pieces) = mpsc::unbounded_channel::<String>();
    let call = aligner.complete_streaming(request, sink);
    tokio::pin!(call);
    loop {
        tokio::select! {
            biased;
            Some(piece) = pieces.recv() => out.piece(&piece),
            result = &mut call => {
                while let Ok(piece) = pieces.try_recv() {
                    out.piece(&piece);
                }
                return result;
            }
        }
    }
}

/// One step's pieces on their way to the client: leading white space dropped, trailing white
/// space held back (the sentence's own goes in its place), so that the streamed text is the
/// step's [`join_step`] exactly.
struct StepOut<'a> {
    tx: &'a mpsc::UnboundedSender<Progress>,
    sentence: &'a str,
    first_ms: &'a mut Option<f64>,
    start: Instant,
    sent: String,
    held: String,
}

impl<'a> StepOut<'a> {
    fn new(
        tx: &'a mpsc::UnboundedSender<Progress>,
        sentence: &'a str,
        first_ms: &'a mut Option<f64>,
        start: Instant,
    ) -> Self {
        StepOut {
            tx,
            sentence,
            first_ms,
            start,
            sent: String::new(),
            held: String::new(),
        }
    }

    fn sent_any(&self) -> bool {
        !self.sent.is_empty()
    }

    fn send(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.first_ms.is_none() {
            *self.first_ms = Some(millis(self.start.elapsed()));
        }
        self.sent.push_str(text);
        let _ = self.tx.send(Progress::Text(0, text.to_string()));
    }

    fn piece(&mut self, piece: &str) {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(piece);
        if self.sent.is_empty() {
            text = text.trim_start().to_string();
        }
        let keep = text.trim_end().len();
        self.held = text[keep..].to_string();
        let ready = text[..keep].to_string();
        self.send(&ready);
    }

    /// Sends what is left of `text` (the step's joined correction) after what was streamed.
    fn finish(&mut self, text: &str) {
        match text.strip_prefix(self.sent.as_str()) {
            Some(rest) => {
                let rest = rest.to_string();
                self.send(&rest);
            }
            // Only when the backend's pieces did not add up to its text.
            None => tracing::warn!(
                sentence = self.sentence,
                "a step's streamed pieces differ from its text"
            ),
        }
    }
}

/// Aborts a task when dropped (the client went away: the upstream read stops too).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::{step_sampling, Sampling};

    #[test]
    fn a_later_step_is_held_to_about_twice_its_sentence() {
        let base = Sampling {
            max_tokens: Some(160),
            ..Default::default()
        };
        // The first step keeps the whole budget (a refusal may replace the answer).
        assert_eq!(step_sampling(&base, true, "Short.").max_tokens, Some(160));
        // Later steps: at least 24 tokens, else half the sentence's bytes, never above 160.
        assert_eq!(step_sampling(&base, false, "Short.").max_tokens, Some(24));
        let long = "word ".repeat(40);
        assert_eq!(step_sampling(&base, false, &long).max_tokens, Some(100));
        let huge = "word ".repeat(200);
        assert_eq!(step_sampling(&base, false, &huge).max_tokens, Some(160));
        // The template's field markers stop a step, once each.
        let s = step_sampling(&step_sampling(&base, false, "x"), false, "x");
        assert_eq!(
            s.stop.iter().filter(|x| *x == " | Next sentence:").count(),
            1
        );
        assert_eq!(s.stop.len(), 3);
    }
}
