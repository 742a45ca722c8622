//! Parquet files: the document text in one string column, read row group by
//! row group with the column reader, without the Arrow layer.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::errors::ParquetError;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::{DataError, Result};

use super::Record;

/// Rows decoded per call to the column reader.
const BATCH_ROWS: usize = 1024;

pub(super) struct ParquetColumnReader {
    path: PathBuf,
    key: String,
    field: String,
    file: SerializedFileReader<File>,
    column_index: usize,
    max_def_level: i16,
    next_row_group: usize,
    column: Option<ColumnReaderImpl<ByteArrayType>>,
    /// Decoded values of the current batch, `None` for a null.
    batch: VecDeque<Option<ByteArray>>,
    /// 0-based index in the file of the next row in `batch`.
    row: u64,
    def_levels: Vec<i16>,
    values: Vec<ByteArray>,
}

impl ParquetColumnReader {
    /// Opens `path` and finds the top-level string column named `field`.
    pub(super) fn open(path: PathBuf, key: String, field: &str) -> Result<Self> {
        let handle = File::open(&path).map_err(|e| DataError::io("open", &path, e))?;
        let file = SerializedFileReader::new(handle).map_err(|e| parquet_error(&path, e))?;
        let schema = file.metadata().file_metadata().schema_descr_ptr();

        let Some(column_index) = schema.columns().iter().position(|column| column.path().string() == field) else {
            let names: Vec<String> = schema.columns().iter().map(|column| column.path().string()).collect();
            return Err(DataError::Invalid(format!(
                "{}: no column {field:?}; the columns are {}; pass the text column's name as the text field",
                path.display(),
                names.join(", ")
            )));
        };
        let column = schema.column(column_index);
        if column.physical_type() != PhysicalType::BYTE_ARRAY || column.max_rep_level() > 0 {
            return Err(DataError::Invalid(format!(
                "{}: column {field:?} has type {}{}, expected a string column; pass the text column's name as the text field",
                path.display(),
                column.physical_type(),
                if column.max_rep_level() > 0 { " inside a list" } else { "" }
            )));
        }

        Ok(Self {
            path,
            key,
            field: field.to_string(),
            file,
            column_index,
            max_def_level: column.max_def_level(),
            next_row_group: 0,
            column: None,
            batch: VecDeque::new(),
            row: 0,
            def_levels: Vec::new(),
            values: Vec::new(),
        })
    }

    /// Returns the next row as a record, or `None` after the last row group.
    pub(super) fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            if let Some(value) = self.batch.pop_front() {
                let row = self.row;
                self.row += 1;
                return Ok(Some(self.record(row, value)));
            }
            if !self.read_batch()? {
                return Ok(None);
            }
        }
    }

    fn record(&self, row: u64, value: Option<ByteArray>) -> Record {
        let key = format!("{}:{row}", self.key);
        let bad = |reason: String| Record::Bad {
            key: key.clone(),
            location: format!("{}, row {row}", self.path.display()),
            reason,
        };
        let Some(value) = value else {
            return bad(format!("column {:?} is null", self.field));
        };
        match String::from_utf8(value.data().to_vec()) {
            Ok(text) => Record::Text { key, text, end_of_document: true },
            Err(e) => {
                bad(format!("column {:?} is not valid UTF-8 at byte {}", self.field, e.utf8_error().valid_up_to() + 1))
            }
        }
    }

    /// Decodes the next batch of rows into `batch`; returns false when every
    /// row group has been read.
    fn read_batch(&mut self) -> Result<bool> {
        loop {
            let mut column = match self.column.take() {
                Some(column) => column,
                None => match self.open_next_row_group()? {
                    Some(column) => column,
                    None => return Ok(false),
                },
            };

            self.def_levels.clear();
            self.values.clear();
            let (rows, _, _) = column
                .read_records(BATCH_ROWS, Some(&mut self.def_levels), None, &mut self.values)
                .map_err(|e| parquet_error(&self.path, e))?;
            if rows == 0 {
                continue;
            }
            self.column = Some(column);

            let mut values = self.values.drain(..);
            if self.max_def_level == 0 {
                self.batch.extend(values.map(Some));
            } else {
                // A value is present exactly where the definition level is at its maximum.
                for &level in &self.def_levels {
                    let value = if level == self.max_def_level { values.next() } else { None };
                    self.batch.push_back(value);
                }
            }
            return Ok(true);
        }
    }

    fn open_next_row_group(&mut self) -> Result<Option<ColumnReaderImpl<ByteArrayType>>> {
        if self.next_row_group == self.file.num_row_groups() {
            return Ok(None);
        }
        let row_group = self.file.get_row_group(self.next_row_group).map_err(|e| parquet_error(&self.path, e))?;
        self.next_row_group += 1;
        let reader = row_group.get_column_reader(self.column_index).map_err(|e| parquet_error(&self.path, e))?;
        match reader {
            ColumnReader::ByteArrayColumnReader(reader) => Ok(Some(reader)),
            _ => Err(DataError::Invalid(format!(
                "{}: column {:?} is not a byte-array column in this row group; the file is corrupt",
                self.path.display(),
                self.field
            ))),
        }
    }
}

fn parquet_error(path: &std::path::Path, error: ParquetError) -> DataError {
    let mut message = format!("{}: failed to read Parquet data: {error}", path.display());
    if error.to_string().contains("Disabled feature at compile time: zstd") {
        message.push_str(
            "; build dagmoe-data with its default feature `parquet-zstd` to read Zstandard pages, or rewrite the file with Snappy compression",
        );
    }
    DataError::Invalid(message)
}
