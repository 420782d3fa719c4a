//! Warm before ready: on CUDA the batch sizer needs two measured batches per image size before it
//! can size batches from free memory, and the first real batches would otherwise run at sizes 1
//! and 2. The worker runs those calibration batches for its default shape at start-up, before
//! `/readyz` turns 200, and can keep the measurements in a file (`--calibration-file`) so a
//! restarted pod on the same kind of GPU, with the same model and precision, skips them.
//!
//! The decisions (what to run, what a stored entry is good for) are pure; loading and saving are
//! thin. On the CPU there is nothing to calibrate (the batch size is the configured one): the plan
//! is empty and no file is read or written.
use crate::batching::{MemoryKey, MemorySample};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Format version of the file; an unknown version is ignored (measured again), never misread.
pub const VERSION: u32 = 1;

/// Largest calibration file read: it holds a few entries per GPU kind and model.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Batch sizes measured at start-up: the two the sizer's linear memory model needs.
pub const WARM_UP_SIZES: [usize; 2] = [1, 2];

/// What a calibration is valid for: memory figures hold for one GPU kind (name and size), one
/// model at one precision, one memory key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub gpu: String,
    pub total_bytes: u64,
    pub model: String,
    pub dtype: String,
    pub key: MemoryKey,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    #[serde(flatten)]
    pub identity: Identity,
    pub samples: Vec<MemorySample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationFile {
    pub version: u32,
    pub entries: Vec<Calibration>,
}

impl Default for CalibrationFile {
    fn default() -> Self {
        Self {
            version: VERSION,
            entries: Vec::new(),
        }
    }
}

impl CalibrationFile {
    /// The stored samples for `identity`, if they are enough for the sizer's model (two batch
    /// sizes).
    pub fn find(&self, identity: &Identity) -> Option<&[MemorySample]> {
        self.entries
            .iter()
            .find(|c| &c.identity == identity)
            .map(|c| &c.samples[..])
            .filter(|s| distinct_sizes(s) >= 2)
    }

    /// Stores (or replaces) the samples of `identity`.
    pub fn upsert(&mut self, identity: Identity, samples: Vec<MemorySample>) {
        self.entries.retain(|c| c.identity != identity);
        self.entries.push(Calibration { identity, samples });
    }

    /// Reads the file. A missing file is an empty one; an unreadable, oversized, invalid or
    /// other-version file is reported and treated as empty (calibrating again is only slower),
    /// so a bad cache never stops a worker.
    pub fn load(path: &Path) -> (Self, Option<String>) {
        let read = || -> Result<Option<Self>, String> {
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let len = file.metadata().map_err(|e| e.to_string())?.len();
            if len > MAX_FILE_BYTES {
                return Err(format!("{len} bytes, limit {MAX_FILE_BYTES}"));
            }
            let parsed: Self = serde_json::from_reader(std::io::BufReader::new(file))
                .map_err(|e| format!("not a calibration file ({})", json_error_kind(&e)))?;
            if parsed.version != VERSION {
                return Err(format!(
                    "version {}, this worker writes {VERSION}",
                    parsed.version
                ));
            }
            Ok(Some(parsed))
        };
        match read() {
            Ok(file) => (file.unwrap_or_default(), None),
            Err(why) => (Self::default(), Some(why)),
        }
    }

    /// Writes the file atomically (a temporary file in the same folder, then a rename), so a
    /// crash or a second worker never leaves half a file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the calibration file path has no file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// serde_json's error category, without its text (which could quote the file).
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected fields",
        serde_json::error::Category::Eof => "truncated",
    }
}

fn distinct_sizes(samples: &[MemorySample]) -> usize {
    let mut sizes: Vec<usize> = samples.iter().map(|s| s.batch).collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes.len()
}

/// What start-up does about calibration.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to calibrate: the CPU, or warm-up turned off.
    Nothing,
    /// Take these stored samples.
    Stored(Vec<MemorySample>),
    /// Run batches of these sizes, then store what they measured (when a file is given).
    Run(Vec<usize>),
}

/// Decides start-up calibration: `identity` is `None` off CUDA; `stored` the file's content if
/// a file is configured.
pub fn plan(identity: Option<&Identity>, warm_up: bool, stored: Option<&CalibrationFile>) -> Plan {
    let Some(identity) = identity else {
        return Plan::Nothing;
    };
    if let Some(samples) = stored.and_then(|f| f.find(identity)) {
        return Plan::Stored(samples.to_vec());
    }
    if warm_up {
        Plan::Run(WARM_UP_SIZES.to_vec())
    } else {
        Plan::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(gpu: &str) -> Identity {
        Identity {
            gpu: gpu.into(),
            total_bytes: 80 << 30,
            model: "/models/sd-v1-4".into(),
            dtype: "fp16".into(),
            key: MemoryKey {
                width: 512,
                height: 512,
                guided: true,
            },
        }
    }

    fn samples() -> Vec<MemorySample> {
        vec![
            MemorySample {
                batch: 1,
                peak_used_bytes: 4 << 30,
            },
            MemorySample {
                batch: 2,
                peak_used_bytes: 5 << 30,
            },
        ]
    }

    #[test]
    fn the_cpu_calibrates_nothing_whatever_the_settings() {
        let mut file = CalibrationFile::default();
        file.upsert(identity("NVIDIA H100"), samples());
        for warm_up in [true, false] {
            assert_eq!(plan(None, warm_up, Some(&file)), Plan::Nothing);
            assert_eq!(plan(None, warm_up, None), Plan::Nothing);
        }
    }

    #[test]
    fn cuda_runs_the_warm_up_unless_stored_or_turned_off() {
        let id = identity("NVIDIA H100");
        assert_eq!(plan(Some(&id), true, None), Plan::Run(vec![1, 2]));
        assert_eq!(plan(Some(&id), false, None), Plan::Nothing);
        let mut file = CalibrationFile::default();
        assert_eq!(plan(Some(&id), true, Some(&file)), Plan::Run(vec![1, 2]));
        file.upsert(id.clone(), samples());
        assert_eq!(plan(Some(&id), true, Some(&file)), Plan::Stored(samples()));
        // Stored samples are used even with the warm-up off: they cost nothing.
        assert_eq!(plan(Some(&id), false, Some(&file)), Plan::Stored(samples()));
    }

    #[test]
    fn entries_hold_only_for_their_gpu_model_precision_and_size() {
        let mut file = CalibrationFile::default();
        file.upsert(identity("NVIDIA H100"), samples());
        let mut other = vec![identity("NVIDIA A10G")];
        let mut i = identity("NVIDIA H100");
        i.total_bytes = 94 << 30;
        other.push(i);
        let mut i = identity("NVIDIA H100");
        i.model = "/models/sd-2-1".into();
        other.push(i);
        let mut i = identity("NVIDIA H100");
        i.dtype = "fp32".into();
        other.push(i);
        let mut i = identity("NVIDIA H100");
        i.key.width = 768;
        other.push(i);
        let mut i = identity("NVIDIA H100");
        i.key.guided = false;
        other.push(i);
        for id in &other {
            assert!(file.find(id).is_none(), "{id:?}");
        }
        assert!(file.find(&identity("NVIDIA H100")).is_some());
        // One batch size is not a model: measured again.
        file.upsert(identity("NVIDIA H100"), samples()[..1].to_vec());
        assert!(file.find(&identity("NVIDIA H100")).is_none());
        assert_eq!(file.entries.len(), 1, "replaced, not added");
    }

    #[test]
    fn the_file_round_trips_and_bad_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibrations.json");
        let (empty, why) = CalibrationFile::load(&path);
        assert_eq!((empty.entries.len(), why), (0, None), "missing = empty");
        let mut file = CalibrationFile::default();
        file.upsert(identity("NVIDIA H100"), samples());
        file.save(&path).unwrap();
        assert_eq!(CalibrationFile::load(&path), (file.clone(), None));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );

        for (text, expected) in [
            ("{\"version\": 1, \"entries\": [tru", "truncated"),
            ("secret-token", "invalid JSON"),
            ("{\"version\": 2, \"entries\": []}", "version 2"),
        ] {
            std::fs::write(&path, text).unwrap();
            let (f, why) = CalibrationFile::load(&path);
            let why = why.unwrap();
            assert!(f.entries.is_empty());
            assert!(why.contains(expected), "{why}");
            assert!(!why.contains("secret"), "{why}");
        }
        std::fs::write(&path, vec![b' '; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        assert!(CalibrationFile::load(&path).1.unwrap().contains("limit"));
    }
}
