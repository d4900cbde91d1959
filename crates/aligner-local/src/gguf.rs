//! GGUF files: metadata through candle's reader, tensors into [`Weight`]s.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;

use crate::quant::Weight;

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: Mutex<BufReader<File>>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            anyhow!(
                "cannot open model file {}: {e}\nhint: check `path:`; `aligner models fetch` installs the default models into ./models",
                path.display()
            )
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| anyhow!("{}: metadata key `{key}` is missing", self.path.display()))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        Ok(self.meta(key)?.to_string()?.clone())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) => *x as u64,
            Value::I64(x) => *x as u64,
            other => bail!(
                "{}: `{key}` is not an integer: {other:?}",
                self.path.display()
            ),
        };
        Ok(n as usize)
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.meta(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => bail!("{}: `{key}` is not a float: {other:?}", self.path.display()),
        }
    }

    pub fn has(&self, tensor: &str) -> bool {
        self.content.tensor_infos.contains_key(tensor)
    }

    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content.tensor_infos.get(name).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{name}` is missing (is this a complete llama-family GGUF?)",
                self.path.display()
            )
        })
    }

    /// A tensor's dimensions, from the header (no data is read).
    pub fn dims(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.shape.dims().to_vec())
    }

    pub fn raw(&self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let info = self.info(name)?;
        let dims = info.shape.dims().to_vec();
        let elems: usize = dims.iter().product();
        let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let mut buf = vec![0u8; bytes];
        let mut r = self.reader.lock().expect("gguf reader lock");
        r.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))?;
        r.read_exact(&mut buf)
            .with_context(|| format!("{}: reading tensor `{name}`", self.path.display()))?;
        Ok((info.ggml_dtype, dims, buf))
    }

    /// A 2-D weight: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 stay quantized,
    /// converted exactly into the kernels' formats (see `blocks`); F32/F16/BF16 become f32;
    /// other formats (and everything, with `ALIGNER_DEQUANTIZE=1`) are dequantized to f32 by
    /// candle.
    pub fn weight(&self, name: &str) -> Result<Weight> {
        let info = self.info(name)?;
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        let [rows, cols] = dims[..] else {
            bail!(
                "{}: `{name}` has shape {dims:?}, expected 2-D",
                self.path.display()
            );
        };
        let dequantize = std::env::var_os("ALIGNER_DEQUANTIZE").is_some();
        if !dequantize && crate::blocks::family(dtype).is_some() {
            // Read a few rows at a time: the tensor is never in memory twice.
            let start = self.content.tensor_data_offset + info.offset;
            let rb = crate::blocks::row_bytes(dtype, cols)
                .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
            let mut read = |first: usize, buf: &mut [u8]| -> Result<()> {
                let mut r = self.reader.lock().expect("gguf reader lock");
                r.seek(SeekFrom::Start(start + (first * rb) as u64))?;
                r.read_exact(buf)
                    .with_context(|| format!("{}: reading tensor `{name}`", self.path.display()))
            };
            let w = Weight::from_ggml(dtype, rows, cols, &mut read)
                .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
            if let Some(w) = w {
                return Ok(w);
            }
        }
        Ok(Weight::F32 {
            rows,
            cols,
            w: self.dequantized(name)?,
        })
    }

    pub fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.dequantized(name)
    }

    pub fn optional_vector(&self, name: &str) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            Ok(Some(self.vector(name)?))
        } else {
            Ok(None)
        }
    }

    /// A tensor as candle's quantized tensor on `device` (the device path).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<candle_core::quantized::QTensor> {
        let mut r = self.reader.lock().expect("gguf reader lock");
        self.content
            .tensor(&mut *r, name, device)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))
    }

    fn dequantized(&self, name: &str) -> Result<Vec<f32>> {
        let mut r = self.reader.lock().expect("gguf reader lock");
        let t = self
            .content
            .tensor(&mut *r, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))?;
        Ok(t)
    }
}
