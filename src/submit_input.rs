//! Producer-side input for `sdbatch submit`: prompt files (`.txt`, `.jsonl`, `.csv`), prompt
//! templates with variables, and splitting the items into batch messages.
//!
//! Every file error names the file and line ([`Error::PromptFile`]).
use crate::error::{Error, Result};
use crate::message::{
    BatchMessage, MessageItem, MessageOutput, MessageParams, SCHEMA_VERSION, is_valid_batch_id,
};
use crate::prompts::is_safe_id;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Most items one template may expand to.
pub const MAX_TEMPLATE_ITEMS: usize = 100_000;

/// One prompt to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitItem {
    pub id: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub num_images: Option<u32>,
}

impl From<SubmitItem> for MessageItem {
    fn from(i: SubmitItem) -> Self {
        MessageItem {
            id: i.id,
            prompt: i.prompt,
            negative_prompt: i.negative_prompt,
            seed: i.seed,
            num_images: i.num_images,
            init_image: None,
            mask_image: None,
        }
    }
}

/// Prompt file formats, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// One prompt a line; blank lines skipped.
    Txt,
    /// One JSON object a line: `prompt`, optional `id`, `negative_prompt`, `seed`, `num_images`.
    Jsonl,
    /// Header row, then one prompt a row; columns `prompt` (required), `id`, `negative_prompt`,
    /// `seed`, `num_images`.
    Csv,
}

impl InputFormat {
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("txt") => Ok(InputFormat::Txt),
            Some("jsonl") => Ok(InputFormat::Jsonl),
            Some("csv") => Ok(InputFormat::Csv),
            _ => Err(Error::InvalidArgument(format!(
                "{}: prompts file must end in .txt, .jsonl or .csv",
                path.display()
            ))),
        }
    }
}

/// Reads a prompt file; the format comes from the extension. Items without an id get
/// `p0001`, `p0002`, … by their position among the file's items.
pub fn read_items(path: &Path) -> Result<Vec<SubmitItem>> {
    let format = InputFormat::from_path(path)?;
    let text = read_text(path)?;
    parse_items(path, &text, format)
}

/// Parses prompt-file text; `path` only names the file in errors.
pub fn parse_items(path: &Path, text: &str, format: InputFormat) -> Result<Vec<SubmitItem>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rows = match format {
        InputFormat::Txt => txt_rows(text),
        InputFormat::Jsonl => jsonl_rows(path, text)?,
        InputFormat::Csv => csv_rows(path, text)?,
    };
    finish_rows(path, rows)
}

/// One entry before ids are assigned, with its 1-based line.
struct Row {
    line: usize,
    id: Option<String>,
    prompt: String,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    num_images: Option<u32>,
}

fn line_error(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::PromptFile {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn txt_rows(text: &str) -> Vec<Row> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Row {
            line: i + 1,
            id: None,
            prompt: l.trim().to_string(),
            negative_prompt: None,
            seed: None,
            num_images: None,
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    prompt: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    num_images: Option<u32>,
}

fn jsonl_rows(path: &Path, text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let j: JsonLine = serde_json::from_str(raw)
            .map_err(|e| line_error(path, i + 1, format!("invalid JSON line: {e}")))?;
        rows.push(Row {
            line: i + 1,
            id: j.id,
            prompt: j.prompt,
            negative_prompt: j.negative_prompt,
            seed: j.seed,
            num_images: j.num_images,
        });
    }
    Ok(rows)
}

const CSV_COLUMNS: [&str; 5] = ["prompt", "id", "negative_prompt", "seed", "num_images"];

/// The 1-based line a CSV record starts on. The csv crate's positions point just past the
/// previous record (before any blank lines it skipped) and count lines differently for `\r\n`,
/// so the line is counted here from the byte offset, after skipping line breaks.
fn csv_line(text: &str, pos: Option<&csv::Position>) -> usize {
    let Some(pos) = pos else { return 1 };
    let start = (pos.byte() as usize).min(text.len());
    let skipped = text.as_bytes()[start..]
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    1 + text.as_bytes()[..start + skipped]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn csv_rows(path: &Path, text: &str) -> Result<Vec<Row>> {
    let csv_error = |e: csv::Error| {
        let line = csv_line(text, e.position());
        line_error(path, line, format!("invalid CSV: {e}"))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(csv_error)?.clone();
    let header_line = csv_line(text, headers.position());
    if headers.iter().all(str::is_empty) {
        return Err(line_error(path, header_line, "missing header row"));
    }
    // Column index of each known name.
    let mut columns: HashMap<&str, usize> = HashMap::new();
    for (i, name) in headers.iter().enumerate() {
        let Some(known) = CSV_COLUMNS.iter().find(|c| **c == name) else {
            return Err(line_error(
                path,
                header_line,
                format!(
                    "unknown column `{name}` (known: {})",
                    CSV_COLUMNS.join(", ")
                ),
            ));
        };
        if columns.insert(known, i).is_some() {
            return Err(line_error(
                path,
                header_line,
                format!("column `{name}` appears twice"),
            ));
        }
    }
    if !columns.contains_key("prompt") {
        return Err(line_error(
            path,
            header_line,
            "missing column `prompt` (the header row names the columns)",
        ));
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = csv_line(text, record.position());
        let cell = |name: &str| -> Option<&str> {
            columns
                .get(name)
                .and_then(|&i| record.get(i))
                .filter(|s| !s.is_empty())
        };
        let number = |name: &str| -> Result<Option<u64>> {
            cell(name)
                .map(|s| {
                    s.parse::<u64>().map_err(|_| {
                        line_error(
                            path,
                            line,
                            format!("{name} `{s}` is not a non-negative integer"),
                        )
                    })
                })
                .transpose()
        };
        let num_images = number("num_images")?
            .map(|n| {
                u32::try_from(n)
                    .map_err(|_| line_error(path, line, format!("num_images {n} is too large")))
            })
            .transpose()?;
        rows.push(Row {
            line,
            id: cell("id").map(str::to_string),
            prompt: cell("prompt").unwrap_or("").to_string(),
            negative_prompt: cell("negative_prompt").map(str::to_string),
            seed: number("seed")?,
            num_images,
        });
    }
    Ok(rows)
}

/// Checks a prompt-like text for `what`: non-empty unless `may_be_empty`, no control characters
/// other than whitespace. Lengths are the worker's limits, checked by [`crate::message::validate`].
fn check_text(text: &str, what: &str, may_be_empty: bool) -> std::result::Result<(), String> {
    if !may_be_empty && text.trim().is_empty() {
        return Err(format!("empty {what}"));
    }
    if text.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

fn check_id(id: &str) -> std::result::Result<(), String> {
    if !is_safe_id(id) {
        return Err(format!(
            "id `{id}` must match [A-Za-z0-9_.-]{{1,128}} and not be `.` or `..`"
        ));
    }
    if crate::message::RESERVED_ITEM_IDS.contains(&id) {
        return Err(format!("id `{id}` is reserved for the batch's own objects"));
    }
    Ok(())
}

fn finish_rows(path: &Path, rows: Vec<Row>) -> Result<Vec<SubmitItem>> {
    if rows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no prompts",
            path.display()
        )));
    }
    let mut used: HashMap<String, usize> = HashMap::new();
    let mut items = Vec::with_capacity(rows.len());
    for (index, row) in rows.into_iter().enumerate() {
        let err = |m: String| line_error(path, row.line, m);
        check_text(&row.prompt, "prompt", false).map_err(err)?;
        if let Some(neg) = &row.negative_prompt {
            check_text(neg, "negative_prompt", true).map_err(err)?;
        }
        if row.num_images == Some(0) {
            return Err(err("num_images must be at least 1".into()));
        }
        let (id, automatic) = match row.id {
            Some(id) => (id, false),
            None => (format!("p{:04}", index + 1), true),
        };
        check_id(&id).map_err(err)?;
        if let Some(first) = used.insert(id.clone(), row.line) {
            let what = if automatic { "automatic id" } else { "id" };
            return Err(err(format!("{what} `{id}` already used on line {first}")));
        }
        items.push(SubmitItem {
            id,
            prompt: row.prompt,
            negative_prompt: row.negative_prompt,
            seed: row.seed,
            num_images: row.num_images,
        });
    }
    Ok(items)
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `--var NAME=a,b,c` (comma-separated, trimmed, no empty values) or `--var NAME=@FILE`
/// (one value a line, blank lines skipped; a relative `FILE` is relative to `base_dir`).
pub fn parse_var(spec: &str, base_dir: &Path) -> Result<(String, Vec<String>)> {
    let bad = |m: String| Error::InvalidArgument(format!("--var {spec:?}: {m}"));
    let Some((name, value)) = spec.split_once('=') else {
        return Err(bad("expected NAME=v1,v2,… or NAME=@FILE".into()));
    };
    let name = name.trim();
    if !is_var_name(name) {
        return Err(bad(format!(
            "variable name `{name}` must match [A-Za-z_][A-Za-z0-9_]*"
        )));
    }
    let values = if let Some(file) = value.strip_prefix('@') {
        let path: PathBuf = base_dir.join(file.trim());
        let text = read_text(&path)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut values = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let v = raw.trim();
            if v.is_empty() {
                continue;
            }
            check_text(v, "value", false).map_err(|m| line_error(&path, i + 1, m))?;
            values.push(v.to_string());
        }
        if values.is_empty() {
            return Err(bad(format!("{} has no values", path.display())));
        }
        values
    } else {
        let mut values = Vec::new();
        for (i, v) in value.split(',').enumerate() {
            let v = v.trim();
            if v.is_empty() {
                return Err(bad(format!("value {} is empty", i + 1)));
            }
            check_text(v, "value", false).map_err(bad)?;
            values.push(v.to_string());
        }
        values
    };
    Ok((name.to_string(), values))
}

enum Piece<'a> {
    Text(String),
    Var(&'a str),
}

/// Splits a template into text and `{name}` placeholders; `{{` and `}}` are literal braces.
fn parse_template(template: &str) -> Result<Vec<Piece<'_>>> {
    let bad = |m: String| Error::InvalidArgument(format!("template: {m}"));
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        text.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            text.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if tail.starts_with('}') {
            return Err(bad(format!(
                "unmatched `}}` at byte {} (write `}}}}` for a literal brace)",
                template.len() - tail.len()
            )));
        } else {
            let Some(end) = tail.find('}') else {
                return Err(bad(format!(
                    "unclosed `{{` at byte {} (write `{{{{` for a literal brace)",
                    template.len() - tail.len()
                )));
            };
            let name = &tail[1..end];
            if !is_var_name(name) {
                return Err(bad(format!(
                    "placeholder `{{{name}}}`: names must match [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Var(name));
            rest = &tail[end + 1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Expands `template` over the cartesian product of `vars` (the first variable varies slowest).
/// Every `{name}` needs a variable and every variable must be used. Items get ids `t0001`, … and
/// no seed (the worker derives one from the batch and item ids).
pub fn expand_template(template: &str, vars: &[(String, Vec<String>)]) -> Result<Vec<SubmitItem>> {
    let bad = |m: String| Error::InvalidArgument(format!("template: {m}"));
    let pieces = parse_template(template)?;
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, (name, values)) in vars.iter().enumerate() {
        if index.insert(name, i).is_some() {
            return Err(bad(format!("variable `{name}` given twice")));
        }
        if values.is_empty() {
            return Err(bad(format!("variable `{name}` has no values")));
        }
    }
    let mut used = vec![false; vars.len()];
    for p in &pieces {
        if let Piece::Var(name) = p {
            match index.get(name) {
                Some(&i) => used[i] = true,
                None => {
                    return Err(bad(format!(
                        "placeholder `{{{name}}}` has no --var {name}=…"
                    )));
                }
            }
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(bad(format!(
            "variable `{}` is not used by the template",
            vars[i].0
        )));
    }
    let total = vars
        .iter()
        .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
        .filter(|&n| n <= MAX_TEMPLATE_ITEMS)
        .ok_or_else(|| {
            let sizes: Vec<String> = vars
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.len()))
                .collect();
            bad(format!(
                "expands to more than {MAX_TEMPLATE_ITEMS} prompts ({})",
                sizes.join(" × ")
            ))
        })?;

    let mut items = Vec::with_capacity(total);
    let mut choice = vec![0usize; vars.len()];
    for k in 0..total {
        let mut prompt = String::new();
        for p in &pieces {
            match p {
                Piece::Text(t) => prompt.push_str(t),
                Piece::Var(name) => {
                    let i = index[name];
                    prompt.push_str(&vars[i].1[choice[i]]);
                }
            }
        }
        check_text(&prompt, "prompt", false)
            .map_err(|m| bad(format!("prompt {} ({prompt:?}): {m}", k + 1)))?;
        items.push(SubmitItem {
            id: format!("t{:04}", k + 1),
            prompt,
            negative_prompt: None,
            seed: None,
            num_images: None,
        });
        // Odometer: the last variable turns fastest.
        for i in (0..vars.len()).rev() {
            choice[i] += 1;
            if choice[i] < vars[i].1.len() {
                break;
            }
            choice[i] = 0;
        }
    }
    Ok(items)
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// How `into_messages` cuts a list of items into messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Items per message at most.
    pub max_items: usize,
    /// Work per message at most, in image-steps-megapixels ([`crate::message::work_units`]): the
    /// worker's `max_message_work`, so no message is refused as `too_much_work`.
    pub max_work: f64,
    /// Work of one image at the batch's parameters.
    pub work_per_image: f64,
}

/// Splits `items` into messages of at most `split.max_items` items and `split.max_work` work, in
/// order, with batch ids `{batch_prefix}-0001`, `{batch_prefix}-0002`, …, each carrying `params`
/// and `output` (left out of the JSON when empty).
///
/// The worker's other limits (images per message, prompt length, buckets) are not checked here:
/// run [`crate::message::validate`] on each message with the worker's limits for that.
pub fn into_messages(
    items: Vec<SubmitItem>,
    split: Split,
    batch_prefix: &str,
    params: &MessageParams,
    output: &MessageOutput,
) -> Result<Vec<BatchMessage>> {
    if split.max_items == 0 {
        return Err(Error::InvalidArgument(
            "batch size must be at least 1".into(),
        ));
    }
    if items.is_empty() {
        return Err(Error::InvalidArgument("no prompts to submit".into()));
    }
    let item_work = |i: &SubmitItem| f64::from(i.num_images.unwrap_or(1)) * split.work_per_image;
    if let Some((index, item)) = items
        .iter()
        .enumerate()
        .find(|(_, i)| item_work(i) > split.max_work)
    {
        return Err(Error::InvalidArgument(format!(
            "item {} ({}) alone is {:.0} image-steps-megapixels, over the {:.0} a message may hold: \
             ask for fewer images, steps or pixels",
            index + 1,
            item.id,
            item_work(item),
            split.max_work
        )));
    }
    // Greedy, in order: a message closes when the next item would break either limit.
    let mut chunks: Vec<Vec<MessageItem>> = Vec::new();
    let mut work = 0.0;
    for item in items {
        let w = item_work(&item);
        let full = chunks
            .last()
            .is_none_or(|c| c.len() >= split.max_items || work + w > split.max_work);
        if full {
            chunks.push(Vec::new());
            work = 0.0;
        }
        work += w;
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(item.into());
        }
    }
    let last_id = format!("{batch_prefix}-{:04}", chunks.len());
    if !is_valid_batch_id(&last_id) {
        return Err(Error::InvalidArgument(format!(
            "batch prefix {batch_prefix:?}: batch ids like `{last_id}` must match [A-Za-z0-9_-]{{1,128}}"
        )));
    }
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| BatchMessage {
            schema_version: SCHEMA_VERSION,
            batch_id: format!("{batch_prefix}-{:04}", i + 1),
            items: chunk,
            params: (!params.is_empty()).then(|| params.clone()),
            output: (!output.is_empty()).then(|| output.clone()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Limits, parse};

    fn p(name: &str) -> PathBuf {
        PathBuf::from(name)
    }

    fn msg(e: Error) -> String {
        e.to_string()
    }

    fn item(id: &str, prompt: &str) -> SubmitItem {
        SubmitItem {
            id: id.into(),
            prompt: prompt.into(),
            negative_prompt: None,
            seed: None,
            num_images: None,
        }
    }

    #[test]
    fn txt_ids_by_index_and_blank_lines() {
        let items = parse_items(
            &p("a.txt"),
            "\u{feff}a cat\n\n  a dog  \r\n\n",
            InputFormat::Txt,
        )
        .unwrap();
        assert_eq!(items, [item("p0001", "a cat"), item("p0002", "a dog")]);
        let e = parse_items(&p("a.txt"), "ok\nbad\u{7}\n", InputFormat::Txt).unwrap_err();
        assert!(msg(e).starts_with("a.txt:2: prompt contains control"));
        assert!(parse_items(&p("a.txt"), "\n  \n", InputFormat::Txt).is_err());
    }

    #[test]
    fn jsonl_fields_and_ids() {
        let text = r#"{"prompt": "a", "id": "sku-1", "negative_prompt": "blurry", "seed": 7, "num_images": 3}

{"prompt": "b"}"#;
        let items = parse_items(&p("x.jsonl"), text, InputFormat::Jsonl).unwrap();
        assert_eq!(
            items[0],
            SubmitItem {
                id: "sku-1".into(),
                prompt: "a".into(),
                negative_prompt: Some("blurry".into()),
                seed: Some(7),
                num_images: Some(3),
            }
        );
        // Missing ids by index among items (blank lines do not count).
        assert_eq!(items[1], item("p0002", "b"));
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let cases = [
            ("{\"prompt\": \"ok\"}\n{\"prompt\": 3}", 2, "invalid JSON"),
            ("{\"prompt\": \"ok\", \"sed\": 1}", 1, "unknown field"),
            ("{\"prompt\": \" \"}", 1, "empty prompt"),
            ("{\"id\": \"x\"}", 1, "missing field `prompt`"),
            ("{\"prompt\": \"a\", \"id\": \"../x\"}", 1, "must match"),
            (
                "{\"prompt\": \"a\", \"id\": \"manifest.json\"}",
                1,
                "reserved",
            ),
            ("{\"prompt\": \"a\", \"seed\": -1}", 1, "invalid JSON"),
            ("{\"prompt\": \"a\", \"num_images\": 0}", 1, "at least 1"),
            (
                "{\"prompt\": \"a\", \"negative_prompt\": \"\\u0000\"}",
                1,
                "negative_prompt contains",
            ),
            (
                "{\"prompt\": \"a\", \"id\": \"x\"}\n\n{\"prompt\": \"b\", \"id\": \"x\"}",
                3,
                "id `x` already used on line 1",
            ),
            (
                "{\"prompt\": \"a\", \"id\": \"p0002\"}\n{\"prompt\": \"b\"}",
                2,
                "automatic id `p0002` already used on line 1",
            ),
        ];
        for (text, line, needle) in cases {
            let m = msg(parse_items(&p("x.jsonl"), text, InputFormat::Jsonl).unwrap_err());
            assert!(m.starts_with(&format!("x.jsonl:{line}:")), "{m}");
            assert!(m.contains(needle), "{m}");
        }
    }

    #[test]
    fn csv_columns_and_values() {
        let text = "\u{feff}id,prompt,negative_prompt,seed,num_images\n\
                    sku-1,\"red sneaker, studio light\",blurry,42,2\n\
                    \n\
                    ,  blue boot  ,,,\n";
        let items = parse_items(&p("x.csv"), text, InputFormat::Csv).unwrap();
        assert_eq!(
            items,
            [
                SubmitItem {
                    id: "sku-1".into(),
                    prompt: "red sneaker, studio light".into(),
                    negative_prompt: Some("blurry".into()),
                    seed: Some(42),
                    num_images: Some(2),
                },
                item("p0002", "blue boot"),
            ]
        );
        // Only a prompt column, in any position among known columns.
        let items = parse_items(&p("x.csv"), "prompt\na\nb\n", InputFormat::Csv).unwrap();
        assert_eq!(items, [item("p0001", "a"), item("p0002", "b")]);
        let items = parse_items(&p("x.csv"), "seed,prompt\n5,a\n", InputFormat::Csv).unwrap();
        assert_eq!(items[0].seed, Some(5));
    }

    #[test]
    fn csv_errors_name_the_line() {
        let cases = [
            ("prompt,colour\na,red\n", 1, "unknown column `colour`"),
            ("id,seed\nx,1\n", 1, "missing column `prompt`"),
            ("prompt,prompt\na,b\n", 1, "appears twice"),
            ("prompt,id\na,x\nb\n", 3, "invalid CSV"),
            ("prompt,seed\na,1\nb,-4\n", 3, "seed `-4`"),
            ("prompt,seed\na,x1\n", 2, "seed `x1`"),
            ("prompt,num_images\na,99999999999\n", 2, "too large"),
            ("prompt,num_images\na,0\n", 2, "at least 1"),
            ("prompt,id\na,x\n\nb,x\n", 4, "already used on line 2"),
            (
                "prompt,id\r\na,x\r\n\r\nb,x\r\n",
                4,
                "already used on line 2",
            ),
            (
                "\n\nprompt,id\n\n\na,x\n\"multi\nline\",y\nc,y\n",
                9,
                "already used on line 7",
            ),
            ("\n\nprompt,colour\n", 3, "unknown column"),
            ("prompt,id\na,a/b\n", 2, "must match"),
            ("prompt\n\"\"\n", 2, "empty prompt"),
        ];
        for (text, line, needle) in cases {
            let m = msg(parse_items(&p("x.csv"), text, InputFormat::Csv).unwrap_err());
            assert!(m.starts_with(&format!("x.csv:{line}:")), "{text:?}: {m}");
            assert!(m.contains(needle), "{text:?}: {m}");
        }
        // A header and nothing else.
        assert!(
            msg(parse_items(&p("x.csv"), "prompt\n", InputFormat::Csv).unwrap_err())
                .contains("no prompts")
        );
        assert!(parse_items(&p("x.csv"), "", InputFormat::Csv).is_err());
    }

    #[test]
    fn read_items_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            ("p.txt", "a cat\n"),
            ("p.jsonl", "{\"prompt\": \"a cat\"}\n"),
            ("p.csv", "prompt\na cat\n"),
        ];
        for (name, text) in files {
            let f = dir.path().join(name);
            std::fs::write(&f, text).unwrap();
            assert_eq!(read_items(&f).unwrap(), [item("p0001", "a cat")], "{name}");
        }
        let f = dir.path().join("p.json");
        std::fs::write(&f, "{}").unwrap();
        assert!(msg(read_items(&f).unwrap_err()).contains(".txt, .jsonl or .csv"));
        let missing = dir.path().join("missing.txt");
        assert!(matches!(read_items(&missing), Err(Error::Io { .. })));
        // Errors carry the real path.
        let f = dir.path().join("bad.txt");
        std::fs::write(&f, "ok\n\u{1}\n").unwrap();
        assert!(msg(read_items(&f).unwrap_err()).starts_with(&format!("{}:2:", f.display())));
    }

    type Vars = Vec<(String, Vec<String>)>;

    fn vars(v: &[(&str, &[&str])]) -> Vars {
        v.iter()
            .map(|(n, vals)| (n.to_string(), vals.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn template_cartesian_product_in_stable_order() {
        let items = expand_template(
            "professional product photography of {product}, {style}",
            &vars(&[
                ("product", &["a red sneaker", "a boot"]),
                ("style", &["studio", "lifestyle", "flat lay"]),
            ]),
        )
        .unwrap();
        let got: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.id.as_str(), i.prompt.as_str()))
            .collect();
        let base = "professional product photography of";
        let want: Vec<(String, String)> = [
            ("t0001", "a red sneaker, studio"),
            ("t0002", "a red sneaker, lifestyle"),
            ("t0003", "a red sneaker, flat lay"),
            ("t0004", "a boot, studio"),
            ("t0005", "a boot, lifestyle"),
            ("t0006", "a boot, flat lay"),
        ]
        .iter()
        .map(|(id, rest)| (id.to_string(), format!("{base} {rest}")))
        .collect();
        let want: Vec<(&str, &str)> = want.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(got, want);
        assert!(
            items
                .iter()
                .all(|i| i.seed.is_none() && i.num_images.is_none() && i.negative_prompt.is_none())
        );
        // A placeholder may repeat; braces can be escaped; values are inserted literally.
        let items =
            expand_template("{a} and {a} {{literal}} }}", &vars(&[("a", &["{x}"])])).unwrap();
        assert_eq!(items[0].prompt, "{x} and {x} {literal} }");
        // No placeholders, no variables: one prompt.
        assert_eq!(
            expand_template("a cat", &[]).unwrap(),
            [item("t0001", "a cat")]
        );
    }

    #[test]
    fn template_errors() {
        let cases: Vec<(&str, Vars, &str)> = vec![
            ("a {x}", vec![], "no --var x"),
            (
                "a {x}",
                vars(&[("x", &["1"]), ("y", &["2"])]),
                "`y` is not used",
            ),
            (
                "a {x}",
                vars(&[("x", &["1"]), ("x", &["2"])]),
                "given twice",
            ),
            ("a {x}", vars(&[("x", &[])]), "no values"),
            ("a {x", vars(&[("x", &["1"])]), "unclosed"),
            ("a x}", vec![], "unmatched"),
            ("a {}", vec![], "names must match"),
            ("a {x y}", vec![], "names must match"),
            ("{x}", vars(&[("x", &[" "])]), "empty prompt"),
            ("   ", vec![], "empty prompt"),
        ];
        for (template, v, needle) in cases {
            let m = msg(expand_template(template, &v).unwrap_err());
            assert!(m.contains(needle), "{template:?}: {m}");
        }
    }

    #[test]
    fn template_size_limit() {
        let hundred: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let v = |n: usize| -> Vars { (0..n).map(|i| (format!("v{i}"), hundred.clone())).collect() };
        let t = |n: usize| {
            (0..n)
                .map(|i| format!("{{v{i}}}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        // 100^2 = 10 000 is fine; 100^3 = 1 000 000 is not; 100^20 overflows usize and is not either.
        assert_eq!(expand_template(&t(2), &v(2)).unwrap().len(), 10_000);
        let m = msg(expand_template(&t(3), &v(3)).unwrap_err());
        assert!(
            m.contains("more than 100000") && m.contains("v0: 100 × v1: 100 × v2: 100"),
            "{m}"
        );
        assert!(expand_template(&t(20), &v(20)).is_err());
        let m = expand_template(&t(2), &v(2)).unwrap();
        assert_eq!(m[10_000 - 1].id, "t10000");
        assert_eq!(m[10_000 - 1].prompt, "99 99");
    }

    #[test]
    fn vars_from_lists_and_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            parse_var("style= studio , lifestyle", dir.path()).unwrap(),
            (
                "style".to_string(),
                vec!["studio".to_string(), "lifestyle".to_string()]
            )
        );
        std::fs::write(
            dir.path().join("products.txt"),
            "red sneaker\n\n  blue boot \n",
        )
        .unwrap();
        assert_eq!(
            parse_var("product=@products.txt", dir.path()).unwrap(),
            (
                "product".to_string(),
                vec!["red sneaker".to_string(), "blue boot".to_string()]
            )
        );
        // Absolute paths ignore the base directory.
        let abs = dir.path().join("products.txt");
        let spec = format!("product=@{}", abs.display());
        assert_eq!(
            parse_var(&spec, Path::new("/nonexistent")).unwrap().1.len(),
            2
        );

        std::fs::write(dir.path().join("empty.txt"), "\n \n").unwrap();
        std::fs::write(dir.path().join("ctrl.txt"), "ok\nbad\u{1b}\n").unwrap();
        for (spec, needle) in [
            ("style", "expected NAME="),
            ("=a,b", "variable name"),
            ("1x=a", "variable name"),
            ("style=a,,b", "value 2 is empty"),
            ("style=", "value 1 is empty"),
            ("style=a, ", "value 2 is empty"),
            ("style=a\u{7}", "control"),
            ("p=@empty.txt", "has no values"),
            ("p=@ctrl.txt", "ctrl.txt:2:"),
            ("p=@missing.txt", "missing.txt"),
        ] {
            let m = msg(parse_var(spec, dir.path()).unwrap_err());
            assert!(m.contains(needle), "{spec:?}: {m}");
        }
    }

    fn by_items(n: usize) -> Split {
        Split {
            max_items: n,
            max_work: f64::INFINITY,
            work_per_image: 1.0,
        }
    }

    #[test]
    fn messages_split_under_the_work_cap() {
        let mut items: Vec<SubmitItem> = (0..5).map(|i| item(&format!("i{i}"), "p")).collect();
        items[2].num_images = Some(3);
        // Work per image 2, cap 6: [i0 i1] (4), [i2] (6), [i3 i4] (4).
        let split = Split {
            max_items: 10,
            max_work: 6.0,
            work_per_image: 2.0,
        };
        let p = MessageParams::default();
        let o = MessageOutput::default();
        let msgs = into_messages(items.clone(), split, "w", &p, &o).unwrap();
        let ids: Vec<Vec<&str>> = msgs
            .iter()
            .map(|m| m.items.iter().map(|i| i.id.as_str()).collect())
            .collect();
        assert_eq!(ids, [vec!["i0", "i1"], vec!["i2"], vec!["i3", "i4"]]);
        // An item that alone exceeds the cap cannot be sent.
        let tight = Split {
            max_work: 5.0,
            ..split
        };
        let e = msg(into_messages(items, tight, "w", &p, &o).unwrap_err());
        assert!(e.contains("item 3 (i2) alone is 6"), "{e}");
    }

    #[test]
    fn messages_split_by_batch_size() {
        let items: Vec<SubmitItem> = (1..=5)
            .map(|i| item(&format!("p{i:04}"), "a cat"))
            .collect();
        let params = MessageParams {
            preset: Some("production".into()),
            ..Default::default()
        };
        let output = MessageOutput {
            bucket: Some("images".into()),
            prefix: Some("catalog/shoes".into()),
            ..Default::default()
        };
        let msgs = into_messages(
            items.clone(),
            by_items(2),
            "shoes-2026-11-26",
            &params,
            &output,
        )
        .unwrap();
        let shape: Vec<(&str, Vec<&str>)> = msgs
            .iter()
            .map(|m| {
                (
                    m.batch_id.as_str(),
                    m.items.iter().map(|i| i.id.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("shoes-2026-11-26-0001", vec!["p0001", "p0002"]),
                ("shoes-2026-11-26-0002", vec!["p0003", "p0004"]),
                ("shoes-2026-11-26-0003", vec!["p0005"]),
            ]
        );
        // Every message is one the worker accepts, params and output included.
        let limits = Limits {
            allowed_buckets: vec!["images".into()],
            ..Limits::default()
        };
        for m in &msgs {
            assert_eq!(m.schema_version, 1);
            let b = parse(&m.to_json_vec(), &limits, 512).unwrap();
            assert_eq!(b.params.steps, 25);
            assert_eq!(b.prefix, "catalog/shoes");
        }
        // Empty params/output are left out of the JSON.
        let m = into_messages(
            items.clone(),
            by_items(10),
            "b",
            &MessageParams::default(),
            &MessageOutput::default(),
        )
        .unwrap();
        assert_eq!(m.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&m[0].to_json_vec()).unwrap();
        assert!(v.get("params").is_none() && v.get("output").is_none());
        assert_eq!(v["batch_id"], "b-0001");

        for (size, prefix, needle) in [
            (0, "b", "at least 1"),
            (2, "bad prefix", "must match"),
            (2, "a.b", "must match"),
            (2, &"x".repeat(124), "must match"),
        ] {
            let m = msg(
                into_messages(items.clone(), by_items(size), prefix, &params, &output).unwrap_err(),
            );
            assert!(m.contains(needle), "{prefix}: {m}");
        }
        assert!(
            into_messages(
                items.clone(),
                by_items(2),
                &"x".repeat(123),
                &params,
                &output
            )
            .is_ok()
        );
        assert!(into_messages(vec![], by_items(2), "b", &params, &output).is_err());
    }

    #[test]
    fn template_to_messages_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("products.txt"),
            "red sneaker\nblue boot\nwhite loafer\n",
        )
        .unwrap();
        let vars = vec![
            parse_var("product=@products.txt", dir.path()).unwrap(),
            parse_var("style=studio,lifestyle", dir.path()).unwrap(),
        ];
        let items = expand_template(
            "professional product photography of {product}, {style}",
            &vars,
        )
        .unwrap();
        assert_eq!(items.len(), 6);
        let msgs = into_messages(
            items,
            by_items(4),
            "shoes",
            &MessageParams::default(),
            &MessageOutput::default(),
        )
        .unwrap();
        assert_eq!(msgs.len(), 2);
        let limits = Limits {
            default_bucket: Some("images".into()),
            ..Limits::default()
        };
        let b = parse(&msgs[1].to_json_vec(), &limits, 512).unwrap();
        assert_eq!(b.items[0].id, "t0005");
        assert_eq!(
            b.items[0].prompt,
            "professional product photography of white loafer, studio"
        );
        assert!(b.items[0].seed_derived);
    }
}
