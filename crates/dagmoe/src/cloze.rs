//! `dagmoe data make-cloze`: a multiple-choice task built from held-out text.
//!
//! Each item takes two consecutive sentences of a held-out document as the
//! context. The correct choice is the sentence that follows them, and the
//! distractors are sentences drawn from other held-out documents.

use std::path::Path;

use dagmoe_data::prepare::is_validation_document;
use dagmoe_data::sources::{SourceOptions, read_all};
use dagmoe_data::rng::SplitMix64;

use crate::error::{Error, Result};
use crate::tasks::ChoiceItem;

/// Settings of `make-cloze`.
#[derive(Debug, Clone)]
pub struct ClozeOptions {
    /// Items to build at most.
    pub items: usize,
    /// Choices per item, the correct one included.
    pub choices: usize,
    pub seed: u64,
    /// The validation fraction the corpus was prepared with: only documents
    /// of that split are used, so the task is held out from training.
    pub valid_fraction: f64,
}

/// Builds cloze items from the held-out documents under `input`.
pub fn make_cloze(input: &Path, options: &ClozeOptions) -> Result<Vec<ChoiceItem>> {
    if options.choices < 2 {
        return Err(Error::Usage(format!("invalid --choices {}: use at least 2", options.choices)));
    }
    let (documents, _) = read_all(&[input], SourceOptions::default())?;
    let held_out: Vec<Vec<String>> = documents
        .iter()
        .filter(|(path, _)| is_validation_document(path, options.valid_fraction))
        .map(|(_, text)| prose_sentences(text))
        .filter(|sentences| sentences.len() >= 3)
        .collect();
    if held_out.len() < 2 {
        return Err(Error::Usage(format!(
            "{} has {} held-out documents with three or more prose sentences; a cloze task needs at least 2. Raise --valid-fraction or use a larger corpus",
            input.display(),
            held_out.len()
        )));
    }

    let mut rng = SplitMix64::new(options.seed);
    let mut items = Vec::new();
    let mut attempts = 0;
    while items.len() < options.items && attempts < options.items * 20 {
        attempts += 1;
        let document = rng.below(held_out.len() as u64) as usize;
        let sentences = &held_out[document];
        let start = rng.below((sentences.len() - 2) as u64) as usize;
        let context = format!("{} {}", sentences[start], sentences[start + 1]);
        let mut choices = vec![format!(" {}", sentences[start + 2])];
        while choices.len() < options.choices {
            let other = rng.below(held_out.len() as u64) as usize;
            if other == document {
                continue;
            }
            let pool = &held_out[other];
            let distractor = format!(" {}", pool[rng.below(pool.len() as u64) as usize]);
            if !choices.contains(&distractor) {
                choices.push(distractor);
            }
        }
        // Shuffle so the answer's position carries no information.
        for i in (1..choices.len()).rev() {
            choices.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let answer = choices.iter().position(|c| c.trim() == sentences[start + 2]).expect("the answer is among the choices");
        let item = ChoiceItem { context, choices, answer };
        if !items.contains(&item) {
            items.push(item);
        }
    }
    Ok(items)
}

/// Splits a document into sentences of its prose paragraphs, skipping
/// reStructuredText markup, lists, tables and code blocks.
fn prose_sentences(text: &str) -> Vec<String> {
    let mut sentences = Vec::new();
    for paragraph in text.split("\n\n") {
        let lines: Vec<&str> = paragraph.lines().collect();
        let is_prose = !lines.is_empty()
            && lines.iter().all(|line| {
                let trimmed = line.trim_start();
                line.len() == trimmed.len()
                    && !trimmed.is_empty()
                    && !trimmed.starts_with(['.', '=', '-', '*', '|', '+', '#', ':', '`', '>'])
            });
        if !is_prose {
            continue;
        }
        let joined = lines.join(" ");
        let mut current = String::new();
        for word in joined.split_whitespace() {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
            if word.ends_with(['.', '?', '!']) && current.len() >= 30 {
                if current.len() <= 300 {
                    sentences.push(std::mem::take(&mut current));
                } else {
                    current.clear();
                }
            }
        }
    }
    sentences
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prose_sentences_skip_markup() {
        let text = "Title\n=====\n\nThis is the first sentence of a paragraph. And this is the second sentence here.\n\n.. note:: skipped\n\n  indented code block.\n";
        let sentences = prose_sentences(text);
        assert_eq!(sentences, vec!["This is the first sentence of a paragraph.", "And this is the second sentence here."]);
    }
}
