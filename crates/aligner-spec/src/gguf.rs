//! Just enough of the GGUF header to check a file is one and read
//! `general.architecture` from its metadata (GGUF v2/v3; v1 gets the magic check only).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GgufHeader {
    pub architecture: Option<String>,
}

/// `Ok(None)` when the file does not start with `GGUF`.
pub(crate) fn read_header(path: &Path) -> io::Result<Option<GgufHeader>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 4];
    if r.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Ok(None);
    }
    // Metadata problems are not fatal: the loader reports them in detail later.
    let architecture = read_architecture(&mut r).ok().flatten();
    Ok(Some(GgufHeader { architecture }))
}

/// How many metadata entries to look through; `general.architecture` comes first in
/// files written by llama.cpp.
const MAX_KEYS: u64 = 64;
const MAX_STRING: u64 = 1 << 20;

fn read_architecture<R: Read + Seek>(r: &mut R) -> io::Result<Option<String>> {
    let version = read_u32(r)?;
    if version < 2 {
        return Ok(None);
    }
    let _tensor_count = read_u64(r)?;
    let kv_count = read_u64(r)?;
    for _ in 0..kv_count.min(MAX_KEYS) {
        let key = read_string(r)?;
        let ty = read_u32(r)?;
        if key == "general.architecture" && ty == TYPE_STRING {
            return Ok(Some(read_string(r)?));
        }
        skip_value(r, ty)?;
    }
    Ok(None)
}

const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Size in bytes of a fixed-size GGUF value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

fn skip_value<R: Read + Seek>(r: &mut R, ty: u32) -> io::Result<()> {
    if let Some(n) = fixed_size(ty) {
        r.seek(SeekFrom::Current(n as i64))?;
        return Ok(());
    }
    match ty {
        TYPE_STRING => {
            let len = read_u64(r)?;
            r.seek(SeekFrom::Current(
                i64::try_from(len).map_err(|_| bad("string too long"))?,
            ))?;
        }
        TYPE_ARRAY => {
            let item = read_u32(r)?;
            let count = read_u64(r)?;
            if let Some(n) = fixed_size(item) {
                let bytes = count
                    .checked_mul(n)
                    .and_then(|b| i64::try_from(b).ok())
                    .ok_or_else(|| bad("array too long"))?;
                r.seek(SeekFrom::Current(bytes))?;
            } else {
                for _ in 0..count {
                    skip_value(r, item)?;
                }
            }
        }
        _ => return Err(bad("unknown value type")),
    }
    Ok(())
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string<R: Read>(r: &mut R) -> io::Result<String> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(bad("string too long"));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|_| bad("string is not UTF-8"))
}

/// Writes a minimal GGUF v3 header with the given string metadata (tests only).
#[cfg(test)]
pub(crate) fn write_test_gguf(path: &Path, kvs: &[(&str, &str)]) {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64 + 1).to_le_bytes());
    // A u32 entry first, to exercise skipping.
    let push_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    push_str(&mut out, "general.quantization_version");
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&2u32.to_le_bytes());
    for (k, v) in kvs {
        push_str(&mut out, k);
        out.extend_from_slice(&TYPE_STRING.to_le_bytes());
        push_str(&mut out, v);
    }
    std::fs::write(path, out).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_architecture_and_rejects_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_test_gguf(
            &p,
            &[("general.name", "tiny"), ("general.architecture", "llama")],
        );
        assert_eq!(
            read_header(&p).unwrap(),
            Some(GgufHeader {
                architecture: Some("llama".into())
            })
        );
        let q = dir.path().join("x.gguf");
        std::fs::write(&q, b"nope, not gguf").unwrap();
        assert_eq!(read_header(&q).unwrap(), None);
        let short = dir.path().join("s.gguf");
        std::fs::write(&short, b"GGUF").unwrap();
        assert_eq!(
            read_header(&short).unwrap(),
            Some(GgufHeader { architecture: None })
        );
    }
}
