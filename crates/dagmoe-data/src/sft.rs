//! Supervised fine-tuning examples: prompt and response, with only the
//! response (and the EOS token after it) scored.
//!
//! A JSONL line is either `{"prompt": ..., "response": ...}` or
//! `{"messages": [{"role": ..., "content": ...}, ...]}` whose last message is
//! the assistant's reply. A conversation becomes a prompt of the earlier
//! messages, each written as `"<role>: <content>\n"`, then `"assistant: "`,
//! and the last message is the response. Only the last reply is scored.

use std::path::Path;

use serde::Deserialize;

use crate::loader::{Batch, EpochOrder, LoaderCursor};
use crate::tokenizer::TextTokenizer;
use crate::{DataError, Result};

#[derive(Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum SftLine {
    Pair { prompt: String, response: String },
    Chat { messages: Vec<Message> },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
}

/// One tokenized example: `tokens[..prompt_len]` is the prompt, the rest
/// the response and EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

impl SftExample {
    /// Tokenizes a prompt and response into at most `seq_len + 1` tokens,
    /// dropping prompt tokens from the left (keeping at least one) and then
    /// response tokens from the right when the pair is too long.
    pub fn new(prompt: &[u32], response: &[u32], eos: u32, seq_len: usize) -> Self {
        let mut answer = response.to_vec();
        answer.push(eos);
        answer.truncate(seq_len);
        let room = seq_len + 1 - answer.len();
        let prompt: Vec<u32> = if prompt.is_empty() { vec![eos] } else { prompt.to_vec() };
        let kept = &prompt[prompt.len().saturating_sub(room)..];
        let mut tokens = kept.to_vec();
        tokens.extend_from_slice(&answer);
        Self { prompt_len: kept.len(), tokens }
    }
}

/// Reads and tokenizes an SFT file. A malformed line is an error naming the file and line.
pub fn load_sft(path: &Path, tokenizer: &TextTokenizer, seq_len: usize) -> Result<Vec<SftExample>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io("read fine-tuning data", path, e))?;
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let invalid = |message: &str| {
            DataError::Invalid(format!("{}:{}: {message}", path.display(), index + 1))
        };
        let parsed: SftLine = serde_json::from_str(line).map_err(|_| {
            invalid("expected {\"prompt\": str, \"response\": str} or {\"messages\": [{\"role\": str, \"content\": str}, ...]}")
        })?;
        let (prompt, response) = match parsed {
            SftLine::Pair { prompt, response } => (prompt, response),
            SftLine::Chat { messages } => {
                let Some((last, earlier)) = messages.split_last().filter(|(last, _)| last.role == "assistant") else {
                    return Err(invalid("the last message must have role \"assistant\""));
                };
                let mut prompt: String = earlier.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
                prompt.push_str("assistant: ");
                (prompt, last.content.clone())
            }
        };
        let prompt_ids = tokenizer.encode(&prompt)?;
        let response_ids = tokenizer.encode(&response)?;
        examples.push(SftExample::new(&prompt_ids, &response_ids, tokenizer.eos_id(), seq_len));
    }
    if examples.is_empty() {
        return Err(DataError::Invalid(format!("{} contains no example", path.display())));
    }
    Ok(examples)
}

/// Batches of SFT examples in a seeded order that changes every epoch.
pub struct SftLoader {
    examples: Vec<SftExample>,
    seq_len: usize,
    batch_size: usize,
    order: EpochOrder,
}

impl SftLoader {
    pub fn new(examples: Vec<SftExample>, seq_len: usize, batch_size: usize, seed: u64) -> Self {
        let order = EpochOrder::new(examples.len(), seed, 0xA24B_AED4_963E_E407);
        Self { examples, seq_len, batch_size, order }
    }

    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    pub fn cursor(&self) -> LoaderCursor {
        self.order.cursor()
    }

    pub fn restore(&mut self, cursor: LoaderCursor) {
        self.order.restore(cursor);
    }

    /// Returns the next `batch_size` examples, padded to `seq_len + 1` tokens.
    pub fn next_batch(&mut self) -> Batch {
        let width = self.seq_len + 1;
        let mut batch = Batch {
            tokens: Vec::with_capacity(self.batch_size * width),
            rows: self.batch_size,
            seq_len: self.seq_len,
            target_lengths: Vec::new(),
            score_from: Vec::new(),
        };
        for _ in 0..self.batch_size {
            let example = &self.examples[self.order.next_item()];
            batch.tokens.extend_from_slice(&example.tokens);
            batch.tokens.resize(batch.tokens.len() + width - example.tokens.len(), 0);
            // Target i predicts token i + 1, so the first response token is target prompt_len - 1.
            batch.target_lengths.push(example.tokens.len() - 1);
            batch.score_from.push(example.prompt_len - 1);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_response_and_eos_are_scored() {
        let example = SftExample::new(&[10, 11, 12], &[20, 21], 0, 16);
        let mut loader = SftLoader::new(vec![example], 16, 1, 0);
        let batch = loader.next_batch();
        // The first response token is scored, no prompt token is, and the EOS after the response is.
        assert_eq!(batch.scored_targets(0), &[20, 21, 0]);
        assert_eq!(batch.score_from[0], 2);
        assert_eq!(batch.target_count(), 3);
        assert_eq!(batch.tokens.len(), 17);
    }

    #[test]
    fn long_examples_keep_the_response() {
        let prompt: Vec<u32> = (100..120).collect();
        let example = SftExample::new(&prompt, &[1, 2, 3], 0, 8);
        assert_eq!(example.tokens, vec![115, 116, 117, 118, 119, 1, 2, 3, 0]);
        assert_eq!(example.prompt_len, 5);
        let huge = SftExample::new(&prompt, &(0..20).collect::<Vec<u32>>(), 99, 8);
        assert_eq!(huge.tokens.len(), 9);
        assert_eq!(huge.prompt_len, 1, "at least one prompt token stays");
    }
}
