//! The HTTP side of `rounds.train.serve`: whether a server answers for a checkpoint (an
//! OpenAI-compatible `/models` list, or SGLang's `/get_model_info`), and asking vLLM
//! (`/v1/load_lora_adapter`) or SGLang (`/update_weights_from_disk`) to load one.

use std::time::Duration;

use aligner_engine::serving::CheckpointServer;
use aligner_spec::ServeHow;
use serde_json::{json, Value};

pub struct HttpServing {
    http: reqwest::Client,
}

impl HttpServing {
    pub fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http })
    }

    async fn get(&self, url: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!(
                "GET {url}: HTTP {}: {}",
                status.as_u16(),
                text.trim()
            ));
        }
        serde_json::from_str(&text).map_err(|e| format!("GET {url}: not JSON ({e})"))
    }

    async fn post(&self, url: &str, body: Value) -> Result<Value, String> {
        let r = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {}", crate::ray::describe(&e)))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| crate::ray::describe(&e))?;
        if !status.is_success() {
            return Err(format!(
                "POST {url}: HTTP {}: {}",
                status.as_u16(),
                text.trim()
            ));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// The server's root from an OpenAI base URL (`http://host:8000/v1` -> `http://host:8000`).
fn root(base_url: &str) -> &str {
    let u = base_url.trim_end_matches('/');
    u.strip_suffix("/v1").unwrap_or(u)
}

#[async_trait::async_trait]
impl CheckpointServer for HttpServing {
    async fn is_served(
        &self,
        how: &ServeHow,
        base_url: &str,
        name: &str,
        path: &str,
    ) -> Result<bool, String> {
        match how {
            ServeHow::SglangReload { .. } => {
                let info = self
                    .get(&format!("{}/get_model_info", root(base_url)))
                    .await?;
                Ok(info["model_path"].as_str() == Some(path))
            }
            ServeHow::Command { .. } | ServeHow::VllmLora { .. } => {
                let models = self
                    .get(&format!("{}/models", base_url.trim_end_matches('/')))
                    .await?;
                Ok(models["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|m| m["id"].as_str() == Some(name))))
            }
        }
    }

    async fn load(
        &self,
        how: &ServeHow,
        base_url: &str,
        name: &str,
        path: &str,
    ) -> Result<(), String> {
        match how {
            ServeHow::VllmLora { .. } => {
                let url = format!("{}/v1/load_lora_adapter", root(base_url));
                self.post(&url, json!({"lora_name": name, "lora_path": path}))
                    .await?;
                Ok(())
            }
            ServeHow::SglangReload { .. } => {
                let url = format!("{}/update_weights_from_disk", root(base_url));
                let answer = self.post(&url, json!({"model_path": path})).await?;
                match answer["success"].as_bool() {
                    Some(false) => Err(answer["message"].as_str().unwrap_or("refused").to_string()),
                    _ => Ok(()),
                }
            }
            ServeHow::Command { .. } => Err("a `command` server is started, not loaded".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_the_base_url_without_its_api_version() {
        assert_eq!(root("http://h:8000/v1"), "http://h:8000");
        assert_eq!(root("http://h:8000/v1/"), "http://h:8000");
        assert_eq!(root("http://h:30000"), "http://h:30000");
    }
}
