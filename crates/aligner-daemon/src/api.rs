//! The HTTP API. Every route but `GET /health` and the login form needs the token: as
//! `Authorization: Bearer TOKEN` (clients, scripts), or as the HttpOnly session cookie that
//! `POST /login` sets (the dashboard in a browser). The token never travels in a URL.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/runs` | submit a pipeline (YAML body; `?base_dir=/abs/dir` for its relative paths); validated before it is queued: 201 with the run, or 422 with every error |
//! | `GET /v1/runs` | every run the daemon knows, with its queue state and live progress |
//! | `GET /v1/runs/{id}` | one run: rounds, stages, live progress, failures, evaluation metrics, gate decisions |
//! | `POST /v1/runs/{id}/cancel` | stop it for good (in-flight items finish and are kept) |
//! | `POST /v1/runs/{id}/pause`, `/resume` | stop it for now, queue it again |
//! | `GET /v1/runs/{id}/events` | Server-Sent Events: the run's log events from the store, live progress and state changes, until it ends (`?after=ID` or `Last-Event-ID` to continue; `?follow=0` for the log so far) |
//! | `GET /v1/runs/{id}/report` | the run's HTML report |
//! | `POST /v1/sql` | one read-only SQL statement (body: the SQL, or `{"sql": ...}`) |
//! | `GET /` | the dashboard page (without a session: a redirect to `/login`) |
//! | `GET /login`, `POST /login` | the login form; a right token sets the session cookie |
//! | `POST /logout` | clears the session cookie |
//! | `GET /health` | `ok` |

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aligner_spec::Pipeline;
use aligner_store::{JobState, RunStatus};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::{Shared, Stop};

/// The file name submitted pipelines are known by in messages (beside their `base_dir`).
pub const SUBMITTED_FILE: &str = "submitted.yaml";

/// Event streams open at once.
pub const MAX_STREAMS: usize = 32;
/// Rows `/v1/sql` returns at most (`truncated: true` beyond).
const SQL_MAX_ROWS: usize = 10_000;
const SQL_TIMEOUT: Duration = Duration::from_secs(10);

/// An API error: a status and a message that says what to do.
pub struct ApiError(StatusCode, String, Option<Value>);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into(), None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"status": self.0.as_u16(), "message": self.1}});
        if let Some(detail) = self.2 {
            body["error"]["detail"] = detail;
        }
        (self.0, Json(body)).into_response()
    }
}

impl From<aligner_store::Error> for ApiError {
    fn from(e: aligner_store::Error) -> Self {
        match e {
            aligner_store::Error::NoSuchRun(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            aligner_store::Error::ReadOnly(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
            }
            aligner_store::Error::Sql(sqlx_err) => {
                tracing::warn!("store: {sqlx_err}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("store query failed: {sqlx_err}"),
                )
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/", get(dashboard))
        .route("/v1/runs", get(list_runs).post(submit))
        .route("/v1/runs/{id}", get(run_detail))
        .route("/v1/runs/{id}/cancel", post(cancel))
        .route("/v1/runs/{id}/pause", post(pause))
        .route("/v1/runs/{id}/resume", post(resume))
        .route("/v1/runs/{id}/events", get(events))
        .route("/v1/runs/{id}/report", get(report))
        .route("/v1/sql", post(sql))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .merge(api)
        .with_state(shared)
}

/// The session cookie's name.
const SESSION_COOKIE: &str = "aligner_session";

/// The session cookie's value: derived from the token (so a new token ends every session), and
/// not the token itself.
fn session_value(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        format!("aligner-daemon-session\0{token}").as_bytes(),
    ))
}

/// The value of cookie `name` in a request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

fn login_html(message: &str) -> String {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    include_str!("login.html").replace("<!--MESSAGE-->", &escaped)
}

async fn login_page() -> Response {
    no_store(Html(login_html("")).into_response())
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login` (a form): the right token sets the session cookie and goes to the dashboard.
async fn login(
    State(shared): State<Arc<Shared>>,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let token = form.map(|f| f.0.token).unwrap_or_default();
    if !crate::auth::token_matches(token.trim(), &shared.config.token) {
        let page = login_html(
            "wrong token\nhint: use the token in the daemon's token file, or ALIGNER_TOKEN",
        );
        return no_store((StatusCode::UNAUTHORIZED, Html(page)).into_response());
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        session_value(&shared.config.token)
    );
    no_store(
        (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
        )
            .into_response(),
    )
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/login".into()),
        ],
    )
        .into_response()
}

/// Keeps a page out of caches and out of the Referer of the links it leads to.
fn no_store(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        "no-store".parse().expect("static header"),
    );
    h.insert(
        header::REFERRER_POLICY,
        "no-referrer".parse().expect("static header"),
    );
    r
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {}\nhint: the API lives under /v1/ (runs at /v1/runs)",
            uri.path()
        ),
    )
}

/// The token as a bearer header, or the session cookie; never in the URL. A browser without a
/// session asking for the dashboard is sent to the login form.
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if query_param(request.uri(), "token").is_some() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "the token does not go in URLs (they end up in browser history, logs and referrers)\nhint: send `Authorization: Bearer TOKEN`, or log in at /login for the dashboard",
        )
        .into_response();
    }
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let session = cookie(headers, SESSION_COOKIE);
    let unauthorized = |message: &str| {
        let mut r = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("static header"),
        );
        r
    };
    let authorized = match (bearer, session) {
        (Some(t), _) => {
            if !crate::auth::token_matches(t, &shared.config.token) {
                return unauthorized(
                    "wrong token\nhint: use the token in the daemon's token file, or ALIGNER_TOKEN",
                );
            }
            true
        }
        (None, Some(s)) => {
            if !crate::auth::token_matches(s, &session_value(&shared.config.token)) {
                false
            } else if request.method() != Method::GET
                && request.method() != Method::HEAD
                && !same_origin(headers)
            {
                // A cookie rides along on cross-site requests too: changes need our own page.
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "a cross-site request cannot change runs\nhint: use the dashboard itself, or send `Authorization: Bearer TOKEN`",
                )
                .into_response();
            } else {
                true
            }
        }
        (None, None) => false,
    };
    if !authorized {
        if request.method() == Method::GET && request.uri().path() == "/" {
            return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
        }
        return unauthorized(if session.is_some() {
            "the session has ended (the daemon's token changed)\nhint: log in again at /login"
        } else {
            "this API needs a token: send `Authorization: Bearer TOKEN`\nhint: the daemon prints where its token file is when it starts; in a browser, log in at /login"
        });
    }
    no_store(next.run(request).await)
}

/// Whether a request's `Origin` (when it has one) is the host it was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host)
}

/// Reads a request body up to the configured limit: 413 beyond it.
async fn read_body(shared: &Shared, body: Body) -> ApiResult<String> {
    let limit = shared.config.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {limit} bytes\nhint: a pipeline file is a few kilobytes; prompts belong in files it names"),
        )
    })?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "request body is not UTF-8 text"))
}

fn query_param(uri: &axum::http::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    body: Body,
) -> ApiResult<Response> {
    if shared.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down and takes no new runs",
        ));
    }
    let text = read_body(&shared, body).await?;
    if text.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty request body\nhint: POST the pipeline YAML, e.g. `curl --data-binary @pipeline.yaml`"));
    }
    let base_dir = match query_param(&uri, "base_dir") {
        Some(d) => {
            let p = PathBuf::from(&d);
            if !p.is_absolute() || !p.is_dir() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("base_dir `{d}` is not an absolute path to a folder on the daemon's machine")));
            }
            p
        }
        None => shared.config.base_dir.clone(),
    };
    let file = base_dir.join(SUBMITTED_FILE);
    let spec = Pipeline::from_yaml_with_env(&text, &file, &base_dir, crate::env_lookup(&shared.config)).map_err(|errors| {
        let detail: Vec<Value> = errors
            .0
            .iter()
            .map(|e| json!({"line": e.line, "column": e.column, "path": e.yaml_path, "message": e.message, "hint": e.hint}))
            .collect();
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("the pipeline does not validate:\n{errors}"), Some(Value::Array(detail)))
    })?;
    let name = spec.name.clone();
    let engine = aligner_engine::Engine::new(
        shared.store.clone(),
        spec,
        &file,
        shared.factory.clone(),
        Arc::new(aligner_engine::Silent),
    );
    let (spec_json, spec_hash) = engine.snapshot_and_hash();
    let run_id = shared
        .store
        .create_queued_run(&aligner_store::QueuedRun {
            name: &name,
            pipeline_path: &file.display().to_string(),
            spec_json: &spec_json,
            spec_hash: &spec_hash,
            pipeline_yaml: &text,
            base_dir: &base_dir.display().to_string(),
        })
        .await?;
    shared.wake.notify_one();
    let job = shared.store.job(run_id).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/runs/{run_id}"))],
        Json(json!({"run_id": run_id, "name": name, "state": "queued", "job": job})),
    )
        .into_response())
}

fn run_id(raw: &str) -> ApiResult<i64> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{raw}` is not a run id\nhint: run ids are integers; GET /v1/runs lists them"),
        )
    })
}

async fn job_or_404(shared: &Shared, id: i64) -> ApiResult<aligner_store::JobRow> {
    shared.store.job(id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no run {id} in this daemon's queue\nhint: GET /v1/runs lists them"),
        )
    })
}

fn live(shared: &Shared, id: i64) -> Value {
    shared
        .active(id)
        .map(|a| a.progress.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or(Value::Null)
}

async fn list_runs(State(shared): State<Arc<Shared>>) -> ApiResult<Json<Value>> {
    let store = &shared.read_only;
    let jobs = store.jobs().await?;
    let mut runs = Vec::with_capacity(jobs.len());
    for job in jobs {
        let run = store.run(job.run_id).await?;
        let rounds = store.round_summaries(job.run_id).await?;
        runs.push(json!({
            "run_id": job.run_id,
            "name": job.name,
            "state": job.state,
            "requested": job.requested,
            "status": run.status,
            "error": job.error.or(run.error),
            "attempts": job.attempts,
            "crashes": job.crashes,
            "submitted_at": job.submitted_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "progress": live(&shared, job.run_id),
            "rounds": rounds,
        }));
    }
    Ok(Json(
        json!({"runs": runs, "running": shared.active_count(), "max_running": shared.config.max_running}),
    ))
}

async fn run_detail(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = run_id(&id)?;
    let job = job_or_404(&shared, id).await?;
    let store = &shared.read_only;
    let run = store.run(id).await?;
    let failures = store.recent_problems(id, 50).await?;
    Ok(Json(json!({
        "run_id": id,
        "job": job,
        "run": run,
        "progress": live(&shared, id),
        "rounds": store.round_summaries(id).await?,
        "stages": store.stages(id).await?,
        "failures": failures,
        "evaluation": store.eval_metrics(id).await?,
        "gate": store.gate_decisions(id).await?,
        "aligner_eval": store.aligner_eval(id).await?,
        "costs": store.round_costs(id).await?,
    })))
}

async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = run_id(&id)?;
    let job = job_or_404(&shared, id).await?;
    match job.state {
        JobState::Queued | JobState::Paused => {
            if shared
                .store
                .transition_job(
                    id,
                    &[JobState::Queued, JobState::Paused],
                    JobState::Cancelled,
                )
                .await?
            {
                shared
                    .store
                    .set_run_status(
                        id,
                        RunStatus::Cancelled,
                        Some("cancelled through the daemon API"),
                    )
                    .await?;
                return Ok(Json(json!({"run_id": id, "state": "cancelled"})).into_response());
            }
            Err(conflict(id, "changed state meanwhile; try again"))
        }
        JobState::Running => {
            if !shared.store.request_job(id, "cancel").await? {
                return Err(conflict(id, "stopped meanwhile; look again and retry"));
            }
            if let Some(a) = shared.active(id) {
                a.stop(Stop::Cancel);
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"run_id": id, "state": "running", "requested": "cancel"})),
            )
                .into_response())
        }
        s => Err(conflict(id, &format!("is already {s}"))),
    }
}

async fn pause(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = run_id(&id)?;
    let job = job_or_404(&shared, id).await?;
    match job.state {
        JobState::Queued => {
            if shared
                .store
                .transition_job(id, &[JobState::Queued], JobState::Paused)
                .await?
            {
                return Ok(Json(json!({"run_id": id, "state": "paused"})).into_response());
            }
            Err(conflict(id, "changed state meanwhile; try again"))
        }
        JobState::Running => {
            if !shared.store.request_job(id, "pause").await? {
                return Err(conflict(id, "stopped meanwhile; look again and retry"));
            }
            if let Some(a) = shared.active(id) {
                a.stop(Stop::Pause);
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"run_id": id, "state": "running", "requested": "pause"})),
            )
                .into_response())
        }
        s => Err(conflict(
            id,
            &format!("is {s}; only queued or running runs pause"),
        )),
    }
}

async fn resume(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = run_id(&id)?;
    let job = job_or_404(&shared, id).await?;
    if job.state != JobState::Paused
        || !shared
            .store
            .transition_job(id, &[JobState::Paused], JobState::Queued)
            .await?
    {
        return Err(conflict(
            id,
            &format!("is {}; only paused runs resume", job.state),
        ));
    }
    shared.wake.notify_one();
    Ok(Json(json!({"run_id": id, "state": "queued"})))
}

fn conflict(id: i64, what: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, format!("run {id} {what}"))
}

async fn events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = run_id(&id)?;
    job_or_404(&shared, id).await?;
    let Ok(permit) = shared.streams.clone().try_acquire_owned() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("too many open event streams (at most {MAX_STREAMS})\nhint: close some, or poll GET /v1/runs/{id}")));
    };
    let mut after: i64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| query_param(&uri, "after").and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let follow = query_param(&uri, "follow").is_none_or(|v| v != "0" && v != "false");
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let store = shared.read_only.clone();
        let mut live: Option<tokio::sync::broadcast::Receiver<Value>> = None;
        loop {
            if live.is_none() {
                live = shared.active(id).map(|a| a.events.subscribe());
            }
            // Stored events first (the log), then whatever the engine reports live.
            let stored = match store.events(id, after, 500).await {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = tx
                        .send(Event::default().event("error").data(e.to_string()))
                        .await;
                    return;
                }
            };
            for row in &stored {
                after = row.id;
                let data = serde_json::to_string(row).unwrap_or_default();
                if tx
                    .send(
                        Event::default()
                            .event("log")
                            .id(row.id.to_string())
                            .data(data),
                    )
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if stored.len() == 500 {
                continue;
            }
            let job = match store.job(id).await {
                Ok(Some(j)) => j,
                _ => return,
            };
            if !follow || (job.state.is_terminal() && shared.active(id).is_none()) {
                // One last look for log rows the run wrote as it ended.
                if let Ok(rows) = store.events(id, after, 500).await {
                    for row in rows {
                        let data = serde_json::to_string(&row).unwrap_or_default();
                        let _ = tx
                            .send(
                                Event::default()
                                    .event("log")
                                    .id(row.id.to_string())
                                    .data(data),
                            )
                            .await;
                    }
                }
                let data =
                    json!({"run_id": id, "state": job.state, "error": job.error}).to_string();
                let _ = tx.send(Event::default().event("end").data(data)).await;
                return;
            }
            let wait = tokio::time::sleep(Duration::from_millis(500));
            match live.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        msg = rx.recv() => match msg {
                            Ok(v) => {
                                let kind = v["type"].as_str().unwrap_or("progress").to_string();
                                if tx.send(Event::default().event(kind).data(v.to_string())).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => live = None,
                        },
                        _ = wait => {}
                    }
                }
                None => wait.await,
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Examples of corrections on the report page, per round and kind.
const REPORT_EXAMPLES: usize = 20;

async fn report(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = run_id(&id)?;
    shared.store.run(id).await?;
    let html = aligner_report::html_for_run(shared.read_only.clone(), id, REPORT_EXAMPLES)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot render the report: {e:#}"),
            )
        })?;
    Ok(Html(html).into_response())
}

async fn sql(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let text = read_body(&shared, body).await?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let query = if is_json {
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}\nhint: send {{\"sql\": \"SELECT ...\"}} or the SQL as plain text")))?;
        v.get("sql")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "JSON body without a string `sql` field",
                )
            })?
            .to_string()
    } else {
        text
    };
    let result = tokio::time::timeout(SQL_TIMEOUT, shared.read_only.query_read_only_limited(&query, SQL_MAX_ROWS))
        .await
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("the query ran over {} s\nhint: narrow it, or read the store file with `aligner sql` on the daemon's machine", SQL_TIMEOUT.as_secs())))?
        .map_err(|e| match e {
            aligner_store::Error::Sql(err) => {
                ApiError::new(StatusCode::BAD_REQUEST, format!("SQL error: {err}"))
            }
            other => ApiError::from(other),
        })?;
    Ok(Json(serde_json::to_value(result).unwrap_or(Value::Null)))
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}
