//! Binary token shards.
//!
//! Layout, little-endian: an 8-byte magic `DAGMOETK`, a `u32` format version,
//! a `u32` token width in bytes (2 or 4), a `u64` token count, then the tokens.

use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{DataError, Result};

pub const SHARD_MAGIC: &[u8; 8] = b"DAGMOETK";
pub const SHARD_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 24;

/// Token width for a vocabulary: `u16` when every id fits, else `u32`.
pub fn token_bytes_for_vocab(vocab_size: usize) -> u32 {
    if vocab_size <= u16::MAX as usize + 1 { 2 } else { 4 }
}

/// Writes one shard and returns the SHA-256 of the file.
pub fn write_shard(path: &Path, tokens: &[u32], token_bytes: u32) -> Result<String> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * token_bytes as usize);
    bytes.extend_from_slice(SHARD_MAGIC);
    bytes.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    bytes.extend_from_slice(&token_bytes.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    match token_bytes {
        2 => tokens.iter().for_each(|&t| bytes.extend_from_slice(&(t as u16).to_le_bytes())),
        _ => tokens.iter().for_each(|&t| bytes.extend_from_slice(&t.to_le_bytes())),
    }
    let mut file = std::fs::File::create(path).map_err(|e| DataError::io("create shard", path, e))?;
    file.write_all(&bytes).map_err(|e| DataError::io("write shard", path, e))?;
    file.sync_all().map_err(|e| DataError::io("sync shard", path, e))?;
    Ok(crate::tokenizer::sha256_hex(&bytes))
}

/// A memory-mapped shard whose header and checksum have been verified.
pub struct Shard {
    map: Mmap,
    token_bytes: usize,
    tokens: u64,
    path: PathBuf,
}

impl Shard {
    /// Maps `path` and checks its header, token count and SHA-256 against the
    /// manifest, and that every token id is below `vocab_size`.
    pub fn open(path: &Path, expected_tokens: u64, expected_sha256: &str, vocab_size: usize) -> Result<Self> {
        let invalid = |message: String| DataError::Shard { path: path.to_path_buf(), message };
        let file = std::fs::File::open(path).map_err(|e| DataError::io("open shard", path, e))?;
        // SAFETY: shards are written once and renamed into place; nothing in
        // dagmoe writes to a prepared directory while it is being read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("map shard", path, e))?;
        if map.len() < HEADER_BYTES || &map[..8] != SHARD_MAGIC {
            return Err(invalid("not a dagmoe token shard (bad magic number)".into()));
        }
        let version = u32::from_le_bytes(map[8..12].try_into().unwrap());
        if version != SHARD_VERSION {
            return Err(invalid(format!(
                "format version {version} is not supported (expected {SHARD_VERSION}); rerun `dagmoe data prepare`"
            )));
        }
        let token_bytes = u32::from_le_bytes(map[12..16].try_into().unwrap()) as usize;
        let tokens = u64::from_le_bytes(map[16..24].try_into().unwrap());
        if !matches!(token_bytes, 2 | 4) || map.len() as u64 != HEADER_BYTES as u64 + tokens * token_bytes as u64 {
            return Err(invalid(format!(
                "header says {tokens} tokens of {token_bytes} bytes but the file has {} bytes; the file is truncated or corrupt, rerun `dagmoe data prepare`",
                map.len()
            )));
        }
        if tokens != expected_tokens {
            return Err(invalid(format!("holds {tokens} tokens but the manifest lists {expected_tokens}")));
        }
        let actual = crate::tokenizer::sha256_hex(&map[..]);
        if actual != expected_sha256 {
            return Err(invalid(format!(
                "SHA-256 {actual} does not match the manifest's {expected_sha256}; the file changed after `dagmoe data prepare`, rerun it"
            )));
        }
        let shard = Self { map, token_bytes, tokens, path: path.to_path_buf() };
        if let Some((position, id)) = shard.first_id_at_least(vocab_size as u32) {
            return Err(invalid(format!(
                "token {position} has id {id}, outside the vocabulary of {vocab_size}; rerun `dagmoe data prepare` with the model's tokenizer"
            )));
        }
        Ok(shard)
    }

    /// Position and value of the first token id `>= limit`, if any.
    fn first_id_at_least(&self, limit: u32) -> Option<(u64, u32)> {
        let mut buffer = vec![0u32; 1 << 16];
        let mut start = 0;
        while start < self.tokens {
            let take = (self.tokens - start).min(buffer.len() as u64) as usize;
            self.read(start, &mut buffer[..take]);
            if let Some(offset) = buffer[..take].iter().position(|&id| id >= limit) {
                return Some((start + offset as u64, buffer[offset]));
            }
            start += take as u64;
        }
        None
    }

    pub fn len(&self) -> u64 {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies tokens `start..start + out.len()` of this shard into `out`.
    pub fn read(&self, start: u64, out: &mut [u32]) {
        let body = &self.map[HEADER_BYTES..];
        let first = start as usize;
        match self.token_bytes {
            2 => {
                for (i, slot) in out.iter_mut().enumerate() {
                    let at = (first + i) * 2;
                    *slot = u16::from_le_bytes([body[at], body[at + 1]]) as u32;
                }
            }
            _ => {
                for (i, slot) in out.iter_mut().enumerate() {
                    let at = (first + i) * 4;
                    *slot = u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
                }
            }
        }
    }
}
