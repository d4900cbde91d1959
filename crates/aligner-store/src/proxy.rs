//! The correction proxy's records (`aligner serve --upstream ... --record STORE`): one row per
//! corrected choice, question-answer-correction data for a later Aligner. Not tied to a run.

use crate::batch::{BatchInsert, INSERT_CHUNK};
use crate::{Result, Store};
use serde::Serialize;

/// One choice the proxy answered. Times are Unix milliseconds; the store keeps them as
/// ISO-8601 text like its other tables.
#[derive(Debug, Clone, Default)]
pub struct NewProxyRecord {
    pub request_id: String,
    pub choice: i64,
    pub question: String,
    /// The request's messages as JSON.
    pub messages: String,
    pub answer: String,
    /// `None` when the Aligner failed and the answer was passed through.
    pub correction: Option<String>,
    pub aligner_error: Option<String>,
    pub upstream_url: String,
    pub upstream_model: String,
    pub aligner_model: String,
    pub template_id: String,
    pub template_hash: String,
    pub answer_finish_reason: Option<String>,
    pub correction_finish_reason: Option<String>,
    pub upstream_prompt_tokens: Option<u32>,
    pub upstream_completion_tokens: Option<u32>,
    pub aligner_prompt_tokens: Option<u32>,
    pub aligner_completion_tokens: Option<u32>,
    pub upstream_ms: Option<f64>,
    pub aligner_ms: Option<f64>,
    /// The correction's cost in USD, when the Aligner's price is known.
    pub aligner_cost_usd: Option<f64>,
    pub stream: bool,
    /// Sentence-by-sentence correction: the steps as JSON.
    pub sentences: Option<String>,
    /// Milliseconds from the request to the first corrected text sent.
    pub first_correction_ms: Option<f64>,
    /// The upstream broke off mid-answer: `answer` is what arrived.
    pub upstream_error: Option<String>,
    pub requested_at_ms: i64,
    pub answered_at_ms: i64,
    pub corrected_at_ms: Option<i64>,
}

impl NewProxyRecord {
    fn status(&self) -> &'static str {
        if self.correction.is_some() {
            "corrected"
        } else {
            "passthrough"
        }
    }
}

/// A stored record, as `proxy_records` holds it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ProxyRecordRow {
    pub id: i64,
    pub request_id: String,
    pub choice: i64,
    pub question: String,
    pub answer: String,
    pub correction: Option<String>,
    pub status: String,
    pub upstream_model: String,
    pub aligner_model: String,
    pub template_id: String,
    pub requested_at: String,
    pub answered_at: String,
    pub corrected_at: Option<String>,
}

/// Unix milliseconds as the store's timestamp text.
const ISO_MS: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', ";

impl Store {
    /// Inserts the records in one transaction; a record already there (same request id and
    /// choice) is left as it is.
    pub async fn insert_proxy_records(&self, items: &[NewProxyRecord]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO proxy_records (request_id, choice, question, messages, answer, correction,
             status, aligner_error, upstream_url, upstream_model, aligner_model, template_id,
             template_hash, answer_finish_reason, correction_finish_reason, upstream_prompt_tokens,
             upstream_completion_tokens, aligner_prompt_tokens, aligner_completion_tokens,
             upstream_ms, aligner_ms, stream, aligner_cost_usd, sentences, first_correction_ms,
             upstream_error, requested_at, answered_at, corrected_at) ",
        )
        .tail(" ON CONFLICT (request_id, choice) DO NOTHING")
        .chunk(INSERT_CHUNK / 2);
        self.insert_batch(INSERT, items, |mut b, r| {
            b.push_bind(&r.request_id)
                .push_bind(r.choice)
                .push_bind(&r.question)
                .push_bind(&r.messages)
                .push_bind(&r.answer)
                .push_bind(&r.correction)
                .push_bind(r.status())
                .push_bind(&r.aligner_error)
                .push_bind(&r.upstream_url)
                .push_bind(&r.upstream_model)
                .push_bind(&r.aligner_model)
                .push_bind(&r.template_id)
                .push_bind(&r.template_hash)
                .push_bind(&r.answer_finish_reason)
                .push_bind(&r.correction_finish_reason)
                .push_bind(r.upstream_prompt_tokens)
                .push_bind(r.upstream_completion_tokens)
                .push_bind(r.aligner_prompt_tokens)
                .push_bind(r.aligner_completion_tokens)
                .push_bind(r.upstream_ms)
                .push_bind(r.aligner_ms)
                .push_bind(r.stream)
                .push_bind(r.aligner_cost_usd)
                .push_bind(&r.sentences)
                .push_bind(r.first_correction_ms)
                .push_bind(&r.upstream_error);
            for ms in [
                Some(r.requested_at_ms),
                Some(r.answered_at_ms),
                r.corrected_at_ms,
            ] {
                b.push_unseparated(", ")
                    .push_unseparated(ISO_MS)
                    .push_bind_unseparated(ms.map(|ms| ms as f64 / 1000.0))
                    .push_unseparated(", 'unixepoch')");
            }
        })
        .await
    }

    /// The records, oldest first.
    pub async fn proxy_records(&self) -> Result<Vec<ProxyRecordRow>> {
        Ok(sqlx::query_as::<_, ProxyRecordRow>(
            "SELECT id, request_id, choice, question, answer, correction, status, upstream_model,
             aligner_model, template_id, requested_at, answered_at, corrected_at
             FROM proxy_records ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(request: &str, correction: Option<&str>) -> NewProxyRecord {
        NewProxyRecord {
            request_id: request.into(),
            question: "What is 2+2?".into(),
            messages: r#"[{"role":"user","content":"What is 2+2?"}]"#.into(),
            answer: "5".into(),
            correction: correction.map(str::to_string),
            aligner_error: correction.is_none().then(|| "the Aligner failed".into()),
            upstream_url: "http://127.0.0.1:1/v1".into(),
            upstream_model: "up".into(),
            aligner_model: "al".into(),
            template_id: "aligner-v1".into(),
            template_hash: "00".into(),
            requested_at_ms: 1_700_000_000_123,
            answered_at_ms: 1_700_000_000_456,
            corrected_at_ms: correction.map(|_| 1_700_000_000_789),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn records_are_stored_once_with_iso_times_and_feed_the_qac_view() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let items = vec![
            record("a", Some("4")),
            record("b", None),
            record("a", Some("again")),
        ];
        store.insert_proxy_records(&items).await.unwrap();
        store.insert_proxy_records(&items[..1]).await.unwrap();
        let rows = store.proxy_records().await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].status, "corrected");
        assert_eq!(rows[0].correction.as_deref(), Some("4"));
        assert_eq!(rows[0].requested_at, "2023-11-14T22:13:20.123Z");
        assert_eq!(rows[0].answered_at, "2023-11-14T22:13:20.456Z");
        assert_eq!(
            rows[0].corrected_at.as_deref(),
            Some("2023-11-14T22:13:20.789Z")
        );
        assert_eq!(rows[1].status, "passthrough");
        assert_eq!(rows[1].corrected_at, None);
        let qac = store
            .query_read_only("SELECT question, answer, correction FROM proxy_qac")
            .await
            .unwrap();
        assert_eq!(qac.rows.len(), 1);
        assert_eq!(qac.rows[0][2], serde_json::json!("4"));
    }
}
