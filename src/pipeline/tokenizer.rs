//! CLIP's byte-level BPE tokenizer, built with the `tokenizers` crate from `vocab.json` and
//! `merges.txt` with the same normalizer and pre-tokenizer as transformers' `CLIPTokenizer`:
//! NFC, whitespace runs to one space, lowercase; CLIP's split regex; byte-level mapping; `</w>`
//! end-of-word suffix. Sequences are `<|startoftext|> … <|endoftext|>`, padded to the text
//! encoder's 77 positions with the folder's pad token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x's
//! OpenCLIP tokenizer) and truncated to fit.
use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

/// One tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `max_len` ids: BOS, the prompt, EOS, padding.
    pub ids: Vec<i64>,
    /// How many prompt tokens did not fit and were dropped.
    pub truncated: usize,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

/// The pad token a tokenizer folder names: `special_tokens_map.json`, else
/// `tokenizer_config.json` (transformers writes it in either), as a string or `{"content": …}`.
/// `None` when neither file names one (SD 1.x folders converted by hand): EOS pads.
fn pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        let token = match json.get("pad_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        if token.is_some() {
            return Ok(token);
        }
    }
    Ok(None)
}

impl ClipTokenizer {
    /// The files of a tokenizer folder this reads (those present).
    pub const FILES: [&'static str; 4] = [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ];

    /// Loads `dir/vocab.json` and `dir/merges.txt`; `max_len` is the text encoder's positions (77).
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for path in [&vocab, &merges] {
            if !path.is_file() {
                return Err(Error::MissingFile { path: path.clone() });
            }
        }
        if max_len < 2 {
            return Err(Error::InvalidArgument(format!(
                "max_len {max_len} leaves no room for BOS/EOS"
            )));
        }
        let (Some(vocab_s), Some(merges_s)) = (vocab.to_str(), merges.to_str()) else {
            return Err(Error::Tokenizer(format!(
                "{}: path is not UTF-8",
                dir.display()
            )));
        };
        let bpe = BPE::from_file(vocab_s, merges_s)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| tok_err(&vocab, e))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| tok_err(&vocab, e))?
            .into(),
            Lowercase.into(),
        ])));
        inner.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            Split::new(
                SplitPattern::Regex(SPLIT_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(|e| tok_err(&vocab, e))?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // Special tokens written in a prompt are matched whole, before normalization, as in Python.
        inner.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| tok_err(&vocab, format!("vocabulary has no `{t}`")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let pad = match pad_token(dir)? {
            Some(token) => id(&token)?,
            None => eos,
        };
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes one prompt to exactly `max_len` ids.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize prompt: {e}")))?;
        let body = enc.get_ids();
        let room = self.max_len - 2;
        let kept = body.len().min(room);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos as i64);
        ids.extend(body[..kept].iter().map(|&i| i as i64));
        ids.push(self.eos as i64);
        ids.resize(self.max_len, self.pad as i64);
        Ok(Tokens {
            ids,
            truncated: body.len() - kept,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pad_token_comes_from_either_file_in_either_form() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pad_token(dir.path()).unwrap(), None, "no file: EOS pads");
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "tokenizer_config.json",
            r#"{"pad_token": {"content": "!", "lstrip": false}}"#,
        );
        assert_eq!(pad_token(dir.path()).unwrap().as_deref(), Some("!"));
        // special_tokens_map.json is read first.
        write(
            "special_tokens_map.json",
            r#"{"pad_token": "<|endoftext|>"}"#,
        );
        assert_eq!(
            pad_token(dir.path()).unwrap().as_deref(),
            Some("<|endoftext|>")
        );
        write("special_tokens_map.json", "{not json");
        let e = pad_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("special_tokens_map.json"), "{e}");
    }
}
