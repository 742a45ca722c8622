//! Document sources: plain text, JSON Lines (optionally gzip or zstd
//! compressed) and Parquet files, read as a stream of document segments.
//!
//! Each input is a file, a directory read recursively, or a glob pattern.
//! Every document gets a key that stays the same wherever the corpus lives,
//! so the train/valid split can be derived from it. A document longer than
//! [`SourceOptions::segment_bytes`] is yielded in several segments, cut
//! where tokenizing the segments one by one gives the same ids as tokenizing
//! the whole document (see the `cut` module for the rule).
//!
//! ```no_run
//! use dagmoe_data::sources::{DocumentSource, SourceOptions};
//!
//! let mut source = DocumentSource::open(&["corpus/", "extra/*.jsonl.zst"], SourceOptions::default())?;
//! for segment in &mut source {
//!     let segment = segment?;
//!     // Tokenize `segment.text`; append EOS when `segment.end_of_document`.
//! }
//! println!("{} documents", source.stats().documents);
//! # Ok::<(), dagmoe_data::DataError>(())
//! ```

mod compression;
mod cut;
mod inputs;
mod jsonl;
mod parquet_column;
mod plain_text;

use std::collections::VecDeque;
use std::path::Path;

use crate::{DataError, Result};

pub use inputs::{SourceFile, list_source_files};

use inputs::FileFormat;
use jsonl::JsonlReader;
use parquet_column::ParquetColumnReader;
use plain_text::PlainTextReader;

/// Default [`SourceOptions::segment_bytes`]: 1 MiB.
pub const DEFAULT_SEGMENT_BYTES: usize = 1 << 20;

/// Default JSONL field and Parquet column that contains the document text.
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// Bad records logged one by one before the rest are only counted.
const LOGGED_BAD_RECORDS: u64 = 10;

/// File format of the inputs, or `Auto` to choose it per file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// By file name: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet`;
    /// any other file is plain text, decompressed first when its name ends in `.gz` or `.zst`.
    #[default]
    Auto,
    Text,
    Jsonl,
    Parquet,
}

/// Handling of a record that cannot be read: invalid JSON, a missing or
/// non-string text field, a null Parquet value, or invalid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRecordPolicy {
    /// Count it in [`SourceStats::bad_records`], log the first few, and go on.
    #[default]
    Skip,
    /// Stop with an error that names the file and the line, row or byte offset.
    Fail,
}

/// Settings of a [`DocumentSource`].
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub format: Format,
    /// JSONL field or Parquet column that contains the document text.
    pub text_field: String,
    /// String that separates documents inside a plain text file, such as
    /// `"\n\n\n"`; `None` makes each file one document.
    pub separator: Option<String>,
    /// Target segment length in bytes. A longer document is cut at the last
    /// safe cut within this length, or at the first one after it when there
    /// is none, so a segment can be longer.
    pub segment_bytes: usize,
    pub bad_records: BadRecordPolicy,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            text_field: DEFAULT_TEXT_FIELD.to_string(),
            separator: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            bad_records: BadRecordPolicy::Skip,
        }
    }
}

/// A piece of a document's text: the whole document, or one of consecutive
/// segments that concatenate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Stable identity of the document, used to assign it to a split. It is
    /// the file's [`SourceFile::key`] for a one-file document, and that key
    /// with a suffix otherwise: `"KEY#N"` for the N-th (0-based)
    /// separator-split document of a text file, `"KEY:LINE"` (1-based) for
    /// JSONL and `"KEY:ROW"` (0-based) for Parquet.
    pub key: String,
    pub text: String,
    /// True on the document's last segment; the caller appends EOS after it.
    pub end_of_document: bool,
    /// True on the empty last segment of a document that turned out to be
    /// unreadable after some of its segments were yielded: the caller drops
    /// the whole document, those earlier segments included.
    pub discarded: bool,
}

/// Counts kept while a [`DocumentSource`] is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Files opened.
    pub files: u64,
    /// Documents yielded whole; a document dropped part-way for invalid UTF-8 counts in `bad_records` only.
    pub documents: u64,
    /// Documents skipped because they were empty or only whitespace, including blank JSONL lines.
    pub empty_documents: u64,
    /// Records that could not be read (see [`BadRecordPolicy`]).
    pub bad_records: u64,
    /// UTF-8 bytes of the yielded text.
    pub bytes: u64,
}

/// A record from a file reader, before the source counts and segments it.
enum Record {
    /// Document text: a whole record, or one piece of a streamed plain text document.
    Text { key: String, text: String, end_of_document: bool },
    /// A record that cannot be read. The reader has already skipped it, and
    /// for plain text the rest of its document.
    Bad { key: String, location: String, reason: String },
}

enum FileReader {
    PlainText(PlainTextReader),
    Jsonl(JsonlReader),
    Parquet(Box<ParquetColumnReader>),
}

impl FileReader {
    fn open(file: &SourceFile, options: &SourceOptions) -> Result<Self> {
        let path = file.path.clone();
        let key = file.key.clone();
        let reader = match FileFormat::detect(&file.path, options.format) {
            FileFormat::Text(compression) => {
                let stream = compression::open_stream(&path, compression)?;
                let compressed = compression != inputs::Compression::None;
                let separator = options.separator.as_deref();
                Self::PlainText(PlainTextReader::new(path, key, stream, compressed, separator, options.segment_bytes))
            }
            FileFormat::Jsonl(compression) => {
                let stream = compression::open_stream(&path, compression)?;
                Self::Jsonl(JsonlReader::new(path, key, stream, &options.text_field))
            }
            FileFormat::Parquet => Self::Parquet(Box::new(ParquetColumnReader::open(path, key, &options.text_field)?)),
        };
        Ok(reader)
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        match self {
            Self::PlainText(reader) => reader.next_record(),
            Self::Jsonl(reader) => reader.next_record(),
            Self::Parquet(reader) => reader.next_record(),
        }
    }
}

/// An iterator over the segments of every document in a list of inputs.
///
/// Files are opened one at a time, in the order of [`list_source_files`].
/// After it yields an error the iterator ends. Iterate over `&mut source`
/// to read [`DocumentSource::stats`] afterwards.
pub struct DocumentSource {
    files: std::vec::IntoIter<SourceFile>,
    options: SourceOptions,
    reader: Option<FileReader>,
    pending: VecDeque<Segment>,
    /// Key of the document whose last segment has not been yielded yet.
    open_document: Option<String>,
    /// Text bytes of the open document yielded so far.
    open_document_bytes: u64,
    stats: SourceStats,
    failed: bool,
}

impl DocumentSource {
    /// Lists the files of `inputs` (see [`list_source_files`]) and checks the options.
    pub fn open<P: AsRef<Path>>(inputs: &[P], options: SourceOptions) -> Result<Self> {
        Self::from_files(list_source_files(inputs)?, options)
    }

    /// Reads the given files, for callers that listed them already.
    pub fn from_files(files: Vec<SourceFile>, options: SourceOptions) -> Result<Self> {
        validate_options(&options)?;
        Ok(Self {
            files: files.into_iter(),
            options,
            reader: None,
            pending: VecDeque::new(),
            open_document: None,
            open_document_bytes: 0,
            stats: SourceStats::default(),
            failed: false,
        })
    }

    /// Counts so far; final once the iterator has returned `None`.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            let reader = match &mut self.reader {
                Some(reader) => reader,
                None => {
                    let Some(file) = self.files.next() else {
                        return Ok(None);
                    };
                    self.stats.files += 1;
                    self.reader.insert(FileReader::open(&file, &self.options)?)
                }
            };
            match reader.next_record()? {
                Some(record) => return Ok(Some(record)),
                None => self.reader = None,
            }
        }
    }

    /// Counts a record and queues its segments.
    fn accept(&mut self, record: Record) -> Result<()> {
        match record {
            Record::Text { key, mut text, end_of_document } => {
                let starts_document = self.open_document.is_none();
                // A UTF-8 byte order mark is an encoding marker, not text, as in JSONL files.
                if starts_document && text.starts_with('\u{feff}') {
                    text.drain(..'\u{feff}'.len_utf8());
                }
                if starts_document && end_of_document && text.trim().is_empty() {
                    self.stats.empty_documents += 1;
                    return Ok(());
                }
                if starts_document {
                    self.stats.documents += 1;
                }
                self.stats.bytes += text.len() as u64;
                self.open_document_bytes = if end_of_document { 0 } else { self.open_document_bytes + text.len() as u64 };
                self.queue_segments(&key, &text, end_of_document);
                self.open_document = if end_of_document { None } else { Some(key) };
            }
            Record::Bad { key, location, reason } => {
                self.stats.bad_records += 1;
                self.report_bad_record(&location, &reason)?;
                if let Some(open) = self.open_document.take() {
                    // Part of this document was already yielded: tell the
                    // caller to drop it and take it out of the counts.
                    tracing::warn!(document = %open, "skipping a document that is unreadable after its first segments");
                    self.stats.documents -= 1;
                    self.stats.bytes -= std::mem::take(&mut self.open_document_bytes);
                    self.pending.push_back(Segment { key, text: String::new(), end_of_document: true, discarded: true });
                }
            }
        }
        Ok(())
    }

    fn queue_segments(&mut self, key: &str, text: &str, end_of_document: bool) {
        let pieces = cut::split_at_safe_cuts(text, self.options.segment_bytes);
        let last = pieces.len() - 1;
        for (index, piece) in pieces.into_iter().enumerate() {
            self.pending.push_back(Segment {
                key: key.to_string(),
                text: piece.to_string(),
                end_of_document: end_of_document && index == last,
                discarded: false,
            });
        }
    }

    fn report_bad_record(&self, location: &str, reason: &str) -> Result<()> {
        if self.options.bad_records == BadRecordPolicy::Fail {
            return Err(DataError::Invalid(format!(
                "{location}: {reason}; fix or remove this record, or skip bad records (--on-bad-record skip)"
            )));
        }
        let count = self.stats.bad_records;
        if count <= LOGGED_BAD_RECORDS {
            tracing::warn!(%location, %reason, "skipping a bad record");
        } else if count == LOGGED_BAD_RECORDS + 1 {
            tracing::warn!("more than {LOGGED_BAD_RECORDS} bad records; the rest are skipped and only counted");
        }
        Ok(())
    }
}

impl Iterator for DocumentSource {
    type Item = Result<Segment>;

    fn next(&mut self) -> Option<Result<Segment>> {
        loop {
            if let Some(segment) = self.pending.pop_front() {
                return Some(Ok(segment));
            }
            if self.failed {
                return None;
            }
            let accepted = self.next_record().and_then(|record| match record {
                Some(record) => self.accept(record).map(|()| true),
                None => Ok(false),
            });
            match accepted {
                Ok(true) => continue,
                Ok(false) => return None,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn validate_options(options: &SourceOptions) -> Result<()> {
    if options.segment_bytes == 0 {
        return Err(DataError::Invalid(format!(
            "segment size 0 bytes is invalid; pass a positive size such as {DEFAULT_SEGMENT_BYTES}"
        )));
    }
    if options.text_field.is_empty() {
        return Err(DataError::Invalid(format!(
            "the text field name is empty; pass the JSONL field or Parquet column that contains the text, such as {DEFAULT_TEXT_FIELD:?}"
        )));
    }
    if options.separator.as_deref() == Some("") {
        return Err(DataError::Invalid(
            "the document separator is empty; pass a string such as \"\\n\\n\\n\", or none to read one document per file".into(),
        ));
    }
    Ok(())
}

/// Returns the inputs as one comma-separated list, for messages and manifests.
pub fn describe_inputs<P: AsRef<Path>>(inputs: &[P]) -> String {
    inputs.iter().map(|p| p.as_ref().display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Builds the error for inputs that gave no document, with the counts of what was skipped.
pub fn no_usable_documents<P: AsRef<Path>>(inputs: &[P], stats: &SourceStats) -> DataError {
    DataError::Invalid(format!(
        "{} contains no usable document ({} empty, {} unreadable records); pass text files, or JSONL or Parquet whose text is in the --text-field",
        describe_inputs(inputs),
        stats.empty_documents,
        stats.bad_records
    ))
}

/// Reads every document of `inputs` whole, as `(key, text)` pairs in input
/// order, for the tokenizer trainer.
pub fn read_all<P: AsRef<Path>>(inputs: &[P], options: SourceOptions) -> Result<(Vec<(String, String)>, SourceStats)> {
    let mut source = DocumentSource::open(inputs, options)?;
    let mut documents = Vec::new();
    let mut current = String::new();
    for segment in &mut source {
        let segment = segment?;
        current.push_str(&segment.text);
        if segment.discarded {
            current.clear();
        } else if segment.end_of_document {
            documents.push((segment.key, std::mem::take(&mut current)));
        }
    }
    Ok((documents, *source.stats()))
}

#[cfg(test)]
mod tests;
