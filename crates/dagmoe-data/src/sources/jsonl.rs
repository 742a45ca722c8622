//! JSON Lines files: one JSON object per line, the document text in one field.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::{DataError, Result};

use super::Record;

pub(super) struct JsonlReader {
    path: PathBuf,
    key: String,
    field: String,
    lines: BufReader<Box<dyn Read + Send>>,
    line: Vec<u8>,
    /// 1-based number of the line in `line`.
    line_number: u64,
}

impl JsonlReader {
    pub(super) fn new(path: PathBuf, key: String, stream: Box<dyn Read + Send>, field: &str) -> Self {
        Self { path, key, field: field.to_string(), lines: BufReader::new(stream), line: Vec::new(), line_number: 0 }
    }

    /// Returns the next line as a record, or `None` at the end of the file.
    /// A blank line is an empty document.
    pub(super) fn next_record(&mut self) -> Result<Option<Record>> {
        self.line.clear();
        let read = self.lines.read_until(b'\n', &mut self.line).map_err(|e| DataError::io("read", &self.path, e))?;
        if read == 0 {
            return Ok(None);
        }
        self.line_number += 1;
        let key = format!("{}:{}", self.key, self.line_number);

        let line = match std::str::from_utf8(&self.line) {
            // A UTF-8 byte order mark may start the file.
            Ok(line) if self.line_number == 1 => line.trim_start_matches('\u{feff}').trim_end_matches(['\n', '\r']),
            Ok(line) => line.trim_end_matches(['\n', '\r']),
            Err(e) => {
                let reason = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1);
                return Ok(Some(self.bad_record(key, reason)));
            }
        };
        if line.trim().is_empty() {
            return Ok(Some(Record::Text { key, text: String::new(), end_of_document: true }));
        }
        let record = match parse_text_field(line, &self.field) {
            Ok(FieldValue::Text(text)) => Record::Text { key, text, end_of_document: true },
            Ok(FieldValue::Missing) => self.bad_record(key, format!("missing field {:?}", self.field)),
            Ok(FieldValue::Other(kind)) => {
                self.bad_record(key, format!("field {:?} is {kind}, expected a string", self.field))
            }
            Err(e) => self.bad_record(key, describe_json_error(&e)),
        };
        Ok(Some(record))
    }

    fn bad_record(&self, key: String, reason: String) -> Record {
        Record::Bad { key, location: format!("{}:{}", self.path.display(), self.line_number), reason }
    }
}

/// Describes a parse error by its column, because the line number that
/// `serde_json` reports is always 1 when it parses a single line.
fn describe_json_error(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    let message = message.strip_suffix(&position).unwrap_or(&message);
    if error.is_data() {
        format!("{message} (column {})", error.column())
    } else {
        format!("invalid JSON at column {}: {message}", error.column())
    }
}

/// The value of the text field in one JSON object.
#[derive(Debug, PartialEq)]
enum FieldValue {
    Text(String),
    Missing,
    /// A value of another JSON type, named for the error message.
    Other(&'static str),
}

/// Parses one JSON object and returns its `field`, skipping the other
/// fields without building them.
fn parse_text_field(line: &str, field: &str) -> serde_json::Result<FieldValue> {
    let mut deserializer = serde_json::Deserializer::from_str(line);
    let value = deserializer.deserialize_map(TextFieldVisitor { field })?;
    deserializer.end()?;
    Ok(value)
}

struct TextFieldVisitor<'a> {
    field: &'a str,
}

impl<'de> Visitor<'de> for TextFieldVisitor<'_> {
    type Value = FieldValue;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<FieldValue, A::Error> {
        let mut found = FieldValue::Missing;
        while let Some(is_text_field) = map.next_key_seed(KeyMatches { field: self.field })? {
            if !is_text_field {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            // A repeated key keeps its last value, as `serde_json::Value` does.
            found = match map.next_value::<Value>()? {
                Value::String(text) => FieldValue::Text(text),
                Value::Null => FieldValue::Other("null"),
                Value::Bool(_) => FieldValue::Other("a boolean"),
                Value::Number(_) => FieldValue::Other("a number"),
                Value::Array(_) => FieldValue::Other("an array"),
                Value::Object(_) => FieldValue::Other("an object"),
            };
        }
        Ok(found)
    }
}

/// Deserializes an object key to whether it equals `field`, without allocating.
struct KeyMatches<'a> {
    field: &'a str,
}

impl<'de> DeserializeSeed<'de> for KeyMatches<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyMatches<'_> {
    type Value = bool;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> std::result::Result<bool, E> {
        Ok(key == self.field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_field_is_extracted() {
        let line = r#"{"id": 7, "meta": {"text": "nested"}, "text": "a \"quoted\" line\n", "tags": [1, 2]}"#;
        assert_eq!(parse_text_field(line, "text").unwrap(), FieldValue::Text("a \"quoted\" line\n".into()));
        assert_eq!(parse_text_field(line, "content").unwrap(), FieldValue::Missing);
        assert_eq!(parse_text_field(line, "id").unwrap(), FieldValue::Other("a number"));
        assert_eq!(parse_text_field(line, "meta").unwrap(), FieldValue::Other("an object"));
        assert_eq!(
            parse_text_field(r#"{"t\u0065xt": "escaped key"}"#, "text").unwrap(),
            FieldValue::Text("escaped key".into())
        );
    }

    #[test]
    fn non_objects_and_trailing_data_fail() {
        assert!(parse_text_field(r#"["text"]"#, "text").unwrap_err().is_data());
        assert!(parse_text_field(r#"{"text": "a"} x"#, "text").unwrap_err().is_syntax());
        assert!(parse_text_field(r#"{"text": "a""#, "text").unwrap_err().is_eof());
    }
}
