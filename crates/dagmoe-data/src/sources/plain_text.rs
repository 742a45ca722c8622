//! Plain text files: one document per file, or documents split on a
//! separator, read in pieces so that a long document is never loaded whole.

use std::io::Read;
use std::path::PathBuf;

use memchr::memmem;

use crate::{DataError, Result};

use super::Record;
use super::cut::{first_safe_cut, last_safe_cut};

/// Bytes requested from the stream per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes kept after a streaming cut candidate: the longest UTF-8 character,
/// so the character after the newline is complete.
const MAX_CHAR_BYTES: usize = 4;

pub(super) struct PlainTextReader {
    path: PathBuf,
    key: String,
    stream: Box<dyn Read + Send>,
    compressed: bool,
    separator: Option<Vec<u8>>,
    segment_bytes: usize,
    buffer: Vec<u8>,
    /// Offset of `buffer[0]` in the decompressed stream, for error messages.
    buffer_offset: u64,
    end_of_stream: bool,
    /// Index of the current document in the file, counting empty ones.
    document_index: u64,
    /// Whether the current document has already produced a piece.
    document_started: bool,
    /// Whether the rest of the current document is dropped after invalid UTF-8.
    skipping: bool,
    /// Prefix of `buffer` in which no separator starts.
    separator_searched: usize,
    /// Prefix of `buffer` searched for a cut without success, or 0 before the first search.
    cut_searched: usize,
}

impl PlainTextReader {
    pub(super) fn new(
        path: PathBuf,
        key: String,
        stream: Box<dyn Read + Send>,
        compressed: bool,
        separator: Option<&str>,
        segment_bytes: usize,
    ) -> Self {
        Self {
            path,
            key,
            stream,
            compressed,
            separator: separator.map(|text| text.as_bytes().to_vec()),
            segment_bytes,
            buffer: Vec::new(),
            buffer_offset: 0,
            end_of_stream: false,
            document_index: 0,
            document_started: false,
            skipping: false,
            separator_searched: 0,
            cut_searched: 0,
        }
    }

    /// Returns the next piece of document text (at most `segment_bytes` long
    /// where a safe cut allows it), a bad record for invalid UTF-8, or `None`
    /// at the end of the file.
    pub(super) fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            let Some((length, end_of_document, consumed)) = self.next_piece()? else {
                return Ok(None);
            };
            if let Some(record) = self.take_piece(length, end_of_document, consumed) {
                return Ok(Some(record));
            }
        }
    }

    /// Finds the next piece in the buffer, reading more as needed. Returns its
    /// length, whether it ends the document, and the bytes it consumes
    /// including a separator after it.
    fn next_piece(&mut self) -> Result<Option<(usize, bool, usize)>> {
        loop {
            if let Some((end, separator_len)) = self.document_end() {
                if end == 0 && separator_len == 0 && self.document_index > 0 && !self.document_started {
                    // The stream ended right after a document or a final separator, so no document remains.
                    return Ok(None);
                }
                if end > self.segment_bytes
                    && let Some(cut) = self.find_cut(end, end)
                {
                    return Ok(Some((cut, false, cut)));
                }
                return Ok(Some((end, true, end + separator_len)));
            }

            let guard = MAX_CHAR_BYTES.max(self.separator.as_ref().map_or(0, Vec::len));
            if self.buffer.len() > self.segment_bytes + guard {
                // A cut must leave room for a separator that may start right
                // after it, so that an unfinished separator is never cut.
                if let Some(cut) = self.find_cut(self.buffer.len(), self.buffer.len() - guard) {
                    return Ok(Some((cut, false, cut)));
                }
            }
            self.read_chunk()?;
        }
    }

    /// Returns where the current document ends in the buffer and the length
    /// of the separator there, if the buffer reaches its end.
    fn document_end(&mut self) -> Option<(usize, usize)> {
        if let Some(separator) = &self.separator {
            let start = self.separator_searched;
            if let Some(position) = memmem::find(&self.buffer[start..], separator) {
                return Some((start + position, separator.len()));
            }
            self.separator_searched = (self.buffer.len() + 1).saturating_sub(separator.len());
        }
        self.end_of_stream.then_some((self.buffer.len(), 0))
    }

    /// Returns a safe cut in the document text `buffer[..end]` after a newline
    /// before `limit`: the last one within `segment_bytes`, else the first one after it.
    fn find_cut(&mut self, end: usize, limit: usize) -> Option<usize> {
        let document = &self.buffer[..end];
        if self.cut_searched == 0 {
            if let Some(cut) = last_safe_cut(document, self.segment_bytes.min(limit)) {
                return Some(cut);
            }
            self.cut_searched = self.segment_bytes;
        }
        let cut = first_safe_cut(document, self.cut_searched, limit);
        if cut.is_none() {
            self.cut_searched = self.cut_searched.max(limit);
        }
        cut
    }

    fn read_chunk(&mut self) -> Result<()> {
        let read = (&mut self.stream)
            .take(READ_CHUNK_BYTES as u64)
            .read_to_end(&mut self.buffer)
            .map_err(|e| DataError::io("read", &self.path, e))?;
        self.end_of_stream = read == 0;
        Ok(())
    }

    /// Removes a piece from the buffer and turns it into a record, or drops
    /// it while the rest of an invalid document is skipped.
    fn take_piece(&mut self, length: usize, end_of_document: bool, consumed: usize) -> Option<Record> {
        let bytes: Vec<u8> = self.buffer.drain(..length).collect();
        self.buffer.drain(..consumed - length);
        let offset = self.buffer_offset;
        self.buffer_offset += consumed as u64;
        self.separator_searched = 0;
        self.cut_searched = 0;

        let key = match self.separator {
            Some(_) => format!("{}#{}", self.key, self.document_index),
            None => self.key.clone(),
        };
        let skipping = self.skipping;
        if end_of_document {
            self.document_index += 1;
            self.document_started = false;
            self.skipping = false;
        } else {
            self.document_started = true;
        }
        if skipping {
            return None;
        }

        match String::from_utf8(bytes) {
            Ok(text) => Some(Record::Text { key, text, end_of_document }),
            Err(e) => {
                self.skipping = !end_of_document;
                let position = offset + e.utf8_error().valid_up_to() as u64;
                let stream = if self.compressed { " of the decompressed text" } else { "" };
                Some(Record::Bad {
                    key,
                    location: format!("{}, byte {position}{stream}", self.path.display()),
                    reason: "invalid UTF-8".into(),
                })
            }
        }
    }
}
