//! The llama-family transformer (Llama, SmolLM, Mistral, Qwen2, and Gemma 3's variant of the
//! layer) on the CPU path: weights from GGUF or Hugging Face safetensors, a ragged-batch
//! forward pass over many sequences at once, each with its own KV cache.

use std::path::Path;

use anyhow::{bail, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::gguf::GgufFile;
use crate::quant::{dot_f32, Weight};
use crate::sync_ptr::SyncPtr;

pub use crate::config::{ModelConfig as Config, RopeStyle, SUPPORTED};

/// One layer's weights as loaded.
struct LayerWeights {
    attn_norm: Vec<f32>,
    wq: Weight,
    wk: Weight,
    wv: Weight,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: Weight,
    ffn_norm: Vec<f32>,
    w_gate: Weight,
    w_up: Weight,
    w_down: Weight,
    norms: ExtraNorms,
}

/// Gemma 3's extra norms: on each query and key head, and after the attention and the
/// feed-forward blocks.
#[derive(Default)]
struct ExtraNorms {
    q: Option<Vec<f32>>,
    k: Option<Vec<f32>>,
    post_attn: Option<Vec<f32>>,
    post_ffn: Option<Vec<f32>>,
}

impl ExtraNorms {
    fn all(&self) -> bool {
        self.q.is_some() && self.k.is_some() && self.post_attn.is_some() && self.post_ffn.is_some()
    }
}

/// One layer as it runs: q/k/v, and gate/up, each one product over stacked rows.
pub struct Layer {
    attn_norm: Vec<f32>,
    qkv: Proj,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: Weight,
    ffn_norm: Vec<f32>,
    gate_up: Proj,
    w_down: Weight,
    norms: ExtraNorms,
}

/// Projections of the same input. Stacked into one weight when they share a format: one
/// activation quantization and one fork-join instead of several, and more columns to split
/// across threads. Each output element is the same computation either way.
enum Proj {
    Stacked { w: Weight, rows: Vec<usize> },
    Separate(Vec<Weight>),
}

impl Proj {
    fn new(parts: Vec<Weight>) -> Self {
        let rows = parts.iter().map(Weight::rows).collect();
        match Weight::concat_rows(parts) {
            Ok(w) => Proj::Stacked { w, rows },
            Err(parts) => Proj::Separate(parts),
        }
    }

    fn size_bytes(&self) -> usize {
        match self {
            Proj::Stacked { w, .. } => w.size_bytes(),
            Proj::Separate(ws) => ws.iter().map(Weight::size_bytes).sum(),
        }
    }

    /// `outs[i] = x[m, cols] · part_iᵀ`; `scratch` holds the stacked product.
    fn matmul(&self, x: &[f32], m: usize, outs: &mut [&mut Vec<f32>], scratch: &mut Vec<f32>) {
        match self {
            Proj::Stacked { w, rows } => {
                let total = w.rows();
                scratch.resize(m * total, 0.0);
                w.matmul(x, m, scratch);
                for (r, src) in scratch.chunks_exact(total).enumerate() {
                    let mut off = 0;
                    for (o, &n) in outs.iter_mut().zip(rows) {
                        o[r * n..(r + 1) * n].copy_from_slice(&src[off..off + n]);
                        off += n;
                    }
                }
            }
            Proj::Separate(ws) => {
                for (w, o) in ws.iter().zip(outs.iter_mut()) {
                    w.matmul(x, m, o);
                }
            }
        }
    }
}

pub struct Model {
    pub config: Config,
    embed: Weight,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// `None`: tied to the embedding.
    lm_head: Option<Weight>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Gemma 3's local layers' rotary tables (empty otherwise).
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
}

/// One sequence's keys and values, per layer, position-major, in f16 (as llama.cpp's default
/// cache: half the memory of f32, and the same rounding).
#[derive(Default)]
pub struct KvCache {
    /// Keys per layer, in tiles of [`KEY_TILE`] positions: `[tile][kv head][head dim][lane]`,
    /// so the scores of a tile of keys are sixteen-wide vector operations with no transpose.
    k: Vec<Vec<f16>>,
    /// Values per layer, one row of `kv_heads * head_dim` per position.
    v: Vec<Vec<f16>>,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| 2 * x.capacity()).sum()
    }

    /// Appends `rows` (`[n][kvd]`) of keys and values at positions `len..len + n` of layer
    /// `li` (`len` moves once every layer has them).
    fn push(&mut self, li: usize, keys: &[f32], values: &[f32], kvd: usize) {
        let tile = kvd * KEY_TILE;
        let kl = &mut self.k[li];
        for (t, row) in keys.chunks_exact(kvd).enumerate() {
            let j = self.len + t;
            let (ti, lane) = (j / KEY_TILE, j % KEY_TILE);
            if kl.len() < (ti + 1) * tile {
                kl.resize((ti + 1) * tile, f16::ZERO);
            }
            let base = ti * tile + lane;
            for (e, x) in row.iter().enumerate() {
                kl[base + e * KEY_TILE] = f16::from_f32(*x);
            }
        }
        push_f16(&mut self.v[li], values);
    }
}

/// A slice of one sequence's tokens to run in a step.
pub struct Chunk<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    /// Return logits for the last token of the chunk.
    pub logits: bool,
}

impl Model {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let config = Config::from_gguf(file)?;
        let embed = file.weight("token_embd.weight")?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("blk.{i}.{n}");
            layers.push(LayerWeights {
                attn_norm: file.vector(&p("attn_norm.weight"))?,
                wq: file.weight(&p("attn_q.weight"))?,
                wk: file.weight(&p("attn_k.weight"))?,
                wv: file.weight(&p("attn_v.weight"))?,
                bq: file.optional_vector(&p("attn_q.bias"))?,
                bk: file.optional_vector(&p("attn_k.bias"))?,
                bv: file.optional_vector(&p("attn_v.bias"))?,
                wo: file.weight(&p("attn_output.weight"))?,
                ffn_norm: file.vector(&p("ffn_norm.weight"))?,
                w_gate: file.weight(&p("ffn_gate.weight"))?,
                w_up: file.weight(&p("ffn_up.weight"))?,
                w_down: file.weight(&p("ffn_down.weight"))?,
                norms: ExtraNorms {
                    q: file.optional_vector(&p("attn_q_norm.weight"))?,
                    k: file.optional_vector(&p("attn_k_norm.weight"))?,
                    post_attn: file.optional_vector(&p("post_attention_norm.weight"))?,
                    post_ffn: file.optional_vector(&p("post_ffw_norm.weight"))?,
                },
            });
        }
        let lm_head = if file.has("output.weight") {
            Some(file.weight("output.weight")?)
        } else {
            None
        };
        let out_norm = file.vector("output_norm.weight")?;
        Self::assemble(config, embed, layers, out_norm, lm_head)
    }

    pub fn from_hf_folder(dir: &Path, dtype: &str) -> Result<Self> {
        let config = Config::from_hf_folder(dir)?;
        let tied = config.tie_embeddings;
        let st = crate::safetensors::SafeTensors::open(dir, dtype)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("model.layers.{i}.{n}");
            layers.push(LayerWeights {
                attn_norm: st.vector(&p("input_layernorm.weight"))?,
                wq: st.weight(&p("self_attn.q_proj.weight"))?,
                wk: st.weight(&p("self_attn.k_proj.weight"))?,
                wv: st.weight(&p("self_attn.v_proj.weight"))?,
                bq: st.optional_vector(&p("self_attn.q_proj.bias"))?,
                bk: st.optional_vector(&p("self_attn.k_proj.bias"))?,
                bv: st.optional_vector(&p("self_attn.v_proj.bias"))?,
                wo: st.weight(&p("self_attn.o_proj.weight"))?,
                ffn_norm: st.vector(&p("post_attention_layernorm.weight"))?,
                w_gate: st.weight(&p("mlp.gate_proj.weight"))?,
                w_up: st.weight(&p("mlp.up_proj.weight"))?,
                w_down: st.weight(&p("mlp.down_proj.weight"))?,
                norms: ExtraNorms::default(),
            });
        }
        let embed = st.weight("model.embed_tokens.weight")?;
        let lm_head = if tied || !st.has("lm_head.weight") {
            None
        } else {
            Some(st.weight("lm_head.weight")?)
        };
        let out_norm = st.vector("model.norm.weight")?;
        Self::assemble(config, embed, layers, out_norm, lm_head)
    }

    fn assemble(
        mut config: Config,
        embed: Weight,
        layers: Vec<LayerWeights>,
        out_norm: Vec<f32>,
        lm_head: Option<Weight>,
    ) -> Result<Self> {
        config.vocab = lm_head.as_ref().map(Weight::rows).unwrap_or(embed.rows());
        let c = &config;
        if embed.cols() != c.hidden
            || !c.heads.is_multiple_of(c.kv_heads)
            || !c.head_dim.is_multiple_of(2)
        {
            bail!("inconsistent model shapes: {c:?}");
        }
        for (i, l) in layers.iter().enumerate() {
            if c.gemma3.is_some() && !l.norms.all() {
                bail!("layer {i}: a gemma3 layer needs attn_q_norm, attn_k_norm, post_attention_norm and post_ffw_norm weights");
            }
            if c.gemma3.is_none() && (l.norms.post_attn.is_some() || l.norms.q.is_some()) {
                bail!(
                    "layer {i}: query/key or post-block norms in a `{}` model are not implemented",
                    c.architecture
                );
            }
            let want = [
                (&l.wq, c.heads * c.head_dim, c.hidden, "q"),
                (&l.wk, c.kv_heads * c.head_dim, c.hidden, "k"),
                (&l.wv, c.kv_heads * c.head_dim, c.hidden, "v"),
                (&l.wo, c.hidden, c.heads * c.head_dim, "o"),
                (&l.w_gate, c.intermediate, c.hidden, "gate"),
                (&l.w_up, c.intermediate, c.hidden, "up"),
                (&l.w_down, c.hidden, c.intermediate, "down"),
            ];
            for (w, r, k, name) in want {
                if w.rows() != r || w.cols() != k {
                    bail!(
                        "layer {i} {name} weight is [{}, {}], expected [{r}, {k}]",
                        w.rows(),
                        w.cols()
                    );
                }
            }
        }
        let layers = layers
            .into_iter()
            .map(|l| Layer {
                attn_norm: l.attn_norm,
                qkv: Proj::new(vec![l.wq, l.wk, l.wv]),
                bq: l.bq,
                bk: l.bk,
                bv: l.bv,
                wo: l.wo,
                ffn_norm: l.ffn_norm,
                gate_up: Proj::new(vec![l.w_gate, l.w_up]),
                w_down: l.w_down,
                norms: l.norms,
            })
            .collect();
        // Rotary tables up to the context length, computed in f64 then rounded once.
        let half = c.head_dim / 2;
        let ctx = c.context.min(1 << 17);
        let tables = |inv: Vec<f64>| {
            let mut cos = vec![0f32; ctx * half];
            let mut sin = vec![0f32; ctx * half];
            for p in 0..ctx {
                for (i, freq) in inv.iter().enumerate() {
                    let a = p as f64 * freq;
                    cos[p * half + i] = a.cos() as f32;
                    sin[p * half + i] = a.sin() as f32;
                }
            }
            (cos, sin)
        };
        let (cos, sin) = tables(c.inv_freqs());
        let (cos_local, sin_local) = match &c.gemma3 {
            Some(g) => tables(c.inv_freqs_for(g.rope_theta_local)),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Model {
            config,
            embed,
            layers,
            out_norm,
            lm_head,
            cos,
            sin,
            cos_local,
            sin_local,
        })
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.size_bytes() + self.lm_head.as_ref().map_or(0, Weight::size_bytes);
        for l in &self.layers {
            n += l.qkv.size_bytes()
                + l.gate_up.size_bytes()
                + l.wo.size_bytes()
                + l.w_down.size_bytes();
        }
        n
    }

    /// The longest sequence the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.len() / (self.config.head_dim / 2)
    }

    /// Runs every chunk's tokens through the model, appending to each chunk's cache, and
    /// returns the logits of the last token of each chunk that asked for them (in order).
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (h, hd) = (c.hidden, c.head_dim);
        let qd = c.heads * hd;
        let kvd = c.kv_heads * hd;
        let rows: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        if rows == 0 {
            return Vec::new();
        }
        // Row -> (chunk, position).
        let mut pos = Vec::with_capacity(rows);
        let mut starts = Vec::with_capacity(chunks.len());
        for (i, ch) in chunks.iter().enumerate() {
            starts.push(pos.len());
            for t in 0..ch.tokens.len() {
                pos.push((i, ch.cache.len + t));
            }
        }
        let mut x = vec![0f32; rows * h];
        let mut r = 0;
        for ch in chunks.iter() {
            for &t in ch.tokens {
                self.embed.row_f32(t as usize, &mut x[r * h..(r + 1) * h]);
                r += 1;
            }
        }
        if c.gemma3.is_some() {
            let scale = (h as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let eps = c.rms_eps as f32;
        let mut normed = Vec::new();
        let mut xn = vec![0f32; rows * h];
        let mut q = vec![0f32; rows * qd];
        let mut k = vec![0f32; rows * kvd];
        let mut v = vec![0f32; rows * kvd];
        let mut att = vec![0f32; rows * qd];
        let mut proj = vec![0f32; rows * h];
        let mut gate = vec![0f32; rows * c.intermediate];
        let mut up = vec![0f32; rows * c.intermediate];
        let mut stacked = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, c.rms_eps as f32, &mut xn);
            l.qkv
                .matmul(&xn, rows, &mut [&mut q, &mut k, &mut v], &mut stacked);
            add_bias(&mut q, l.bq.as_deref());
            add_bias(&mut k, l.bk.as_deref());
            add_bias(&mut v, l.bv.as_deref());
            norm_in_place(&mut q, l.norms.q.as_deref(), eps, &mut normed);
            norm_in_place(&mut k, l.norms.k.as_deref(), eps, &mut normed);
            let local = c.gemma3.as_ref().filter(|g| g.is_local(li));
            for (row, &(_, p)) in pos.iter().enumerate() {
                self.rope(&mut q[row * qd..(row + 1) * qd], p, local.is_some());
                self.rope(&mut k[row * kvd..(row + 1) * kvd], p, local.is_some());
            }
            for (i, ch) in chunks.iter_mut().enumerate() {
                let s = starts[i];
                let n = ch.tokens.len();
                ch.cache.push(
                    li,
                    &k[s * kvd..(s + n) * kvd],
                    &v[s * kvd..(s + n) * kvd],
                    kvd,
                );
            }
            let window = local.map(|g| g.sliding_window);
            self.attention(chunks, &starts, li, &q, &mut att, window);
            l.wo.matmul(&att, rows, &mut proj);
            norm_in_place(&mut proj, l.norms.post_attn.as_deref(), eps, &mut normed);
            add_into(&mut x, &proj);
            rms_norm(&x, &l.ffn_norm, c.rms_eps as f32, &mut xn);
            l.gate_up
                .matmul(&xn, rows, &mut [&mut gate, &mut up], &mut stacked);
            if c.gemma3.is_some() {
                for (g, u) in gate.iter_mut().zip(&up) {
                    *g = gelu_tanh(*g) * u;
                }
            } else {
                for (g, u) in gate.iter_mut().zip(&up) {
                    *g = *g / (1.0 + exp_fast(-*g)) * u;
                }
            }
            l.w_down.matmul(&gate, rows, &mut proj);
            norm_in_place(&mut proj, l.norms.post_ffn.as_deref(), eps, &mut normed);
            add_into(&mut x, &proj);
        }
        for ch in chunks.iter_mut() {
            ch.cache.len += ch.tokens.len();
        }
        // Logits for the last row of each chunk that wants them.
        let wanted: Vec<usize> = chunks
            .iter()
            .enumerate()
            .filter(|(_, ch)| ch.logits && !ch.tokens.is_empty())
            .map(|(i, ch)| starts[i] + ch.tokens.len() - 1)
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let mut last = vec![0f32; wanted.len() * h];
        for (j, &row) in wanted.iter().enumerate() {
            last[j * h..(j + 1) * h].copy_from_slice(&x[row * h..(row + 1) * h]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.out_norm, c.rms_eps as f32, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = head.rows();
        let mut logits = vec![0f32; wanted.len() * vocab];
        head.matmul(&normed, wanted.len(), &mut logits);
        logits.chunks_exact(vocab).map(|l| l.to_vec()).collect()
    }

    fn rope(&self, x: &mut [f32], p: usize, local: bool) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        let (cos, sin) = if local {
            (&self.cos_local, &self.sin_local)
        } else {
            (&self.cos, &self.sin)
        };
        let cos = &cos[p * half..(p + 1) * half];
        let sin = &sin[p * half..(p + 1) * half];
        for head in x.chunks_exact_mut(hd) {
            match self.config.rope {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * cos[i] - b * sin[i];
                        head[2 * i + 1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::Halves => {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * cos[i] - b * sin[i];
                        head[i + half] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }

    /// Causal attention of every chunk's new rows over its cache (already holding them); with
    /// `window`, each row sees only the last `window` positions (itself included).
    ///
    /// Keys and values are stored in f16 (as llama.cpp's default cache); queries, scores,
    /// probabilities and sums stay in f32.
    // `unsafe` here only: tasks write their query heads' columns of the output, strided
    // slices of one buffer that `chunks_mut` cannot hand out (see `sync_ptr`).
    #[allow(unsafe_code)]
    fn attention(
        &self,
        chunks: &[Chunk<'_>],
        starts: &[usize],
        li: usize,
        q: &[f32],
        out: &mut [f32],
        window: Option<usize>,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let qd = c.heads * hd;
        let kvd = c.kv_heads * hd;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Tasks of (chunk, kv head, query heads): with many chunks, one per kv head, which
        // converts that head's keys and values once for the query heads that share them; with
        // few (a long prompt), one per query head, so both cores stay busy. Each task writes
        // only its query heads' columns of its chunk's rows.
        let per_query_head = chunks.len() < 4;
        let tasks: Vec<(usize, usize, std::ops::Range<usize>)> = (0..chunks.len())
            .flat_map(|i| {
                (0..c.kv_heads).flat_map(move |kvh| {
                    let heads = kvh * group..(kvh + 1) * group;
                    let v: Vec<_> = if per_query_head {
                        heads.map(|h| (i, kvh, h..h + 1)).collect()
                    } else {
                        vec![(i, kvh, heads)]
                    };
                    v
                })
            })
            .collect();
        let ptr = SyncPtr::new(out);
        let run = |(i, kvh, heads): &(usize, usize, std::ops::Range<usize>)| {
            let (i, kvh) = (*i, *kvh);
            let p = ptr;
            let ch = &chunks[i];
            let n = ch.tokens.len();
            let total = ch.cache.len + n;
            let stride = total.next_multiple_of(KEY_TILE);
            // This kv head's key tiles start at kvh * hd * KEY_TILE in every tile.
            let keys = &ch.cache.k[li][kvh * hd * KEY_TILE..];
            SCRATCH.with_borrow_mut(|sc| {
                sc.vals.resize(total * hd, 0.0);
                sc.qt.resize(QUERY_TILE * hd, 0.0);
                sc.scores.resize(QUERY_TILE * stride, 0.0);
                sc.acc.resize(hd, 0.0);
                let Scratch {
                    vals,
                    qt,
                    scores,
                    acc,
                } = sc;
                for j in 0..total {
                    let src = j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd;
                    ch.cache.v[li][src].convert_to_f32_slice(&mut vals[j * hd..(j + 1) * hd]);
                }
                // Every (query head, position) of this task, four at a time: a query's
                // scores depend only on its own row and the keys, never on the others in
                // its tile.
                let queries: Vec<(usize, usize)> = heads
                    .clone()
                    .flat_map(|hh| (0..n).map(move |t| (hh, t)))
                    .collect();
                for tile in queries.chunks(QUERY_TILE) {
                    qt.iter_mut().for_each(|x| *x = 0.0);
                    let mut upto = [0usize; QUERY_TILE];
                    for (qi, &(hh, t)) in tile.iter().enumerate() {
                        let row = starts[i] + t;
                        upto[qi] = ch.cache.len + t + 1;
                        for (d, x) in qt[qi * hd..(qi + 1) * hd]
                            .iter_mut()
                            .zip(&q[row * qd + hh * hd..row * qd + (hh + 1) * hd])
                        {
                            *d = f16::from_f32(*x).to_f32();
                        }
                    }
                    let longest = upto.iter().copied().max().unwrap_or(0);
                    score_tile(qt, keys, kvd * KEY_TILE, hd, longest, scale, scores, stride);
                    for (qi, &(hh, t)) in tile.iter().enumerate() {
                        let row = starts[i] + t;
                        let lo = window.map_or(0, |w| upto[qi].saturating_sub(w));
                        let s = &mut scores[qi * stride + lo..qi * stride + upto[qi]];
                        let inv = softmax_unnormalized(s);
                        acc.iter_mut().for_each(|a| *a = 0.0);
                        for (j, s) in (lo..).zip(s.iter()) {
                            let w = s * inv;
                            for (a, x) in acc.iter_mut().zip(&vals[j * hd..(j + 1) * hd]) {
                                *a = w.mul_add(*x, *a);
                            }
                        }
                        for (d, a) in acc.iter().enumerate() {
                            // SAFETY: row < rows and hh * hd + d < qd, so the index is
                            // inside `out` (rows * qd); only this task writes query head hh
                            // of this chunk's rows (the tasks split (chunk, head) pairs).
                            unsafe { p.write(row * qd + hh * hd + d, *a) };
                        }
                    }
                }
            });
        };
        let work: usize = chunks
            .iter()
            .map(|ch| ch.tokens.len() * (ch.cache.len + 1))
            .sum();
        if work * c.heads < 16_384 {
            tasks.iter().for_each(run);
        } else {
            tasks.par_iter().for_each(run);
        }
    }
}

/// Keys per score tile (two 8-lane vectors).
const KEY_TILE: usize = 16;
/// Queries per score tile.
const QUERY_TILE: usize = 4;

/// Per-thread buffers of the attention tasks, reused from step to step.
#[derive(Default)]
struct Scratch {
    vals: Vec<f32>,
    qt: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `scores[qi * stride + j] = scale * (q_qi · k_j)` for the four queries in `qt` ([4][hd]) and
/// keys `0..keys` (rounded up to whole tiles). `kt` holds one kv head's key tiles, `[hd][16]`
/// f16 values each, `tile_stride` apart. Each score is summed over `d` in order with fused
/// multiply-adds, whatever the other queries in the tile.
#[allow(clippy::too_many_arguments)]
fn score_tile(
    qt: &[f32],
    kt: &[f16],
    tile_stride: usize,
    hd: usize,
    keys: usize,
    scale: f32,
    scores: &mut [f32],
    stride: usize,
) {
    let mut kr = [0f32; KEY_TILE];
    for (ti, j0) in (0..keys).step_by(KEY_TILE).enumerate() {
        let tile = &kt[ti * tile_stride..ti * tile_stride + hd * KEY_TILE];
        let mut a = [[0f32; KEY_TILE]; QUERY_TILE];
        for d in 0..hd {
            tile[d * KEY_TILE..(d + 1) * KEY_TILE].convert_to_f32_slice(&mut kr);
            for (qi, aq) in a.iter_mut().enumerate() {
                let qd = qt[qi * hd + d];
                for l in 0..KEY_TILE {
                    aq[l] = qd.mul_add(kr[l], aq[l]);
                }
            }
        }
        for (qi, aq) in a.iter().enumerate() {
            for (o, v) in scores[qi * stride + j0..qi * stride + j0 + KEY_TILE]
                .iter_mut()
                .zip(aq)
            {
                *o = v * scale;
            }
        }
    }
}

/// Replaces the scores with `exp(s - max)` and returns `1 / sum` of those.
fn softmax_unnormalized(s: &mut [f32]) -> f32 {
    let mut m8 = [f32::NEG_INFINITY; 8];
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m8[i] = m8[i].max(c[i]);
        }
    }
    let max = rest
        .iter()
        .chain(&m8)
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut s8 = [0f32; 8];
    let mut chunks = s.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = exp_fast(c[i] - max);
            s8[i] += c[i];
        }
    }
    let mut sum: f32 = s8.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_fast(*v - max);
        sum += *v;
    }
    1.0 / sum
}

/// `e^x` to within a few ulp (2^n times a degree-6 polynomial on [-ln2/2, ln2/2]),
/// branch-free so loops over it vectorize. Inputs are clamped to [-87, 88]: below, ~1e-38;
/// above, ~1.6e38.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = (1.0 / 720.0f32)
        .mul_add(r, 1.0 / 120.0)
        .mul_add(r, 1.0 / 24.0)
        .mul_add(r, 1.0 / 6.0)
        .mul_add(r, 0.5)
        .mul_add(r, 1.0)
        .mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

fn push_f16(dst: &mut Vec<f16>, src: &[f32]) {
    let start = dst.len();
    dst.resize(start + src.len(), f16::ZERO);
    dst[start..].convert_from_f32_slice(src);
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = dot_f32(xr, xr) / h as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, a), b) in or.iter_mut().zip(xr).zip(w) {
            *o = a * scale * b;
        }
    }
}

/// `x = rms_norm(x, w)` over each `w.len()` values, when there is a `w`.
fn norm_in_place(x: &mut [f32], w: Option<&[f32]>, eps: f32, scratch: &mut Vec<f32>) {
    if let Some(w) = w {
        scratch.resize(x.len(), 0.0);
        rms_norm(x, w, eps, scratch);
        x.copy_from_slice(scratch);
    }
}

/// GELU with the tanh approximation (Gemma's `gelu_pytorch_tanh`), through the identity
/// `0.5 x (1 + tanh(u)) = x / (1 + e^(-2u))` and the vectorizing [`exp_fast`].
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    x / (1.0 + exp_fast(-2.0 * u))
}

fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len()) {
            add_into(row, b);
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut x = 88f32;
        while x > -88.0 {
            let (got, want) = (exp_fast(x), x.exp());
            if want > 1e-37 {
                assert!(
                    (got - want).abs() <= 4e-7 * want,
                    "exp({x}) = {got}, libm {want}"
                );
            }
            x -= 0.001_37;
        }
        assert!(exp_fast(-1e30) >= 0.0 && exp_fast(-1e30) < 1e-37);
        assert!(exp_fast(1e30).is_finite() && exp_fast(1e30) > 1e38);
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        for i in -400..400 {
            let x = i as f32 / 40.0;
            let want = 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044_715 * x * x)).tanh());
            let got = gelu_tanh(x);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn softmax_weights_sum_to_one() {
        let mut s = vec![
            0.5f32, -3.0, 2.0, 7.5, 7.5, -100.0, 0.0, 1.0, 3.25, -0.5, 6.0,
        ];
        let inv = softmax_unnormalized(&mut s);
        let total: f32 = s.iter().map(|v| v * inv).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((s[3] - 1.0).abs() < 1e-7 && (s[4] - 1.0).abs() < 1e-7);
    }
}
