//! Prompt files for `sdbatch generate`: `.txt` (one prompt a line) or `.jsonl` (one JSON object a
//! line: `prompt`, optional `negative_prompt`, `seed`, `id`). Every error names the file and line.
use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// Longest prompt accepted, in bytes; CLIP reads 75 tokens, so anything near this is a mistake.
pub const MAX_PROMPT_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct PromptEntry {
    /// Output file stem; defaults to the entry's index.
    pub id: Option<String>,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    /// 1-based line in the file, for messages.
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    id: Option<String>,
}

pub use crate::keys::is_safe_id;

pub fn read_prompts(path: &Path) -> Result<Vec<PromptEntry>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let jsonl = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => true,
        Some("txt") => false,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{}: prompts file must end in .txt or .jsonl",
                path.display()
            )));
        }
    };
    parse_prompts(path, &text, jsonl)
}

/// Parses prompt-file text (`jsonl`: one JSON object a line, else one prompt a line). Blank lines
/// are skipped.
pub fn parse_prompts(path: &Path, text: &str, jsonl: bool) -> Result<Vec<PromptEntry>> {
    let err = |line: usize, message: String| Error::PromptFile {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut entries = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let entry = if jsonl {
            let j: JsonLine = serde_json::from_str(raw)
                .map_err(|e| err(line, format!("invalid JSON line: {e}")))?;
            PromptEntry {
                id: j.id,
                prompt: j.prompt,
                negative_prompt: j.negative_prompt,
                seed: j.seed,
                line,
            }
        } else {
            PromptEntry {
                id: None,
                prompt: raw.trim().to_string(),
                negative_prompt: None,
                seed: None,
                line,
            }
        };
        if entry.prompt.trim().is_empty() {
            return Err(err(line, "empty prompt".into()));
        }
        if entry.prompt.len() > MAX_PROMPT_BYTES {
            return Err(err(
                line,
                format!("prompt longer than {MAX_PROMPT_BYTES} bytes"),
            ));
        }
        if entry
            .prompt
            .chars()
            .any(|c| c.is_control() && !c.is_whitespace())
        {
            return Err(err(line, "prompt contains control characters".into()));
        }
        if let Some(id) = &entry.id {
            if !is_safe_id(id) {
                return Err(err(
                    line,
                    format!("id `{id}` must match [A-Za-z0-9_.-]{{1,128}}"),
                ));
            }
            if let Some(first) = ids.insert(id.clone(), line) {
                return Err(err(line, format!("id `{id}` already used on line {first}")));
            }
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no prompts",
            path.display()
        )));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("prompts.jsonl")
    }

    #[test]
    fn txt_skips_blank_lines_and_keeps_line_numbers() {
        let e = parse_prompts(p(), "a cat\n\n  a dog  \n", false).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].prompt, "a dog");
        assert_eq!(e[1].line, 3);
    }

    #[test]
    fn jsonl_fields() {
        let e = parse_prompts(
            p(),
            r#"{"prompt": "a cat", "seed": 5, "id": "cat-1", "negative_prompt": "blurry"}"#,
            true,
        )
        .unwrap();
        assert_eq!(e[0].seed, Some(5));
        assert_eq!(e[0].id.as_deref(), Some("cat-1"));
        assert_eq!(e[0].negative_prompt.as_deref(), Some("blurry"));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("{\"prompt\": \"ok\"}\n{\"prompt\": 3}", 2, "invalid JSON"),
            ("{\"prompt\": \"ok\", \"sed\": 1}", 1, "unknown field"),
            ("{\"prompt\": \"  \"}", 1, "empty prompt"),
            ("{\"prompt\": \"a\", \"id\": \"../x\"}", 1, "must match"),
            (
                "{\"prompt\": \"a\", \"id\": \"x\"}\n{\"prompt\": \"b\", \"id\": \"x\"}",
                2,
                "already used on line 1",
            ),
            ("{\"prompt\": \"a\", \"seed\": -1}", 1, "invalid JSON"),
        ];
        for (text, line, needle) in cases {
            let msg = parse_prompts(p(), text, true).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("prompts.jsonl:{line}:")), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn empty_file_is_an_error() {
        assert!(parse_prompts(p(), "\n \n", false).is_err());
    }

    #[test]
    fn wrong_extension_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.csv");
        std::fs::write(&f, "a").unwrap();
        assert!(
            read_prompts(&f)
                .unwrap_err()
                .to_string()
                .contains(".txt or .jsonl")
        );
    }
}
