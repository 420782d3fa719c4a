//! AUTOMATIC1111's prompt-emphasis syntax (`modules/prompt_parser.py`, `parse_prompt_attention`):
//! `(text)` multiplies the attention weight by 1.1, `[text]` divides it by 1.1, `(text:1.3)` sets a
//! factor explicitly, nesting multiplies, `\(` `\)` `\[` `\]` `\\` are literal brackets and
//! backslashes, and a standalone `BREAK` starts a new 75-token chunk.
//!
//! One deliberate difference: A1111 closes unbalanced brackets silently (and treats a stray `)` or
//! `]` as text). A prompt queued for a batch run cannot ask what was meant, so an unbalanced
//! bracket is refused with its position instead ([`parse`]).

use crate::error::{Error, Result};

/// `(text)` multiplies by this, `[text]` divides by it.
const ROUND: f64 = 1.1;
/// Accepted factors of `(text:w)`, and of the product of nested brackets. A1111 has no limit, but
/// a weight outside this range is a typo (`(x:13)` for `(x:1.3)`) that would wreck the image.
pub const MAX_ABS_WEIGHT: f64 = 10.0;

/// How a prompt's text is read.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// Plain text, at most 75 tokens (more are truncated), exactly as diffusers encodes it.
    #[default]
    Plain,
    /// AUTOMATIC1111's emphasis syntax and long prompts in 75-token chunks.
    A1111,
}

impl PromptSyntax {
    pub const NAMES: [&'static str; 2] = ["plain", "a1111"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::A1111 => "a1111",
        }
    }
}

impl std::str::FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "plain" => Ok(Self::Plain),
            "a1111" => Ok(Self::A1111),
            _ => Err(Error::InvalidArgument(format!(
                "prompt syntax must be one of {:?}, got {s:?}",
                Self::NAMES
            ))),
        }
    }
}

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Fragment {
    /// Text and its attention weight.
    Text(String, f64),
    /// `BREAK`: the next text starts a new chunk.
    Break,
}

/// A lexical token of the syntax, in the order A1111's regular expression tries them.
enum Lex<'a> {
    Literal(&'a str),
    Open(char),
    Close(char),
    /// `:w)` closing a round bracket with an explicit weight.
    WeightClose(&'a str),
    Text(&'a str),
}

/// Splits at the next token. `s` is non-empty.
fn next_token(s: &str) -> (Lex<'_>, usize) {
    let mut chars = s.chars();
    let Some(c) = chars.next() else {
        return (Lex::Text(""), 0);
    };
    match c {
        '\\' => match chars.next() {
            Some(e @ ('(' | ')' | '[' | ']' | '\\')) => (Lex::Literal(&s[1..1 + e.len_utf8()]), 2),
            // A1111 drops a backslash that escapes nothing; so do we.
            _ => (Lex::Literal(""), 1),
        },
        '(' | '[' => (Lex::Open(c), 1),
        ')' | ']' => (Lex::Close(c), 1),
        ':' => match weight_close(s) {
            Some((w, len)) => (Lex::WeightClose(w), len),
            None => (Lex::Text(":"), 1),
        },
        _ => {
            let end = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (Lex::Text(&s[..end]), end)
        }
    }
}

/// Matches `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the number's text and the match length.
fn weight_close(s: &str) -> Option<(&str, usize)> {
    let body = s[1..].trim_start();
    let sign = usize::from(body.starts_with(['+', '-']));
    let digits = body[sign..]
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len() - sign);
    if digits == 0 {
        return None;
    }
    let number = &body[..sign + digits];
    let rest = body[sign + digits..].trim_start();
    rest.starts_with(')')
        .then(|| (number, s.len() - rest.len() + 1))
}

/// Splits text at standalone `BREAK` words, dropping the whitespace around them (A1111's
/// `\s*\bBREAK\b\s*`).
fn split_breaks(text: &str, out: &mut Vec<(Fragment, usize)>, at: usize) {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut rest = text;
    let mut offset = 0;
    loop {
        let found = rest.match_indices("BREAK").find(|&(i, _)| {
            !rest[..i].chars().next_back().is_some_and(word)
                && !rest[i + 5..].chars().next().is_some_and(word)
        });
        let Some((i, _)) = found else {
            out.push((Fragment::Text(rest.to_string(), 1.0), at + offset));
            return;
        };
        out.push((
            Fragment::Text(rest[..i].trim_end().to_string(), 1.0),
            at + offset,
        ));
        out.push((Fragment::Break, at + offset + i));
        let after = &rest[i + 5..];
        let trimmed = after.trim_start();
        offset += i + 5 + after.len() - trimmed.len();
        rest = trimmed;
    }
}

fn syntax_error(text: &str, byte: usize, what: &str) -> Error {
    // Positions are 1-based characters, as an editor shows them.
    let column = text[..byte].chars().count() + 1;
    Error::InvalidArgument(format!("prompt syntax: {what} at character {column}"))
}

/// Parses `text` into weighted fragments, adjacent equal weights merged, as A1111's
/// `parse_prompt_attention`; errors on an unbalanced bracket or a weight that is not a finite
/// number within ±[`MAX_ABS_WEIGHT`].
pub fn parse(text: &str) -> Result<Vec<Fragment>> {
    // Each fragment with the byte offset it came from (for weight errors).
    let mut res: Vec<(Fragment, usize)> = Vec::new();
    // Open brackets: (kind, byte position, index in `res` where their range starts).
    let mut open: Vec<(char, usize, usize)> = Vec::new();
    let multiply = |res: &mut Vec<(Fragment, usize)>, from: usize, by: f64| {
        for (f, _) in &mut res[from..] {
            if let Fragment::Text(_, w) = f {
                *w *= by;
            }
        }
    };
    let mut pos = 0;
    while pos < text.len() {
        let (lex, len) = next_token(&text[pos..]);
        match lex {
            Lex::Literal(s) => res.push((Fragment::Text(s.to_string(), 1.0), pos)),
            Lex::Open(c) => open.push((c, pos, res.len())),
            Lex::Close(c) => {
                let want = if c == ')' { '(' } else { '[' };
                match open.pop() {
                    Some((k, _, from)) if k == want => {
                        multiply(&mut res, from, if c == ')' { ROUND } else { 1.0 / ROUND })
                    }
                    Some((k, at, _)) => {
                        return Err(syntax_error(
                            text,
                            pos,
                            &format!(
                                "`{c}` closes the `{k}` opened at character {}",
                                text[..at].chars().count() + 1
                            ),
                        ));
                    }
                    None => {
                        return Err(syntax_error(
                            text,
                            pos,
                            &format!("unbalanced `{c}` (escape a literal one as `\\{c}`)"),
                        ));
                    }
                }
            }
            Lex::WeightClose(w) => {
                let weight: f64 = w
                    .parse()
                    .map_err(|_| syntax_error(text, pos, &format!("`{w}` is not a number")))?;
                if !weight.is_finite() || weight.abs() > MAX_ABS_WEIGHT {
                    return Err(syntax_error(
                        text,
                        pos,
                        &format!("weight {w} outside -{MAX_ABS_WEIGHT}..={MAX_ABS_WEIGHT}"),
                    ));
                }
                match open.pop() {
                    Some(('(', _, from)) => multiply(&mut res, from, weight),
                    Some((k, at, _)) => {
                        return Err(syntax_error(
                            text,
                            pos,
                            &format!(
                                "`:{w})` closes the `{k}` opened at character {}",
                                text[..at].chars().count() + 1
                            ),
                        ));
                    }
                    None => {
                        return Err(syntax_error(
                            text,
                            pos,
                            &format!("`:{w})` without an opening `(`"),
                        ));
                    }
                }
            }
            Lex::Text(s) => split_breaks(s, &mut res, pos),
        }
        pos += len.max(1);
    }
    if let Some((k, at, _)) = open.pop() {
        return Err(syntax_error(
            text,
            at,
            &format!("unbalanced `{k}` is never closed"),
        ));
    }
    // Nesting multiplies, so the product can leave the range each factor was in.
    if let Some((_, at)) = res.iter().find(
        |(f, _)| matches!(f, Fragment::Text(_, w) if !w.is_finite() || w.abs() > MAX_ABS_WEIGHT),
    ) {
        return Err(syntax_error(
            text,
            *at,
            &format!("nested weights multiply to more than {MAX_ABS_WEIGHT}"),
        ));
    }
    let mut merged: Vec<Fragment> = Vec::with_capacity(res.len());
    for (f, _) in res {
        match (merged.last_mut(), f) {
            (Some(Fragment::Text(prev, pw)), Fragment::Text(s, w)) if *pw == w => prev.push_str(&s),
            (_, f) => merged.push(f),
        }
    }
    if merged.is_empty() {
        merged.push(Fragment::Text(String::new(), 1.0));
    }
    Ok(merged)
}

/// A1111's `comma_padding_backtrack` default: a chunk that fills up within this many tokens of a
/// comma ends at the comma instead, moving the words after it to the next chunk.
pub const COMMA_BACKTRACK: usize = 20;

/// One chunk's prompt tokens (at most the chunk length, without BOS/EOS/padding) and their weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chunk {
    pub ids: Vec<i64>,
    pub weights: Vec<f64>,
}

/// Splits parsed fragments into chunks of at most `len` tokens as A1111's `tokenize_line` does:
/// each fragment is tokenized on its own (`tokenize`: ids without BOS/EOS, in units: one token, or
/// the vectors of one textual-inversion embedding), `BREAK` closes the current chunk (even an empty
/// one), and a full chunk whose last comma (`comma`) is within [`COMMA_BACKTRACK`] tokens of its
/// end moves what follows the comma to the next chunk. A unit is never split: an embedding that
/// does not fit in what is left of a chunk starts the next one, as in A1111. Always at least one
/// chunk.
pub fn chunks(
    fragments: &[Fragment],
    len: usize,
    comma: Option<i64>,
    mut tokenize: impl FnMut(&str) -> Result<Vec<Vec<i64>>>,
) -> Result<Vec<Chunk>> {
    let mut done: Vec<Chunk> = Vec::new();
    let mut chunk = Chunk::default();
    // Index in `chunk` of its last comma.
    let mut last_comma: Option<usize> = None;
    for fragment in fragments {
        let (text, weight) = match fragment {
            Fragment::Break => {
                done.push(std::mem::take(&mut chunk));
                last_comma = None;
                continue;
            }
            Fragment::Text(text, weight) => (text, *weight),
        };
        for unit in tokenize(text)? {
            let Some(&id) = unit.first() else { continue };
            if unit.len() > len {
                return Err(Error::InvalidArgument(format!(
                    "an embedding of {} vectors cannot fit in a chunk of {len} tokens",
                    unit.len()
                )));
            }
            if Some(id) == comma && unit.len() == 1 {
                last_comma = Some(chunk.ids.len());
            } else if let Some(c) =
                last_comma.filter(|&c| chunk.ids.len() == len && len - c <= COMMA_BACKTRACK)
            {
                let moved = Chunk {
                    ids: chunk.ids.split_off(c + 1),
                    weights: chunk.weights.split_off(c + 1),
                };
                done.push(std::mem::replace(&mut chunk, moved));
                last_comma = None;
            }
            // A full chunk, or one too full for all of an embedding's vectors, is done.
            if chunk.ids.len() + unit.len() > len {
                done.push(std::mem::take(&mut chunk));
                last_comma = None;
            }
            chunk.ids.extend(&unit);
            chunk
                .weights
                .extend(std::iter::repeat_n(weight, unit.len()));
        }
    }
    if !chunk.ids.is_empty() || done.is_empty() {
        done.push(chunk);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Fragment {
        Fragment::Text(s.into(), w)
    }

    fn ok(s: &str) -> Vec<Fragment> {
        parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match parse(s) {
            Ok(f) => panic!("{s:?} parsed as {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The examples in A1111's `parse_prompt_attention` docstring (the exact floats it prints).
    #[test]
    fn a1111_documented_examples() {
        assert_eq!(ok("normal text"), [t("normal text", 1.0)]);
        assert_eq!(
            ok("an (important) word"),
            [t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]
        );
        assert_eq!(ok("(unnecessary)(parens)"), [t("unnecessaryparens", 1.1)]);
        assert_eq!(
            ok("a (large) dog"),
            [t("a ", 1.0), t("large", 1.1), t(" dog", 1.0)]
        );
        assert_eq!(
            ok("a (large:1.3) dog"),
            [t("a ", 1.0), t("large", 1.3), t(" dog", 1.0)]
        );
        assert_eq!(ok("\\(literal\\]"), [t("(literal]", 1.0)]);
        assert_eq!(ok("\\\\"), [t("\\", 1.0)]);
        assert_eq!(
            ok("(((a:1.3) [b]) c)"),
            // 1.1 * 1.1 / 1.1 is exactly 1.1 in f64, so "b" merges with " c".
            [t("a", 1.3 * 1.1 * 1.1), t(" ", 1.1 * 1.1), t("b c", 1.1)]
        );
        // A1111's docstring example leaves one `(` open, which A1111 closes at the end; written
        // with that `)` it gives A1111's exact output, and without it we refuse it.
        let example = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).";
        assert_eq!(
            ok(&format!("{example})")),
            [
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ]
        );
        assert!(err(example).contains("character 3"), "{}", err(example));
    }

    #[test]
    fn square_brackets_nesting_and_merging() {
        assert_eq!(ok("[a]"), [t("a", 1.0 / 1.1)]);
        assert_eq!(ok("[[a]]"), [t("a", 1.0 / 1.1 / 1.1)]);
        assert_eq!(ok("(a)[b]"), [t("a", 1.1), t("b", 1.0 / 1.1)]);
        assert_eq!(ok("([a])"), [t("a", 1.0 / 1.1 * 1.1)]);
        assert_eq!(ok("( a : 0.5 )"), [t(" a ", 0.5)]);
        assert_eq!(ok("(a:-1)"), [t("a", -1.0)]);
        // A colon that is not a weight is text.
        assert_eq!(ok("(a:b)"), [t("a:b", 1.1)]);
        assert_eq!(ok("ratio 16:9"), [t("ratio 16:9", 1.0)]);
        assert_eq!(ok(""), [t("", 1.0)]);
        assert_eq!(ok("()"), [t("", 1.0)]);
        // A backslash escaping nothing is dropped, as in A1111.
        assert_eq!(ok("a\\b"), [t("ab", 1.0)]);
    }

    #[test]
    fn break_starts_a_chunk_only_as_a_word() {
        assert_eq!(
            ok("a cat BREAK (a dog)"),
            [
                t("a cat", 1.0),
                Fragment::Break,
                t("", 1.0),
                t("a dog", 1.1)
            ]
        );
        assert_eq!(ok("BREAKFAST break"), [t("BREAKFAST break", 1.0)]);
        assert_eq!(
            ok("x,BREAK,y"),
            [t("x,", 1.0), Fragment::Break, t(",y", 1.0)]
        );
    }

    #[test]
    fn unbalanced_and_bad_weights_are_refused_with_a_position() {
        assert!(err("(unbalanced").contains("`(` is never closed at character 1"));
        assert!(err("a [b").contains("character 3"));
        assert!(err("a) b").contains("unbalanced `)` (escape"));
        assert!(err("a) b").contains("character 2"));
        assert!(err("a]").contains("character 2"));
        assert!(err("(a]").contains("`]` closes the `(` opened at character 1"));
        assert!(err("[a:1.2)").contains("closes the `[`"));
        assert!(err("a:1.2)").contains("without an opening"));
        assert!(err("(a:1.2.3)").contains("`1.2.3` is not a number"));
        assert!(err("(a:.)").contains("not a number"));
        assert!(err("(a:11)").contains("outside"));
        assert!(err("((((a:9))))").contains("multiply to more than"));
    }

    /// Whitespace-separated numbers as ids, one unit each; "," is the comma id 0; `a+b+c` is one
    /// unit of several ids (an embedding's vectors).
    fn numbers(text: &str) -> Result<Vec<Vec<i64>>> {
        Ok(text
            .split_whitespace()
            .map(|w| {
                w.split('+')
                    .map(|n| if n == "," { 0 } else { n.parse().unwrap_or(-1) })
                    .collect()
            })
            .collect())
    }

    #[test]
    fn an_embeddings_vectors_are_never_split_across_chunks() {
        let ids = |c: &[Chunk]| c.iter().map(|c| c.ids.clone()).collect::<Vec<_>>();
        // Two vectors, one place left: the chunk is closed short and the embedding moves on.
        let c = chunks(&[t("1 2 3 8+9 4", 1.2)], 4, None, numbers).unwrap();
        assert_eq!(ids(&c), [vec![1, 2, 3], vec![8, 9, 4]]);
        assert_eq!(c[1].weights, [1.2; 3]);
        // Exactly fitting: it stays.
        let c = chunks(&[t("1 2 8+9 3", 1.0)], 4, None, numbers).unwrap();
        assert_eq!(ids(&c), [vec![1, 2, 8, 9], vec![3]]);
        // Longer than a chunk: refused rather than cut.
        let e = chunks(&[t("1+2+3+4+5", 1.0)], 4, None, numbers).unwrap_err();
        assert!(e.to_string().contains("5 vectors"), "{e}");
    }

    #[test]
    fn chunks_split_at_the_length_at_break_and_back_to_a_near_comma() {
        let text = |range: std::ops::Range<i64>| {
            range.map(|i| i.to_string()).collect::<Vec<_>>().join(" ")
        };
        let ids = |c: &[Chunk]| c.iter().map(|c| c.ids.clone()).collect::<Vec<_>>();
        // 7 tokens in chunks of 3, weights carried along.
        let c = chunks(&[t(&text(1..8), 1.5)], 3, Some(0), numbers).unwrap();
        assert_eq!(ids(&c), [vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        assert_eq!(c[0].weights, [1.5; 3]);
        // BREAK closes even an empty chunk; an empty prompt is one empty chunk.
        let c = chunks(&[Fragment::Break, t("1", 1.0)], 3, None, numbers).unwrap();
        assert_eq!(ids(&c), [vec![], vec![1]]);
        assert_eq!(
            ids(&chunks(&[t("", 1.0)], 3, None, numbers).unwrap()),
            [Vec::<i64>::new()]
        );
        // Exactly full: no trailing empty chunk.
        assert_eq!(
            ids(&chunks(&[t("1 2 3", 1.0)], 3, None, numbers).unwrap()),
            [vec![1, 2, 3]]
        );
        // A full chunk with a comma within reach ends after the comma.
        let c = chunks(&[t("1 , 2 3 4 5", 1.0), t("6", 2.0)], 5, Some(0), numbers).unwrap();
        assert_eq!(ids(&c), [vec![1, 0], vec![2, 3, 4, 5, 6]]);
        assert_eq!(c[1].weights, [1.0, 1.0, 1.0, 1.0, 2.0]);
        // Too far back (more than 20 tokens): a plain split.
        let long = format!("1 , {}", text(2..30));
        let c = chunks(&[t(&long, 1.0)], 25, Some(0), numbers).unwrap();
        assert_eq!(c[0].ids.len(), 25);
    }
}
