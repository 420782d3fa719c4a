//! CLIP's byte-level BPE tokenizer, built with the `tokenizers` crate with the same normalizer and
//! pre-tokenizer as transformers' `CLIPTokenizer`: NFC, whitespace runs to one space, lowercase;
//! CLIP's split regex; byte-level mapping; `</w>` end-of-word suffix. Sequences are
//! `<|startoftext|> … <|endoftext|>`, padded to the text encoder's 77 positions with the pad token
//! (`<|endoftext|>` for SD 1.x, `!` for SD 2.x's OpenCLIP tokenizer) and truncated to fit.
//!
//! The vocabulary and merges come from a tokenizer folder (`vocab.json`, `merges.txt`,
//! [`ClipTokenizer::load`]) or from CLIP's own BPE file embedded in the binary
//! ([`ClipTokenizer::builtin`], `data/clip/`): every SD 1.x/2.x checkpoint uses that same
//! vocabulary, so a single-file checkpoint needs no folder.
//!
//! Textual-inversion triggers ([`ClipTokenizer::add_trigger`]) are found in the prompt before BPE
//! and replaced by their embedding's ids; the matching rule is [`ClipTokenizer::encode_units`]'s.
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizer::Range as NormRange;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizedString, Normalizer, SplitDelimiterBehavior, Tokenizer};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT, see `data/clip/README.md`).
static CLIP_BPE_GZ: &[u8] = include_bytes!("../../data/clip/bpe_simple_vocab_16e6.txt.gz");
/// SHA-256 of [`CLIP_BPE_GZ`], as documented in `data/clip/README.md` (checked by a unit test).
pub const CLIP_BPE_SHA256: &str =
    "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a";
/// CLIP's vocabulary: 256 byte symbols, the same with `</w>`, one token per merge, BOS and EOS.
pub const CLIP_VOCAB_SIZE: usize = 49408;
/// How many merges of the file CLIP uses: the rest of its 49408 ids (`49152 - 256 - 2`).
const CLIP_MERGES: usize = CLIP_VOCAB_SIZE - 2 * 256 - 2;

/// The pad token of the built-in tokenizer, as the diffusers folders of each model family set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinPad {
    /// `<|endoftext|>`: SD 1.x (OpenAI CLIP ViT-L/14).
    Eos,
    /// `!` (id 0): SD 2.x (OpenCLIP ViT-H/14), whose diffusers tokenizer folders say so.
    Bang,
}

impl BuiltinPad {
    pub fn token(self) -> &'static str {
        match self {
            BuiltinPad::Eos => EOS,
            BuiltinPad::Bang => "!",
        }
    }
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    /// `Some` for the embedded vocabulary, which has no file to hash.
    builtin: Option<BuiltinPad>,
    /// Textual-inversion triggers, longest first (so the longest of overlapping triggers wins).
    triggers: Vec<Trigger>,
}

/// A textual-inversion trigger: the word as the normalizer writes it, and its embedding's ids.
struct Trigger {
    normalized: String,
    ids: Vec<i64>,
}

/// One tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `max_len` ids: BOS, the prompt, EOS, padding.
    pub ids: Vec<i64>,
    /// How many prompt tokens did not fit and were dropped.
    pub truncated: usize,
}

fn tok_err(origin: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{origin}: {e}"))
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

/// GPT-2/CLIP's reversible byte → printable character map, in CLIP's order: the printable
/// Latin-1 bytes map to themselves, the other 68 to U+0100 onwards. The order is the order of
/// the first 256 ids.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars: Vec<char> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(char::from)
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    chars.extend(others.zip(256u32..).filter_map(|(_, c)| char::from_u32(c)));
    chars
}

/// CLIP's vocabulary and merges, built from the embedded BPE file exactly as CLIP's
/// `SimpleTokenizer` builds them: the 256 byte symbols, the same with `</w>`, the concatenation of
/// each of the first 48894 merges, then `<|startoftext|>` and `<|endoftext|>` (49408 ids).
pub fn clip_vocab_and_merges() -> Result<(Vocab, Merges)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| tok_err("built-in CLIP BPE data", e))?;
    // The first line is a version header.
    let merges: Merges = text
        .split('\n')
        .skip(1)
        .take(CLIP_MERGES)
        .map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [a, b] => Ok((a.to_string(), b.to_string())),
                _ => Err(tok_err(
                    "built-in CLIP BPE data",
                    format!("bad merge line {line:?}"),
                )),
            },
        )
        .collect::<Result<_>>()?;
    if merges.len() != CLIP_MERGES {
        return Err(tok_err(
            "built-in CLIP BPE data",
            format!("{} merges, expected {CLIP_MERGES}", merges.len()),
        ));
    }
    let bytes: Vec<String> = bytes_to_unicode().into_iter().map(String::from).collect();
    let tokens = bytes
        .iter()
        .cloned()
        .chain(bytes.iter().map(|b| format!("{b}</w>")))
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain([BOS.to_string(), EOS.to_string()]);
    let vocab: Vocab = tokens.zip(0u32..).collect();
    // A repeated token would silently shift every later id.
    if vocab.len() != CLIP_VOCAB_SIZE {
        return Err(tok_err(
            "built-in CLIP BPE data",
            format!(
                "{} distinct tokens, expected {CLIP_VOCAB_SIZE}",
                vocab.len()
            ),
        ));
    }
    Ok((vocab, merges))
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
        let origin = dir.display().to_string();
        let (Some(vocab_s), Some(merges_s)) = (vocab.to_str(), merges.to_str()) else {
            return Err(tok_err(&origin, "path is not UTF-8"));
        };
        let (vocab_map, merges) = BPE::read_file(vocab_s, merges_s)
            .map_err(|e| tok_err(&vocab.display().to_string(), e))?;
        let pad = pad_token(dir)?;
        Self::build(
            vocab_map,
            merges,
            pad.as_deref().unwrap_or(EOS),
            max_len,
            &origin,
        )
    }

    /// CLIP's tokenizer from the vocabulary embedded in the binary ([`clip_vocab_and_merges`]),
    /// the same as a diffusers SD 1.x/2.x `tokenizer/` folder with that pad token.
    pub fn builtin(max_len: usize, pad: BuiltinPad) -> Result<Self> {
        let (vocab, merges) = clip_vocab_and_merges()?;
        let mut tokenizer = Self::build(
            vocab,
            merges,
            pad.token(),
            max_len,
            "built-in CLIP tokenizer",
        )?;
        tokenizer.builtin = Some(pad);
        Ok(tokenizer)
    }

    /// The one construction path of both sources; `origin` names the source in errors.
    fn build(
        vocab: Vocab,
        merges: Merges,
        pad: &str,
        max_len: usize,
        origin: &str,
    ) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::InvalidArgument(format!(
                "max_len {max_len} leaves no room for BOS/EOS"
            )));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| tok_err(origin, e))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| tok_err(origin, e))?
            .into(),
            Lowercase.into(),
        ])));
        inner.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            Split::new(
                SplitPattern::Regex(SPLIT_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(|e| tok_err(origin, e))?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // Special tokens written in a prompt are matched whole, before normalization, as in Python.
        // transformers makes the pad token special too: with SD 2.x's "!" every "!" in a prompt
        // becomes the pad id 0, not BPE's "!</w>" (diffusers issue #4153; OpenCLIP itself does
        // not do this, but the pipelines this crate matches do).
        let mut special = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
        if pad != BOS && pad != EOS {
            special.push(AddedToken::from(pad, true));
        }
        inner.add_special_tokens(&special);
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| tok_err(origin, format!("vocabulary has no `{t}`")))
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(pad)?);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
            builtin: None,
            triggers: Vec::new(),
        })
    }

    /// For the built-in vocabulary, which has no files: a label naming its data and pad token,
    /// for the model's content hash. `None` for a folder (its files are hashed).
    pub fn builtin_label(&self) -> Option<String> {
        self.builtin.map(|pad| {
            format!(
                "built-in CLIP tokenizer, bpe sha256 {CLIP_BPE_SHA256}, pad {}",
                pad.token()
            )
        })
    }

    /// The pad token's id.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `text` as the normalizer writes it (NFC, whitespace runs to one space, lowercase): the form
    /// in which triggers are compared.
    pub fn normalize(&self, text: &str) -> Result<String> {
        Ok(self.normalized(text)?.get().to_string())
    }

    fn normalized(&self, text: &str) -> Result<NormalizedString> {
        let mut normalized = NormalizedString::from(text);
        if let Some(n) = self.inner.get_normalizer() {
            n.normalize(&mut normalized)
                .map_err(|e| Error::Tokenizer(format!("cannot normalize {text:?}: {e}")))?;
        }
        Ok(normalized)
    }

    /// Whether `trigger` (compared normalized) is already a trigger.
    pub fn has_trigger(&self, trigger: &str) -> Result<bool> {
        let normalized = self.normalize(trigger)?;
        Ok(self.triggers.iter().any(|t| t.normalized == normalized))
    }

    /// Makes `trigger` stand for `ids` (a textual-inversion embedding's token ids) in prompts.
    pub fn add_trigger(&mut self, trigger: &str, ids: Vec<i64>) -> Result<()> {
        let normalized = self.normalize(trigger)?;
        if normalized.trim().is_empty() || ids.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "empty trigger {trigger:?} or no ids"
            )));
        }
        if self.triggers.iter().any(|t| t.normalized == normalized) {
            return Err(Error::InvalidArgument(format!(
                "trigger {trigger:?} is already in use"
            )));
        }
        self.triggers.push(Trigger { normalized, ids });
        // Stable: equally long triggers keep their order (they cannot both match at one place).
        self.triggers
            .sort_by_key(|t| std::cmp::Reverse(t.normalized.len()));
        Ok(())
    }

    /// The ids of `text` alone, without BOS/EOS, padding or truncation (for chunked prompts).
    pub fn encode_body(&self, text: &str) -> Result<Vec<i64>> {
        if self.triggers.is_empty() {
            return self.bpe(text);
        }
        Ok(self.encode_units(text)?.into_iter().flatten().collect())
    }

    /// [`encode_body`](Self::encode_body) in units: one id per token, and all the ids of a
    /// textual-inversion trigger in one unit (chunked prompts never split an embedding). Triggers
    /// are compared with the normalized text, so case does not matter (A1111's rule; see
    /// `find_triggers` for where they match).
    pub fn encode_units(&self, text: &str) -> Result<Vec<Vec<i64>>> {
        if self.triggers.is_empty() {
            return Ok(self.bpe(text)?.into_iter().map(|id| vec![id]).collect());
        }
        let normalized = self.normalized(text)?;
        let mut units = Vec::new();
        // Byte offset in `text` up to which it has been tokenized.
        let mut done = 0;
        for (range, trigger) in self.find_triggers(normalized.get()) {
            // Back to the original text, so everything between triggers is tokenized exactly as
            // it would be without them (special tokens are matched before normalization).
            let original = normalized
                .convert_offsets(NormRange::Normalized(range))
                .ok_or_else(|| Error::Tokenizer(format!("cannot align a trigger in {text:?}")))?;
            let before = text.get(done..original.start).ok_or_else(|| {
                Error::Tokenizer(format!("trigger off a character boundary in {text:?}"))
            })?;
            units.extend(self.bpe(before)?.into_iter().map(|id| vec![id]));
            units.push(trigger.ids.clone());
            done = original.end;
        }
        let rest = text.get(done..).unwrap_or_default();
        units.extend(self.bpe(rest)?.into_iter().map(|id| vec![id]));
        Ok(units)
    }

    /// Where triggers occur in normalized text, left to right, the longest at each place, none
    /// inside a longer run of letters: a trigger that starts with a letter needs a non-letter (or
    /// the start) before it, one that ends with a letter a non-letter (or the end) after it, as
    /// CLIP's pre-tokenizer splits words. `EasyNegative` matches in `(easynegative:1.2),` and
    /// `easynegative2` but not in `easynegatives`.
    fn find_triggers<'a>(&'a self, normalized: &str) -> Vec<(std::ops::Range<usize>, &'a Trigger)> {
        let mut found = Vec::new();
        let mut next = 0;
        let mut previous: Option<char> = None;
        for (at, c) in normalized.char_indices() {
            let glued_before = c.is_alphabetic() && previous.is_some_and(char::is_alphabetic);
            previous = Some(c);
            if at < next || glued_before {
                continue;
            }
            let rest = &normalized[at..];
            let hit = self.triggers.iter().find(|t| {
                rest.starts_with(&t.normalized) && {
                    let after = rest[t.normalized.len()..].chars().next();
                    let last = t.normalized.chars().next_back();
                    !(last.is_some_and(char::is_alphabetic)
                        && after.is_some_and(char::is_alphabetic))
                }
            });
            if let Some(t) = hit {
                next = at + t.normalized.len();
                found.push((at..next, t));
            }
        }
        found
    }

    /// BPE ids of `text` (no BOS/EOS).
    fn bpe(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize prompt: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// BOS, EOS and pad ids.
    pub fn special_ids(&self) -> (i64, i64, i64) {
        (self.bos as i64, self.eos as i64, self.pad as i64)
    }

    /// The id of a standalone comma (`,</w>`), where chunked prompts prefer to split.
    pub fn comma_id(&self) -> Option<i64> {
        self.inner.token_to_id(",</w>").map(i64::from)
    }

    /// Tokenizes one prompt to exactly `max_len` ids.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let body = self.encode_body(text)?;
        let room = self.max_len - 2;
        let kept = body.len().min(room);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos as i64);
        ids.extend(&body[..kept]);
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

    #[test]
    fn the_embedded_bpe_file_is_the_documented_one() {
        use sha2::{Digest, Sha256};
        assert_eq!(hex::encode(Sha256::digest(CLIP_BPE_GZ)), CLIP_BPE_SHA256);
        let readme = include_str!("../../data/clip/README.md");
        assert!(
            readme.contains(CLIP_BPE_SHA256),
            "README names another sha256"
        );
    }

    #[test]
    fn byte_symbols_are_clips_order() {
        let chars = bytes_to_unicode();
        assert_eq!(chars.len(), 256);
        assert_eq!(
            chars.iter().collect::<std::collections::HashSet<_>>().len(),
            256
        );
        // Printable bytes first, as themselves; then the rest from U+0100 in byte order.
        assert_eq!((chars[0], chars[93], chars[94]), ('!', '~', '¡'));
        assert_eq!(
            (chars[187], chars[188], chars[255]),
            ('ÿ', '\u{100}', '\u{143}')
        );
    }

    #[test]
    fn triggers_match_case_insensitively_as_whole_words_longest_first() {
        let mut tok = ClipTokenizer::builtin(12, BuiltinPad::Eos).unwrap();
        let plain = |t: &ClipTokenizer, s: &str| t.bpe(s).unwrap();
        let cat = plain(&tok, "cat");
        tok.add_trigger("EasyNegative", vec![50000, 50001]).unwrap();
        tok.add_trigger("<tiny-style>", vec![50002]).unwrap();
        tok.add_trigger("EasyNeg", vec![50003]).unwrap();
        let units = |s: &str| tok.encode_units(s).unwrap();
        // Any case; one unit for all of an embedding's vectors.
        assert_eq!(units("easynegative"), [vec![50000, 50001]]);
        assert_eq!(units("EASYNEGATIVE cat")[0], [50000, 50001]);
        // Longest first; punctuation, weights and digits around are no obstacle.
        assert_eq!(units("(easyneg:1.2)")[1], [50003]);
        assert_eq!(units("EasyNegative2").first(), Some(&vec![50000, 50001]));
        assert_eq!(
            units("x<tiny-style>y")[1],
            [50002],
            "not letter-edged: no boundary"
        );
        // Never inside a longer run of letters.
        for s in ["easynegatives", "theeasyneg", "EasyNegativeX"] {
            assert!(units(s).iter().all(|u| u.len() == 1 && u[0] < 49408), "{s}");
        }
        // Text around triggers is tokenized as without them, special tokens included.
        let text = "a  Cat, <|endoftext|> héllo";
        let without = ClipTokenizer::builtin(12, BuiltinPad::Eos).unwrap();
        assert_eq!(
            tok.encode_body(text).unwrap(),
            without.encode_body(text).unwrap()
        );
        let ids = tok.encode_body("A cat EasyNeg cat").unwrap();
        let expected: Vec<i64> = [plain(&tok, "a"), cat.clone(), vec![50003], cat.clone()].concat();
        assert_eq!(ids, expected);
        // Normalization that changes lengths (İ lowercases to two characters, e + U+0301
        // composes) does not shift what is around a trigger.
        for (head, tail) in [("İİ ", " x"), ("e\u{301}\u{301} ", "\t\tx")] {
            let text = format!("{head}EasyNeg{tail}");
            let got = units(&text);
            let at = got.iter().position(|u| u == &[50003]).expect(&text);
            let flat = |u: &[Vec<i64>]| u.iter().flatten().copied().collect::<Vec<_>>();
            assert_eq!(flat(&got[..at]), plain(&tok, head), "{text}");
            assert_eq!(flat(&got[at + 1..]), plain(&tok, tail), "{text}");
        }
        // A plain prompt is truncated after expansion (as diffusers: 12 positions, 10 tokens).
        let t = tok
            .encode("easynegative easynegative easynegative easynegative easynegative easynegative")
            .unwrap();
        assert_eq!((t.ids.len(), t.truncated), (12, 2));
        // Triggers are unique whatever their case.
        assert!(tok.add_trigger("easynegative", vec![1]).is_err());
        assert!(tok.has_trigger("EASYNEG").unwrap());
        assert!(tok.add_trigger("  ", vec![1]).is_err());
    }

    #[test]
    fn builtin_vocabulary_has_clips_ids_and_pads_as_asked() {
        let (vocab, merges) = clip_vocab_and_merges().unwrap();
        assert_eq!((vocab.len(), merges.len()), (CLIP_VOCAB_SIZE, 48894));
        for (token, id) in [("!", 0), ("!</w>", 256), (BOS, 49406), (EOS, 49407)] {
            assert_eq!(vocab[token], id, "{token}");
        }
        // The first merge's token follows the 512 byte symbols.
        assert_eq!(vocab[&format!("{}{}", merges[0].0, merges[0].1)], 512);

        let sd1 = ClipTokenizer::builtin(8, BuiltinPad::Eos).unwrap();
        let sd2 = ClipTokenizer::builtin(8, BuiltinPad::Bang).unwrap();
        assert_eq!((sd1.pad_id(), sd2.pad_id()), (49407, 0));
        // transformers' CLIPTokenizer on the SD 1.x vocabulary: "hello" 3306, "!" 256.
        let ids = sd1.encode("Hello!").unwrap().ids;
        assert_eq!(ids, [49406, 3306, 256, 49407, 49407, 49407, 49407, 49407]);
        assert_eq!(
            sd2.encode("Hello").unwrap().ids,
            [49406, 3306, 49407, 0, 0, 0, 0, 0]
        );
        assert!(sd1.builtin_label().unwrap().contains(CLIP_BPE_SHA256));
        assert_ne!(sd1.builtin_label(), sd2.builtin_label());
    }
}
