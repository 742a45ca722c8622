//! Decompressing readers for `.gz` and `.zst` files.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use crate::{DataError, Result};

use super::inputs::Compression;

/// Opens `path` as a stream of decompressed bytes.
pub(super) fn open_stream(path: &Path, compression: Compression) -> Result<Box<dyn Read + Send>> {
    let file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let stream: Box<dyn Read + Send> = match compression {
        Compression::None => Box::new(file),
        // Concatenated gzip members, as `cat a.gz b.gz` writes, decode as one stream.
        Compression::Gzip => Box::new(MultiGzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(ZstdReader::new(BufReader::new(file))),
    };
    Ok(stream)
}

/// A Zstandard decoder over every frame of a stream.
///
/// `ruzstd::decoding::StreamingDecoder` (0.9) decodes a single frame, but
/// files written by `zstd` from several inputs or by parallel compressors hold
/// several frames, and may contain skippable frames.
struct ZstdReader<R: BufRead> {
    source: R,
    frame: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    fn new(source: R) -> Self {
        Self { source, frame: FrameDecoder::new(), in_frame: false }
    }

    /// Starts the next data frame; returns false at the end of the stream.
    fn start_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.frame.reset(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame { length, .. })) => {
                    io::copy(&mut (&mut self.source).take(u64::from(length)), &mut io::sink())?;
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }

    fn verify_checksum(&self) -> io::Result<()> {
        match (self.frame.get_checksum_from_data(), self.frame.get_calculated_checksum()) {
            (Some(stored), Some(computed)) if stored != computed => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("zstd frame checksum mismatch: stored {stored:08x}, computed {computed:08x}"),
            )),
            _ => Ok(()),
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.start_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            while self.frame.can_collect() == 0 && !self.frame.is_finished() {
                self.frame
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            let read = self.frame.read(buffer)?;
            if read > 0 {
                return Ok(read);
            }
            self.verify_checksum()?;
            self.in_frame = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use ruzstd::encoding::{CompressionLevel, compress_to_vec};

    use super::*;

    fn read_zstd(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut output = Vec::new();
        ZstdReader::new(bytes).read_to_end(&mut output)?;
        Ok(output)
    }

    #[test]
    fn zstd_reads_every_frame() {
        let first = "first frame\n".repeat(1000);
        let mut stream = compress_to_vec(first.as_bytes(), CompressionLevel::Fastest);
        // A skippable frame: magic 0x184D2A50, a 4-byte little-endian length, then the payload.
        stream.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        stream.extend_from_slice(&3u32.to_le_bytes());
        stream.extend_from_slice(b"xyz");
        stream.extend(compress_to_vec(&b"second frame\n"[..], CompressionLevel::Fastest));

        let output = read_zstd(&stream).unwrap();
        assert_eq!(String::from_utf8(output).unwrap(), format!("{first}second frame\n"));
    }

    #[test]
    fn zstd_rejects_garbage() {
        let error = read_zstd(b"definitely not zstd").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn gzip_reads_concatenated_members() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.gz");
        let mut bytes = Vec::new();
        for part in ["one\n", "two\n"] {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(part.as_bytes()).unwrap();
            bytes.extend(encoder.finish().unwrap());
        }
        std::fs::write(&path, bytes).unwrap();

        let mut text = String::new();
        open_stream(&path, Compression::Gzip).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "one\ntwo\n");
    }
}
