//! TSV readers for the text-classification datasets in `shared/data`.
//!
//! Every file is tab-separated UTF-8 with one example per line. The reader
//!
//! * strips a leading UTF-8 byte-order mark (MRPC's files start with one),
//! * accepts `\n` and `\r\n` line endings,
//! * trims trailing whitespace from every field (MR's sentences end in a space),
//! * keeps quotes verbatim — there is no CSV quoting, `"` is literal text,
//! * skips lines that are empty or whitespace only.
//!
//! Line numbers in errors are 1-based physical line numbers of the file (the
//! header, if any, is line 1; skipped empty lines still count).
//!
//! # Layouts
//!
//! Nine known layouts are recognised from the dataset's folder name (the parent
//! directory of the file, case-insensitive, `-`/`_` ignored); any other folder is
//! read with a [`GenericLayout`] derived from the file's header row.
//!
//! | layout | columns | text_a / text_b | labels (id order) |
//! |---|---|---|---|
//! | `sst-2` | sentence, label | sentence | `0`, `1` |
//! | `mr` | idx, sentence, label | sentence | `0`, `1` |
//! | `cola` | no header: source, label, original-label, sentence | sentence | `0`, `1` |
//! | `mrpc` | Quality, #1 ID, #2 ID, #1 String, #2 String | #1 String / #2 String | `0`, `1` (label = Quality) |
//! | `rte` | index, sentence1, sentence2, label | sentence1 / sentence2 | `entailment`, `not_entailment` |
//! | `qnli` | index, question, sentence, label | question / sentence | `entailment`, `not_entailment` |
//! | `mpqa` | sentence, label | sentence | `0`, `1` |
//! | `subj` | sentence, label | sentence | `objective`, `subjective` |
//! | `trec` | sentence, label | sentence | `ABBR`, `DESC`, `ENTY`, `HUM`, `LOC`, `NUM` |
//!
//! Label ids are the positions in that list: numeric labels in numeric order,
//! string labels in alphabetical (byte) order. A generic layout's label names are
//! the sorted unique labels of its (train) file, with the same rule: numeric order
//! when every label is an integer, byte order otherwise.
//!
//! Unlabeled splits (the GLUE test files: a header without a label column) are
//! refused with [`DataError::NoLabels`].

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One classification example: a sentence, or a sentence pair, and its label id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The (first) sentence.
    pub text_a: String,
    /// The second sentence of a pair task (MRPC, RTE, QNLI), `None` otherwise.
    pub text_b: Option<String>,
    /// Index into [`Dataset::label_names`].
    pub label: usize,
}

/// A parsed split of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// The dataset's name: the folder holding the file (e.g. `sst-2`), or the
    /// file stem when the file has no parent folder.
    pub name: String,
    /// Label names in id order.
    pub label_names: Vec<String>,
    /// The examples in file order.
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples (never true for a dataset returned by the readers).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }

    /// Whether the examples are sentence pairs.
    pub fn is_pair(&self) -> bool {
        self.examples.first().is_some_and(|e| e.text_b.is_some())
    }

    /// Number of examples per label id.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.label_names.len()];
        for e in &self.examples {
            if let Some(c) = counts.get_mut(e.label) {
                *c += 1;
            }
        }
        counts
    }
}

/// A header-driven layout for files outside the nine known datasets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenericLayout {
    /// The header's column names as found (trimmed); matched case-insensitively.
    pub columns: Vec<String>,
    /// Column of the (first) sentence.
    pub text_a: usize,
    /// Column of the second sentence, for pair tasks.
    pub text_b: Option<usize>,
    /// Column of the label; `None` for an unlabeled file (reading it fails with
    /// [`DataError::NoLabels`]).
    pub label: Option<usize>,
}

/// Column names accepted as the label column of a generic layout, in priority order.
const LABEL_COLUMNS: &[&str] = &["label", "labels", "quality", "gold_label", "class"];

/// Column names that may appear in a header row (used to recognise a header where
/// none is expected, e.g. CoLA's unlabeled test file).
const KNOWN_COLUMNS: &[&str] = &[
    "index",
    "idx",
    "id",
    "source",
    "sentence",
    "sentence1",
    "sentence2",
    "question",
    "text",
    "text_a",
    "text_b",
    "#1 id",
    "#2 id",
    "#1 string",
    "#2 string",
    "original-label",
    "label",
    "labels",
    "quality",
    "gold_label",
    "class",
];

impl GenericLayout {
    /// Builds a layout from a header row; `None` when no text column is recognised.
    ///
    /// Pair columns are tried first: `question` + `sentence` (QNLI style),
    /// `sentence1` + `sentence2`, `#1 String` + `#2 String`, `text_a` + `text_b`;
    /// then a single `sentence` or `text` column. The label column is the first of
    /// `label`, `labels`, `quality`, `gold_label`, `class`. Names are matched
    /// case-insensitively after trimming.
    pub fn from_header<S: AsRef<str>>(header: &[S]) -> Option<Self> {
        let lower: Vec<String> = header
            .iter()
            .map(|c| c.as_ref().trim().to_lowercase())
            .collect();
        let find = |name: &str| lower.iter().position(|c| c == name);
        let pairs: [(&str, &str); 4] = [
            ("question", "sentence"),
            ("sentence1", "sentence2"),
            ("#1 string", "#2 string"),
            ("text_a", "text_b"),
        ];
        let (text_a, text_b) = pairs
            .iter()
            .find_map(|(a, b)| find(a).map(|ia| (ia, find(b))))
            .or_else(|| find("sentence").or_else(|| find("text")).map(|i| (i, None)))?;
        let label = LABEL_COLUMNS.iter().find_map(|name| find(name));
        Some(Self {
            columns: header
                .iter()
                .map(|c| c.as_ref().trim().to_string())
                .collect(),
            text_a,
            text_b,
            label,
        })
    }
}

/// How the columns of a TSV file are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// `sentence, label` with labels `0`/`1`.
    Sst2,
    /// `idx, sentence, label` with labels `0`/`1`.
    Mr,
    /// No header: `source, label, original-label, sentence` with labels `0`/`1`.
    Cola,
    /// `Quality, #1 ID, #2 ID, #1 String, #2 String`; label = Quality (`0`/`1`).
    Mrpc,
    /// `index, sentence1, sentence2, label` with `entailment`/`not_entailment`.
    Rte,
    /// `index, question, sentence, label` with `entailment`/`not_entailment`.
    Qnli,
    /// `sentence, label` with labels `0`/`1`.
    Mpqa,
    /// `sentence, label` with `objective`/`subjective`.
    Subj,
    /// `sentence, label` with `ABBR DESC ENTY HUM LOC NUM`.
    Trec,
    /// Any other file, driven by its header row.
    Generic(GenericLayout),
}

enum Kind<'a> {
    Known(Spec),
    Generic(&'a GenericLayout),
}

/// The fixed description of a known layout.
struct Spec {
    name: &'static str,
    /// Column names; also the expected header row when `has_header`.
    columns: &'static [&'static str],
    has_header: bool,
    text_a: usize,
    text_b: Option<usize>,
    label: usize,
    labels: &'static [&'static str],
}

const BINARY: &[&str] = &["0", "1"];
const ENTAILMENT: &[&str] = &["entailment", "not_entailment"];

impl Layout {
    /// The known layout for a dataset folder name (`sst-2`, `SST2`, `mr`, `CoLA`, ...),
    /// compared case-insensitively with `-` and `_` ignored.
    pub fn from_name(name: &str) -> Option<Layout> {
        let key: String = name
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_lowercase();
        Some(match key.as_str() {
            "sst2" => Layout::Sst2,
            "mr" => Layout::Mr,
            "cola" => Layout::Cola,
            "mrpc" => Layout::Mrpc,
            "rte" => Layout::Rte,
            "qnli" => Layout::Qnli,
            "mpqa" => Layout::Mpqa,
            "subj" => Layout::Subj,
            "trec" => Layout::Trec,
            _ => return None,
        })
    }

    /// From the folder name (sst-2, mr, cola, ...) when known, else from the header
    /// row (columns named sentence/text/sentence1/sentence2/question/label/...).
    ///
    /// A known folder name does not open the file. A generic file must exist, be
    /// non-empty and have a header with a recognisable text column; a header
    /// without a label column still gives a layout (reading then fails with
    /// [`DataError::NoLabels`]).
    pub fn detect(path: &Path) -> Result<Layout, DataError> {
        if let Some(layout) = Self::from_folder(path) {
            return Ok(layout);
        }
        let text = read_text(path)?;
        detect_generic(path, &text)
    }

    fn from_folder(path: &Path) -> Option<Layout> {
        path.parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .and_then(Self::from_name)
    }

    /// The fixed label names of a known layout, in id order; `None` for generic.
    ///
    /// Numeric labels are in numeric order (`["0", "1"]`), string labels in
    /// alphabetical order: `["entailment", "not_entailment"]`,
    /// `["objective", "subjective"]`, `["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]`.
    pub fn label_names(&self) -> Option<Vec<String>> {
        self.spec()
            .map(|s| s.labels.iter().map(ToString::to_string).collect())
    }

    /// The layout's short name (`sst-2`, ..., `generic`).
    pub fn name(&self) -> &'static str {
        self.spec().map_or("generic", |s| s.name)
    }

    /// Whether examples are sentence pairs.
    pub fn is_pair(&self) -> bool {
        match self {
            Layout::Generic(g) => g.text_b.is_some(),
            other => other.spec().is_some_and(|s| s.text_b.is_some()),
        }
    }

    /// Whether this is one of the nine known layouts.
    pub fn is_known(&self) -> bool {
        !matches!(self, Layout::Generic(_))
    }

    fn spec(&self) -> Option<Spec> {
        match self.kind() {
            Kind::Known(spec) => Some(spec),
            Kind::Generic(_) => None,
        }
    }

    fn kind(&self) -> Kind<'_> {
        let single = |name, labels| Spec {
            name,
            columns: &["sentence", "label"],
            has_header: true,
            text_a: 0,
            text_b: None,
            label: 1,
            labels,
        };
        Kind::Known(match self {
            Layout::Sst2 => single("sst-2", BINARY),
            Layout::Mpqa => single("mpqa", BINARY),
            Layout::Subj => single("subj", &["objective", "subjective"]),
            Layout::Trec => single("trec", &["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
            Layout::Mr => Spec {
                name: "mr",
                columns: &["idx", "sentence", "label"],
                has_header: true,
                text_a: 1,
                text_b: None,
                label: 2,
                labels: BINARY,
            },
            Layout::Cola => Spec {
                name: "cola",
                columns: &["source", "label", "original-label", "sentence"],
                has_header: false,
                text_a: 3,
                text_b: None,
                label: 1,
                labels: BINARY,
            },
            Layout::Mrpc => Spec {
                name: "mrpc",
                columns: &["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                has_header: true,
                text_a: 3,
                text_b: Some(4),
                label: 0,
                labels: BINARY,
            },
            Layout::Rte => Spec {
                name: "rte",
                columns: &["index", "sentence1", "sentence2", "label"],
                has_header: true,
                text_a: 1,
                text_b: Some(2),
                label: 3,
                labels: ENTAILMENT,
            },
            Layout::Qnli => Spec {
                name: "qnli",
                columns: &["index", "question", "sentence", "label"],
                has_header: true,
                text_a: 1,
                text_b: Some(2),
                label: 3,
                labels: ENTAILMENT,
            },
            Layout::Generic(g) => return Kind::Generic(g),
        })
    }

    /// The layout as the parser needs it.
    fn resolve(&self) -> Resolved {
        match self.kind() {
            Kind::Generic(g) => Resolved {
                name: "generic",
                columns: g.columns.clone(),
                has_header: true,
                text_a: g.text_a,
                text_b: g.text_b,
                label: g.label,
                fixed_labels: None,
            },
            Kind::Known(spec) => Resolved {
                name: spec.name,
                columns: spec.columns.iter().map(ToString::to_string).collect(),
                has_header: spec.has_header,
                text_a: spec.text_a,
                text_b: spec.text_b,
                label: Some(spec.label),
                fixed_labels: Some(spec.labels.iter().map(ToString::to_string).collect()),
            },
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Generic(g) => write!(f, "generic [{}]", g.columns.join(", ")),
            known => f.write_str(known.name()),
        }
    }
}

struct Resolved {
    name: &'static str,
    columns: Vec<String>,
    has_header: bool,
    text_a: usize,
    text_b: Option<usize>,
    label: Option<usize>,
    fixed_labels: Option<Vec<String>>,
}

/// Errors of the TSV readers; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file does not exist.
    #[error("{}: file not found", path.display())]
    NotFound { path: PathBuf },
    /// Any other I/O failure.
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes are not UTF-8.
    #[error("{}:{line}: invalid UTF-8", path.display())]
    InvalidUtf8 { path: PathBuf, line: usize },
    /// The file holds no non-empty line at all.
    #[error("{}: file is empty (no header, no examples)", path.display())]
    Empty { path: PathBuf },
    /// The file has a header but no example rows.
    #[error("{}: no examples (the file has only a header row)", path.display())]
    NoExamples { path: PathBuf },
    /// The file has no label column (e.g. an unlabeled GLUE test split).
    #[error(
        "{}: file has no labels (header: {}); unlabeled splits such as GLUE test files cannot be read as labelled data",
        path.display(),
        header.join(", ")
    )]
    NoLabels { path: PathBuf, header: Vec<String> },
    /// The header row is not the one the layout expects.
    #[error(
        "{}:{line}: header [{}] does not match the {layout} layout (expected {expected}){}",
        path.display(),
        found.join(", "),
        folder_origin(path, layout)
    )]
    HeaderMismatch {
        path: PathBuf,
        line: usize,
        layout: String,
        expected: String,
        found: Vec<String>,
    },
    /// No layout could be derived from the header row.
    #[error(
        "{}: cannot detect the layout: header [{}] has no text column (sentence, text, sentence1, question, #1 String, text_a)",
        path.display(),
        header.join(", ")
    )]
    UnknownLayout { path: PathBuf, header: Vec<String> },
    /// A row has the wrong number of tab-separated columns.
    #[error("{}:{line}: expected {expected} columns, found {found}", path.display())]
    ColumnCount {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },
    /// A text or label field is empty.
    #[error("{}:{line}: empty {column} field", path.display())]
    EmptyField {
        path: PathBuf,
        line: usize,
        column: String,
    },
    /// A label outside the label set.
    #[error(
        "{}:{line}: unknown label {label:?}; valid labels: [{}]{origin}",
        path.display(),
        valid.join(", ")
    )]
    UnknownLabel {
        path: PathBuf,
        line: usize,
        label: String,
        valid: Vec<String>,
        /// Where the valid labels come from, when that is not obvious (a layout chosen
        /// by the folder's name); empty otherwise.
        origin: String,
    },
    /// A training file whose examples all carry one label.
    #[error(
        "{}: every example has the label {label:?}; a classifier needs at least 2 classes to learn from",
        path.display()
    )]
    SingleLabel { path: PathBuf, label: String },
    /// Train and eval files of [`read_train_eval`] have incompatible layouts.
    #[error(
        "train file {} ({train_layout}) and eval file {} ({eval_layout}) have different layouts",
        train.display(),
        eval.display()
    )]
    LayoutMismatch {
        train: PathBuf,
        eval: PathBuf,
        train_layout: String,
        eval_layout: String,
    },
}

/// Detects the layout of `path` and reads it; label names are the layout's fixed
/// names, or the file's sorted unique labels for a generic layout.
pub fn read_tsv(path: &Path) -> Result<Dataset, DataError> {
    let text = read_text(path)?;
    let layout = detect_in(path, &text)?;
    parse(path, &text, &layout, None)
}

/// Reads `path` with a given layout. `label_names`, when given, is the label id
/// mapping to use (e.g. a train file's); otherwise the layout's fixed names, or the
/// file's sorted unique labels for a generic layout.
pub fn read_tsv_with(
    path: &Path,
    layout: &Layout,
    label_names: Option<&[String]>,
) -> Result<Dataset, DataError> {
    let text = read_text(path)?;
    parse(path, &text, layout, label_names)
}

/// Reads a train and an eval file so that both share one label id mapping: the
/// train file's (its layout's fixed names, or its sorted unique labels when
/// generic). An eval label missing from the train set is an error.
pub fn read_train_eval(train: &Path, eval: &Path) -> Result<(Dataset, Dataset), DataError> {
    let train_text = read_text(train)?;
    let train_layout = detect_in(train, &train_text)?;
    let eval_text = read_text(eval)?;
    let eval_layout = detect_in(eval, &eval_text)?;
    let compatible = if train_layout.is_known() && eval_layout.is_known() {
        train_layout == eval_layout
    } else {
        train_layout.is_pair() == eval_layout.is_pair()
    };
    if !compatible {
        return Err(DataError::LayoutMismatch {
            train: train.to_path_buf(),
            eval: eval.to_path_buf(),
            train_layout: train_layout.to_string(),
            eval_layout: eval_layout.to_string(),
        });
    }
    let train_set = parse(train, &train_text, &train_layout, None)?;
    // One class teaches nothing: accuracy 1.0 and loss 0 would look like success.
    let present: Vec<&String> = train_set
        .label_counts()
        .iter()
        .zip(&train_set.label_names)
        .filter(|(n, _)| **n > 0)
        .map(|(_, name)| name)
        .collect();
    if present.len() < 2 {
        return Err(DataError::SingleLabel {
            path: train.to_path_buf(),
            label: present.first().map(|s| (*s).clone()).unwrap_or_default(),
        });
    }
    let eval_set = parse(eval, &eval_text, &eval_layout, Some(&train_set.label_names))?;
    Ok((train_set, eval_set))
}

/// A known layout is chosen by the name of the file's folder, which a user may not
/// expect (a file of 0/1 labels in a folder named `trec`): say so.
fn folder_origin(path: &Path, layout: &str) -> String {
    let folder = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "; the {layout} layout was chosen from the folder name `{folder}`: a file of another layout belongs in a folder of another name"
    )
}

fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            DataError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        // Segments split at '\n' up to the bad byte = its 1-based line number.
        let line = e.as_bytes()[..valid].split(|&b| b == b'\n').count();
        DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            line,
        }
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Non-empty lines with their 1-based line numbers, line terminators removed.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
        .filter(|(_, l)| !l.trim().is_empty())
}

fn fields(line: &str) -> Vec<&str> {
    line.split('\t').map(str::trim_end).collect()
}

fn detect_in(path: &Path, text: &str) -> Result<Layout, DataError> {
    match Layout::from_folder(path) {
        Some(layout) => Ok(layout),
        None => detect_generic(path, text),
    }
}

fn detect_generic(path: &Path, text: &str) -> Result<Layout, DataError> {
    let Some((_, first)) = lines(text).next() else {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    };
    let header = fields(first);
    GenericLayout::from_header(&header)
        .map(Layout::Generic)
        .ok_or_else(|| DataError::UnknownLayout {
            path: path.to_path_buf(),
            header: owned(&header),
        })
}

fn owned(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| (*f).to_string()).collect()
}

fn lower(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| f.trim().to_lowercase()).collect()
}

/// Whether every field is a known column name (lowercased input).
fn looks_like_header(fields: &[String]) -> bool {
    fields.iter().all(|c| KNOWN_COLUMNS.contains(&c.as_str()))
}

/// Checks the header row (or the absence of one) and reports unlabeled files.
fn check_header(
    path: &Path,
    layout: &Resolved,
    line_no: usize,
    first: &[&str],
) -> Result<(), DataError> {
    let found = lower(first);
    let has_label_name =
        |names: &[String]| names.iter().any(|n| LABEL_COLUMNS.contains(&n.as_str()));
    let no_labels = || DataError::NoLabels {
        path: path.to_path_buf(),
        header: owned(first),
    };
    if layout.has_header {
        let expected: Vec<String> = layout.columns.iter().map(|c| c.to_lowercase()).collect();
        if found != expected {
            // A header made of column names but without the label column is an
            // unlabeled split; anything else is the wrong file or a missing header.
            let label_name = layout.label.and_then(|i| expected.get(i));
            let labelled = match label_name {
                Some(name) => found.contains(name),
                None => has_label_name(&found),
            };
            if !labelled && looks_like_header(&found) {
                return Err(no_labels());
            }
            return Err(DataError::HeaderMismatch {
                path: path.to_path_buf(),
                line: line_no,
                layout: layout.name.to_string(),
                expected: format!("header [{}]", layout.columns.join(", ")),
                found: owned(first),
            });
        }
        if layout.label.is_none() {
            return Err(no_labels());
        }
    } else if looks_like_header(&found) {
        // A header row in a header-less layout: an unlabeled split, or a wrong file.
        if !has_label_name(&found) {
            return Err(no_labels());
        }
        return Err(DataError::HeaderMismatch {
            path: path.to_path_buf(),
            line: line_no,
            layout: layout.name.to_string(),
            expected: format!("no header row; columns {}", layout.columns.join(", ")),
            found: owned(first),
        });
    }
    Ok(())
}

struct RawExample<'a> {
    line: usize,
    text_a: &'a str,
    text_b: Option<&'a str>,
    label: &'a str,
}

fn parse(
    path: &Path,
    text: &str,
    layout: &Layout,
    label_names: Option<&[String]>,
) -> Result<Dataset, DataError> {
    let spec = layout.resolve();
    let mut rows = lines(text).peekable();
    let Some(&(first_no, first_line)) = rows.peek() else {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    };
    check_header(path, &spec, first_no, &fields(first_line))?;
    if spec.has_header {
        rows.next();
    }
    let Some(label_col) = spec.label else {
        return Err(DataError::NoLabels {
            path: path.to_path_buf(),
            header: spec.columns.clone(),
        });
    };
    let column_name = |i: usize| {
        spec.columns
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("column {}", i + 1))
    };
    let expected = spec.columns.len();
    let mut raw = Vec::new();
    for (line, row) in rows {
        let f = fields(row);
        if f.len() != expected {
            return Err(DataError::ColumnCount {
                path: path.to_path_buf(),
                line,
                expected,
                found: f.len(),
            });
        }
        let get = |i: usize| -> Result<&str, DataError> {
            match f.get(i) {
                Some(v) if !v.trim().is_empty() => Ok(*v),
                _ => Err(DataError::EmptyField {
                    path: path.to_path_buf(),
                    line,
                    column: column_name(i),
                }),
            }
        };
        raw.push(RawExample {
            line,
            text_a: get(spec.text_a)?,
            text_b: spec.text_b.map(get).transpose()?,
            label: get(label_col)?.trim(),
        });
    }
    if raw.is_empty() {
        return Err(DataError::NoExamples {
            path: path.to_path_buf(),
        });
    }
    let known = spec.fixed_labels.is_some();
    let names: Vec<String> = match (label_names, spec.fixed_labels) {
        (Some(given), _) => given.to_vec(),
        (None, Some(fixed)) => fixed,
        (None, None) => sorted_unique(raw.iter().map(|r| r.label)),
    };
    let mut examples = Vec::with_capacity(raw.len());
    for r in raw {
        let Some(label) = names.iter().position(|n| n == r.label) else {
            let origin = match (label_names, known) {
                (Some(_), _) => " (the training file's labels)".to_owned(),
                (None, true) => folder_origin(path, spec.name),
                (None, false) => String::new(),
            };
            return Err(DataError::UnknownLabel {
                path: path.to_path_buf(),
                line: r.line,
                label: r.label.to_string(),
                valid: names,
                origin,
            });
        };
        examples.push(Example {
            text_a: r.text_a.to_string(),
            text_b: r.text_b.map(ToString::to_string),
            label,
        });
    }
    Ok(Dataset {
        name: dataset_name(path),
        label_names: names,
        examples,
    })
}

/// Sorted unique labels: numeric order when every label is an integer, byte order otherwise.
fn sorted_unique<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = labels.map(ToString::to_string).collect();
    names.sort_unstable();
    names.dedup();
    let numeric: Option<Vec<i128>> = names.iter().map(|n| n.parse::<i128>().ok()).collect();
    if let Some(values) = numeric {
        let mut pairs: Vec<(i128, String)> = values.into_iter().zip(names).collect();
        pairs.sort();
        names = pairs.into_iter().map(|(_, n)| n).collect();
    }
    names
}

fn dataset_name(path: &Path) -> String {
    path.parent()
        .and_then(Path::file_name)
        .or_else(|| path.file_stem())
        .map_or_else(
            || "dataset".to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
}
