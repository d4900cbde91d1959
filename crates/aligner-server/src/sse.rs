//! The one writer of streamed answers, for the model server and the correction proxy alike:
//! generation tasks report [`Progress`], a [`Handler`] turns each report into chunks on a
//! [`Writer`], and [`respond`] drives the two as a server-sent-event response.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use aligner_backend::{Completion, CompletionRequest, TextGenerator};
use aligner_openai::wire::Chunk;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Map;
use tokio::sync::mpsc;

/// What a choice's generation task reports.
pub(crate) enum Progress {
    Text(usize, String),
    Done(usize, Result<Completion, aligner_backend::Error>),
}

/// Runs one choice, forwarding its text pieces. When the client has gone (the response stream
/// and its receiver dropped), stops forwarding and drops the backend call and its sink.
pub(crate) async fn generate(
    generator: Arc<dyn TextGenerator>,
    index: usize,
    request: CompletionRequest,
    tx: mpsc::UnboundedSender<Progress>,
) {
    let (sink, mut pieces) = mpsc::unbounded_channel::<String>();
    let call = generator.complete_streaming(request, sink);
    tokio::pin!(call);
    loop {
        tokio::select! {
            biased;
            Some(piece) = pieces.recv() => {
                if tx.send(Progress::Text(index, piece)).is_err() {
                    return;
                }
            }
            result = &mut call => {
                // Pieces are sent before the call returns: forward any not yet read.
                while let Ok(piece) = pieces.try_recv() {
                    let _ = tx.send(Progress::Text(index, piece));
                }
                let _ = tx.send(Progress::Done(index, result));
                return;
            }
            _ = tx.closed() => return,
        }
    }
}

/// Starts one generation task per request; returns their reports, in arrival order.
pub(crate) fn spawn_all(
    generator: &Arc<dyn TextGenerator>,
    requests: impl IntoIterator<Item = CompletionRequest>,
) -> mpsc::UnboundedReceiver<Progress> {
    let (tx, rx) = mpsc::unbounded_channel::<Progress>();
    for (index, request) in requests.into_iter().enumerate() {
        let generator = generator.clone();
        let tx = tx.clone();
        tokio::spawn(async move { generate(generator, index, request, tx).await });
    }
    rx
}

/// The chunks of one streamed answer: every chunk carries the answer's id, object, creation
/// time and model.
pub(crate) struct Writer {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    queue: VecDeque<Event>,
    finished: bool,
}

impl Writer {
    pub fn new(id: String, object: &'static str, created: u64, model: String) -> Self {
        Writer {
            id,
            object,
            created,
            model,
            queue: VecDeque::new(),
            finished: false,
        }
    }

    /// One chunk. `usage`: absent (`None`), `null` (`Some(None)`) or counted.
    pub fn chunk<C: Serialize, U: Serialize>(
        &mut self,
        choices: Vec<C>,
        usage: Option<Option<U>>,
        extra: Map<String, serde_json::Value>,
    ) {
        let chunk = Chunk {
            id: self.id.clone(),
            object: self.object,
            created: self.created,
            model: self.model.clone(),
            choices,
            system_fingerprint: None,
            usage,
            extra,
        };
        let data = serde_json::to_string(&chunk).expect("a chunk serializes");
        self.queue.push_back(Event::default().data(data));
    }

    /// An event with this data as it is (an error body).
    pub fn raw(&mut self, data: String) {
        self.queue.push_back(Event::default().data(data));
    }

    /// Ends the stream with OpenAI's `[DONE]`.
    pub fn done(&mut self) {
        self.queue.push_back(Event::default().data("[DONE]"));
        self.finished = true;
    }
}

/// What a streamed answer does with each report.
pub(crate) trait Handler: Send + 'static {
    fn handle(&mut self, progress: Progress, out: &mut Writer);
}

struct State<H> {
    rx: mpsc::UnboundedReceiver<Progress>,
    first: Option<Progress>,
    out: Writer,
    handler: H,
}

impl<H: Handler> State<H> {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.out.queue.pop_front() {
                return Some(event);
            }
            if self.out.finished {
                return None;
            }
            let progress = match self.first.take() {
                Some(p) => Some(p),
                None => self.rx.recv().await,
            };
            match progress {
                Some(p) => self.handler.handle(p, &mut self.out),
                None => self.out.finished = true,
            }
        }
    }
}

/// The server-sent-event response: the chunks already on `out`, then what `handler` makes of
/// `first` and every later report, until it calls [`Writer::done`] or the reports end.
pub(crate) fn respond<H: Handler>(
    rx: mpsc::UnboundedReceiver<Progress>,
    first: Option<Progress>,
    out: Writer,
    handler: H,
) -> Response {
    let state = State {
        rx,
        first,
        out,
        handler,
    };
    let events = futures::stream::unfold(state, |mut s| async move {
        let event = s.next_event().await?;
        Some((Ok::<Event, Infallible>(event), s))
    });
    Sse::new(events).into_response()
}
