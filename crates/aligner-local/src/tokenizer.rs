//! Text tokenizers for local models: built from GGUF metadata the way llama.cpp builds them, or
//! loaded from a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`).
//!
//! A GGUF file carries its vocabulary, merges, token types and the *name* of its pre-tokenizer
//! (`tokenizer.ggml.pre`); the regexes behind each name live in llama.cpp. We translate the
//! names we support into an equivalent `tokenizer.json` document and load that with the
//! `tokenizers` crate. The translation is checked against llama.cpp's own token ids by the
//! golden fixture in `tests/fixtures/smollm2_tokens.json` (made by
//! `scripts/fixtures/llamacpp_golden.py`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

/// Token texts that end a generation when the vocabulary has them (besides the declared EOS).
const END_OF_GENERATION_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "</s>",
    "<end_of_turn>",
    "<|end|>",
];

/// The GPT-2 pre-tokenizer regex as llama.cpp writes it.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (llama.cpp's case-insensitive spelling of the original).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values that split every digit on its own, then apply the GPT-2 regex.
const DIGITS_THEN_GPT2: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];
/// `tokenizer.ggml.pre` values that use the GPT-2 regex alone.
const GPT2_ONLY: &[&str] = &["gpt-2", "phi-2", "mpt", "olmo"];
const LLAMA3_NAMES: &[&str] = &["llama3", "llama-v3", "llama-bpe"];
const QWEN2_NAMES: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];

/// A text tokenizer (encode, decode, special tokens, chat template). Cheap to clone: the state
/// is shared behind an `Arc`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Parses special-token strings in the text as those tokens.
    tok: Tokenizer,
    /// The same tokenizer with special tokens read as plain text.
    tok_plain: Tokenizer,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token", &self.inner.eos_token)
            .field("eos_ids", &self.inner.eos_ids)
            .field("add_bos", &self.inner.add_bos)
            .finish()
    }
}

struct Parts {
    tok: Tokenizer,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_id: Option<u32>,
    eos_token: Option<String>,
    extra_eos_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl TextTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata: byte-level BPE (`gpt2`) or
    /// SentencePiece (`llama`, as Gemma's) vocabularies.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .map(|v| v.to_string().cloned())
            .transpose()
            .map_err(|e| anyhow!("GGUF tokenizer.ggml.model: {e}"))?
            .unwrap_or_default();
        if model != "gpt2" && model != "llama" {
            bail!(
                "GGUF tokenizer model {model:?} is not supported: byte-level BPE (\"gpt2\") and \
                 SentencePiece (\"llama\") vocabularies are read from GGUF metadata. Point the \
                 model at a Hugging Face folder with tokenizer.json instead."
            );
        }
        let tokens = gguf_strings(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| anyhow!("GGUF metadata has no tokenizer.ggml.tokens"))?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| anyhow!("GGUF tokenizer.ggml.token_type: {e}"))?
                .iter()
                .map(gguf_int)
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "GGUF tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            );
        }

        let (mut tok, default_add_bos) = if model == "llama" {
            (spm_tokenizer(md, &tokens)?, true)
        } else {
            byte_level_tokenizer(md, &tokens)?
        };
        add_vocab_specials(&mut tok, &tokens, &types)?;

        let id_of = |key: &str| -> Result<Option<u32>> {
            match md.get(key) {
                Some(v) => {
                    let id = gguf_int(v).with_context(|| format!("GGUF {key}"))?;
                    Ok(u32::try_from(id)
                        .ok()
                        .filter(|&i| (i as usize) < tokens.len()))
                }
                None => Ok(None),
            }
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
        let eot_id = id_of("tokenizer.ggml.eot_token_id")?;
        let eom_id = id_of("tokenizer.ggml.eom_token_id")?;
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .to_bool()
                .map_err(|e| anyhow!("GGUF tokenizer.ggml.add_bos_token: {e}"))?,
            None => default_add_bos,
        };
        let chat_template = match md.get("tokenizer.chat_template") {
            Some(v) => Some(
                v.to_string()
                    .map_err(|e| anyhow!("GGUF tokenizer.chat_template: {e}"))?
                    .clone(),
            ),
            None => None,
        };
        Ok(Self::assemble(Parts {
            bos_token: bos_id.map(|i| tokens[i as usize].clone()),
            eos_token: eos_id.map(|i| tokens[i as usize].clone()),
            tok,
            bos_id,
            eos_id,
            extra_eos_ids: eot_id.into_iter().chain(eom_id).collect(),
            add_bos,
            chat_template,
        }))
    }

    /// Loads `tokenizer.json`, `tokenizer_config.json` and (when present)
    /// `generation_config.json` from a Hugging Face model folder.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            bail!(
                "tokenizer.json is missing from the model folder {}",
                dir.display()
            );
        }
        let tok = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("reading {}: {e}", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        if !cfg_path.is_file() {
            bail!(
                "tokenizer_config.json is missing from the model folder {}",
                dir.display()
            );
        }
        let cfg: Json = read_json(&cfg_path)?;

        let token_text = |v: Option<&Json>| -> Option<String> {
            match v? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_text(cfg.get("bos_token"));
        let eos_token = token_text(cfg.get("eos_token"));
        let bos_id = bos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let eos_id = eos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let add_bos = match cfg.get("add_bos_token").and_then(Json::as_bool) {
            Some(b) => b,
            // Without the flag, the tokenizer's post-processor decides (as transformers does).
            None => match bos_id {
                Some(bos) => tok
                    .encode_fast("a", true)
                    .map(|e| e.get_ids().first() == Some(&bos))
                    .unwrap_or(false),
                None => false,
            },
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => {
                let named = |name: &str| {
                    list.iter().find_map(|t| {
                        (t.get("name")?.as_str()? == name)
                            .then(|| t.get("template")?.as_str().map(str::to_string))
                            .flatten()
                    })
                };
                named("default").or_else(|| {
                    list.first()
                        .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                })
            }
            _ => None,
        };
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                chat_template = Some(
                    std::fs::read_to_string(&jinja)
                        .with_context(|| format!("reading {}", jinja.display()))?,
                );
            }
        }
        let mut extra_eos_ids = Vec::new();
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let gen: Json = read_json(&gen_path)?;
            match gen.get("eos_token_id") {
                Some(Json::Number(n)) => extra_eos_ids.extend(n.as_u64().map(|i| i as u32)),
                Some(Json::Array(a)) => {
                    extra_eos_ids.extend(a.iter().filter_map(Json::as_u64).map(|i| i as u32))
                }
                _ => {}
            }
        }
        Ok(Self::assemble(Parts {
            tok,
            bos_id,
            bos_token,
            eos_id,
            eos_token,
            extra_eos_ids,
            add_bos,
            chat_template,
        }))
    }

    fn assemble(p: Parts) -> Self {
        let mut eos_ids: Vec<u32> = p.eos_id.into_iter().chain(p.extra_eos_ids).collect();
        for t in END_OF_GENERATION_TOKENS {
            if let Some(id) = p.tok.token_to_id(t) {
                eos_ids.push(id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));
        let mut tok_plain = p.tok.clone();
        tok_plain.set_encode_special_tokens(true);
        Self {
            inner: Arc::new(Inner {
                tok: p.tok,
                tok_plain,
                bos_id: p.bos_id,
                bos_token: p.bos_token,
                eos_token: p.eos_token,
                eos_ids,
                add_bos: p.add_bos && p.bos_id.is_some(),
                chat_template: p.chat_template,
            }),
        }
    }

    /// Token ids of `text`. With `parse_special`, special-token strings in the text (such as
    /// `<|im_start|>`) become those tokens; without it they are tokenized as plain text. BOS
    /// is prepended when the model asks for it and the text does not already start with it.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.inner.tok
        } else {
            &self.inner.tok_plain
        };
        let enc = tok
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let ids = enc.get_ids();
        match self.inner.bos_id {
            Some(bos) if self.inner.add_bos && ids.first() != Some(&bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// The text of `ids`; special tokens are left out with `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .tok
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// Every id that ends a generation: the declared EOS plus the usual end-of-turn tokens the
    /// vocabulary has.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    /// Whether `encode` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// The model's Jinja chat template, when it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tok.get_vocab_size(true)
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.tok.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tok.id_to_token(id)
    }

    /// The wrapped `tokenizers` tokenizer (special tokens parsed).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner.tok
    }
}

/// Incremental detokenization for streaming: feed ids one at a time, get text as soon as it is
/// complete. Never splits a UTF-8 character; the pieces (plus `finish`) concatenate to
/// `decode(all ids)`.
pub struct StreamDecoder {
    tokenizer: TextTokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window decoded for context (already emitted text).
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    emitted: String,
}

impl StreamDecoder {
    /// A decoder that leaves special tokens out of the text.
    pub fn new(tokenizer: &TextTokenizer) -> Self {
        Self::with_skip_special(tokenizer, true)
    }

    pub fn with_skip_special(tokenizer: &TextTokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
        }
    }

    /// Adds one id; returns the text it completed, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix, full) = self.decode_window()?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.emitted.push_str(&piece);
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// The text not yet returned (an incomplete character at the end comes out as U+FFFD, as
    /// `decode` gives it). Returns `None` when there is nothing left.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let all = self.tokenizer.decode(&self.ids, self.skip_special)?;
        let rest = match all.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            // Cannot happen with the decoders we know; fall back to the unread window.
            None => {
                let (prefix, full) = self.decode_window()?;
                full.get(prefix.len()..).unwrap_or_default().to_string()
            }
        };
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.emitted.push_str(&rest);
        Ok((!rest.is_empty()).then_some(rest))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The window's text before and after the unread ids: `(decode(ids[prefix..read]),
    /// decode(ids[prefix..]))`.
    fn decode_window(&self) -> Result<(String, String)> {
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        Ok((prefix, full))
    }
}

/// A byte-level BPE (`gpt2`) vocabulary's tokenizer, and whether such files add a BOS token by
/// default. Built with the library's own constructors, not through a tokenizer.json document:
/// the document for a 150k-token vocabulary left ~120 MB of freed heap behind.
fn byte_level_tokenizer(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    tokens: &[String],
) -> Result<(Tokenizer, bool)> {
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(v) => v
            .to_string()
            .map_err(|e| anyhow!("GGUF tokenizer.ggml.pre: {e}"))?
            .clone(),
        None => "default".to_string(),
    };
    let (pre_tokenizer, ignore_merges, default_add_bos) = pre_tokenizer_for(&pre)?;
    let merges = gguf_strings(md, "tokenizer.ggml.merges")?
        .ok_or_else(|| anyhow!("GGUF metadata has no tokenizer.ggml.merges"))?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for m in &merges {
        // A merge is "left right"; a token never starts with a space in byte-level BPE.
        let cut = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i)
            .ok_or_else(|| anyhow!("GGUF merge {m:?} has no space"))?;
        merge_pairs.push((m[..cut].to_string(), m[cut + 1..].to_string()));
    }
    drop(merges);
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merge_pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow!("building the tokenizer from GGUF metadata: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(pre_tokenizer)
        .map_err(|e| anyhow!("the pre-tokenizer for `{pre}`: {e}"))?;
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(true, true, true),
    ));
    Ok((tok, default_add_bos))
}

/// A SentencePiece (`llama`) vocabulary's tokenizer, as llama.cpp's: spaces become `▁`, the
/// text is split into characters, and the adjacent pair whose joined piece scores highest is
/// joined until none is in the vocabulary; characters outside it become `<0xNN>` byte tokens.
/// Expressed as BPE merges ranked by the joined piece's score (as Hugging Face converts
/// SentencePiece models), with byte fallback. No space is added in front (Gemma's
/// `add_space_prefix` is false; a file that asks for one is refused).
fn spm_tokenizer(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    tokens: &[String],
) -> Result<Tokenizer> {
    if let Some(v) = md.get("tokenizer.ggml.add_space_prefix") {
        if v.to_bool().unwrap_or(false) {
            bail!("GGUF SentencePiece vocabulary with add_space_prefix = true is not implemented (Gemma's is false)");
        }
    }
    let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
        Some(v) => v
            .to_vec()
            .map_err(|e| anyhow!("GGUF tokenizer.ggml.scores: {e}"))?
            .iter()
            .map(|x| {
                x.to_f32()
                    .map_err(|e| anyhow!("GGUF tokenizer.ggml.scores: {e}"))
            })
            .collect::<Result<_>>()?,
        None => bail!("GGUF SentencePiece vocabulary has no tokenizer.ggml.scores"),
    };
    if scores.len() != tokens.len() {
        bail!(
            "GGUF tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        );
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    // Every split of every piece into two pieces of the vocabulary, ranked by the whole
    // piece's score (highest first), then by the halves' ids.
    let mut ranked: Vec<(f32, u32, u32, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = (&piece[..cut], &piece[cut..]);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores[id], a, b, id, cut));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, _, _, id, cut)| (tokens[id][..cut].to_string(), tokens[id][cut..].to_string()))
        .collect();
    let unk = md
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| gguf_int(v).ok())
        .and_then(|i| tokens.get(i as usize).cloned());
    let mut builder = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow!("building the SentencePiece tokenizer from GGUF metadata: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(
        tokenizers::normalizers::Replace::new(" ", "\u{2581}")
            .map_err(|e| anyhow!("the SentencePiece normalizer: {e}"))?,
    ))
    .map_err(|e| anyhow!("the SentencePiece normalizer: {e}"))?;
    tok.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            tokenizers::normalizers::Replace::new("\u{2581}", " ")
                .map_err(|e| anyhow!("the SentencePiece decoder: {e}"))?,
        ),
        tokenizers::decoders::DecoderWrapper::ByteFallback(
            tokenizers::decoders::byte_fallback::ByteFallback::new(),
        ),
        tokenizers::decoders::DecoderWrapper::Fuse(tokenizers::decoders::fuse::Fuse::new()),
    ])));
    Ok(tok)
}

/// Control (3), user-defined (4) and unknown (2) tokens are matched before pre-tokenization, as
/// llama.cpp does. Control and unknown ones only when special tokens are parsed; user-defined
/// ones always. Each keeps its vocabulary id.
fn add_vocab_specials(tok: &mut Tokenizer, tokens: &[String], types: &[i64]) -> Result<()> {
    let (mut special, mut plain) = (Vec::new(), Vec::new());
    for (t, ty) in tokens.iter().zip(types) {
        if matches!(ty, 2..=4) {
            let added = tokenizers::AddedToken::from(t.clone(), *ty != 4)
                .single_word(false)
                .lstrip(false)
                .rstrip(false)
                .normalized(false);
            if *ty == 4 {
                plain.push(added);
            } else {
                special.push(added);
            }
        }
    }
    tok.add_special_tokens(special)
        .and_then(|_| tok.add_tokens(plain))
        .map_err(|e| anyhow!("the GGUF vocabulary's special tokens: {e}"))?;

    Ok(())
}

/// The `tokenizer.json` pre-tokenizer equivalent to llama.cpp's regexes for `pre`, whether BPE
/// ignores merges for whole-word vocabulary hits, and llama.cpp's default for add_bos.
fn pre_tokenizer_for(pre: &str) -> Result<(Json, bool, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    if DIGITS_THEN_GPT2.contains(&pre) {
        return Ok((
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
            false,
        ));
    }
    if GPT2_ONLY.contains(&pre) {
        return Ok((byte_level(true), false, false));
    }
    if pre == "default" {
        // llama.cpp's fallback for BPE vocabularies: four regexes applied in turn.
        return Ok((
            json!({"type": "Sequence", "pretokenizers": [
                split(r"[\p{P}\$\+<=>\^~\|]+"),
                split(GPT2_REGEX),
                split(r"\p{N}+"),
                split(r"[0-9][0-9][0-9]"),
                byte_level(false),
            ]}),
            false,
            false,
        ));
    }
    if LLAMA3_NAMES.contains(&pre) {
        return Ok((
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
            true,
        ));
    }
    if QWEN2_NAMES.contains(&pre) {
        return Ok((
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
            false,
        ));
    }
    let mut supported: Vec<&str> = vec!["default"];
    supported.extend(DIGITS_THEN_GPT2);
    supported.extend(GPT2_ONLY);
    supported.extend(LLAMA3_NAMES);
    supported.extend(QWEN2_NAMES);
    bail!(
        "GGUF pre-tokenizer tokenizer.ggml.pre = {pre:?} is not supported (supported: {}). \
         Point the model at a Hugging Face folder with tokenizer.json instead.",
        supported.join(", ")
    )
}

fn gguf_strings(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<Vec<String>>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let list = v.to_vec().map_err(|e| anyhow!("GGUF {key}: {e}"))?;
    list.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| anyhow!("GGUF {key}: {e}"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn gguf_int(v: &gguf_file::Value) -> Result<i64> {
    use gguf_file::Value as V;
    Ok(match v {
        V::U8(x) => *x as i64,
        V::I8(x) => *x as i64,
        V::U16(x) => *x as i64,
        V::I16(x) => *x as i64,
        V::U32(x) => *x as i64,
        V::I32(x) => *x as i64,
        V::U64(x) => *x as i64,
        V::I64(x) => *x,
        other => bail!("expected an integer, found {:?}", other.value_type()),
    })
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn text_tokenizer_is_send_sync() {
        assert_send_sync::<TextTokenizer>();
        assert_send_sync::<StreamDecoder>();
    }

    #[test]
    fn unsupported_pre_tokenizer_is_named() {
        let err = pre_tokenizer_for("tekken").unwrap_err().to_string();
        assert!(err.contains("\"tekken\""), "{err}");
        assert!(err.contains("smollm"), "{err}");
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn missing_hf_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_hf_folder(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
