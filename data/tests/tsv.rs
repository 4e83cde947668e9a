//! Tests of the TSV readers: the real datasets (when present) and hand-written
//! bad inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use fibecfed_data::{
    DataError, Dataset, GenericLayout, Layout, read_train_eval, read_tsv, read_tsv_with,
};

// ---------------------------------------------------------------- helpers

/// The shared data folder: `FIBECFED_DATA_DIR`, else `<workspace>/../shared/data`.
fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("FIBECFED_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
        PathBuf::from,
    );
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: data folder {} not found (set FIBECFED_DATA_DIR)",
            dir.display()
        );
        None
    }
}

/// A split of the real data, or `None` (with a "skipped" line) when absent.
fn split(dataset: &str, file: &str) -> Option<PathBuf> {
    let path = data_dir()?.join(dataset).join(file);
    if path.is_file() {
        Some(path)
    } else {
        println!("skipped: {} not found", path.display());
        None
    }
}

fn load(dataset: &str, file: &str, count: usize) -> Option<Dataset> {
    let path = split(dataset, file)?;
    let ds = match read_tsv(&path) {
        Ok(ds) => ds,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    assert_eq!(ds.len(), count, "{}", path.display());
    assert_eq!(ds.name, dataset);
    assert!(
        ds.examples.iter().all(|e| e.label < ds.num_labels()),
        "{}",
        path.display()
    );
    assert!(
        ds.examples
            .iter()
            .all(|e| !e.text_a.is_empty() && e.text_a == e.text_a.trim_end()),
        "{}",
        path.display()
    );
    assert!(
        ds.label_counts().iter().all(|&c| c > 0),
        "{}: every label occurs",
        path.display()
    );
    Some(ds)
}

fn check_first(ds: &Dataset, text_a: &str, text_b: Option<&str>, label: &str) {
    let e = &ds.examples[0];
    assert_eq!(e.text_a, text_a);
    assert_eq!(e.text_b.as_deref(), text_b);
    assert_eq!(ds.label_names[e.label], label);
}

fn check_last(ds: &Dataset, text_a: &str, label: &str) {
    let e = ds.examples.last().unwrap();
    assert_eq!(e.text_a, text_a);
    assert_eq!(ds.label_names[e.label], label);
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// Writes `content` to `<tmp>/<folder>/<file>` and returns the path.
fn write(dir: &tempfile::TempDir, folder: &str, file: &str, content: &[u8]) -> PathBuf {
    let folder = dir.path().join(folder);
    fs::create_dir_all(&folder).unwrap();
    let path = folder.join(file);
    fs::write(&path, content).unwrap();
    path
}

fn err_msg(r: Result<Dataset, DataError>) -> String {
    match r {
        Ok(ds) => panic!("expected an error, got {} examples", ds.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

// ---------------------------------------------------------------- real data

#[test]
fn real_sst2() {
    let Some(train) = load("sst-2", "train.tsv", 67_349) else {
        return;
    };
    check_first(
        &train,
        "hide new secretions from the parental units",
        None,
        "0",
    );
    check_last(
        &train,
        "this new jangle of noise , mayhem and stupidity must be a serious contender for the title .",
        "0",
    );
    assert_eq!(train.label_names, names(&["0", "1"]));
    assert_eq!(train.label_counts(), vec![29_780, 37_569]);
    let Some(dev) = load("sst-2", "dev.tsv", 872) else {
        return;
    };
    check_first(
        &dev,
        "it 's a charming and often affecting journey .",
        None,
        "1",
    );
    assert_eq!(dev.label_counts(), vec![428, 444]);
}

#[test]
fn real_mr() {
    let Some(train) = load("mr", "train.tsv", 7_662) else {
        return;
    };
    check_first(
        &train,
        "more concerned with overall feelings , broader ideas , and open-ended questions than \
         concrete story and definitive answers , soderbergh's solaris is a gorgeous and \
         deceptively minimalist cinematic tone poem .",
        None,
        "1",
    );
    // CRLF file: no '\r' may survive in any field; non-ASCII text survives.
    assert!(train.examples.iter().all(|e| !e.text_a.contains('\r')));
    check_last(
        &train,
        "after collateral damage , you might imagine that most every aggrieved father cliché has \
         been unturned . but no .",
        "0",
    );
    let Some(dev) = load("mr", "dev.tsv", 1_000) else {
        return;
    };
    check_first(
        &dev,
        "once folks started hanging out at the barbershop , they never wanted to leave . chances \
         are you won't , either .",
        None,
        "1",
    );
    let Some(test) = load("mr", "test.tsv", 2_000) else {
        return;
    };
    check_first(
        &test,
        "all the characters are clinically depressed and have abandoned their slim hopes and \
         dreams .",
        None,
        "0",
    );
    assert_eq!(test.label_counts(), vec![951, 1_049]);
}

#[test]
fn real_cola() {
    let Some(train) = load("cola", "train.tsv", 8_551) else {
        return;
    };
    check_first(
        &train,
        "Our friends won't buy this analysis, let alone the next one we propose.",
        None,
        "1",
    );
    assert_eq!(train.label_counts(), vec![2_528, 6_023]);
    // The README table says 1,042 (that is `wc -l`), but dev.tsv has no final
    // newline: its last line is a 1,043rd labelled example (official CoLA
    // in-domain dev also has 1,043 sentences).
    let Some(dev) = load("cola", "dev.tsv", 1_043) else {
        return;
    };
    check_first(
        &dev,
        "The sailors rode the breeze clear of the rocks.",
        None,
        "1",
    );
    // dev.tsv has no final newline.
    check_last(&dev, "John talked to Bill about himself.", "1");
    assert_eq!(dev.label_counts(), vec![322, 721]);
}

#[test]
fn real_mrpc() {
    let Some(train) = load("mrpc", "train.tsv", 3_668) else {
        return;
    };
    check_first(
        &train,
        "Amrozi accused his brother , whom he called \" the witness \" , of deliberately \
         distorting his evidence .",
        Some(
            "Referring to him as only \" the witness \" , Amrozi accused his brother of \
             deliberately distorting his evidence .",
        ),
        "1",
    );
    assert!(!train.examples[0].text_a.contains('\u{feff}'));
    assert!(train.examples.iter().all(|e| e.text_b.is_some()));
    assert_eq!(train.label_counts(), vec![1_194, 2_474]);
    let Some(dev) = load("mrpc", "dev.tsv", 408) else {
        return;
    };
    check_first(
        &dev,
        "He said the foodservice pie business doesn 't fit the company 's long-term growth \
         strategy .",
        Some("\" The foodservice pie business does not fit our long-term growth strategy ."),
        "1",
    );
    assert!(dev.is_pair());
}

#[test]
fn real_rte() {
    let Some(train) = load("rte", "train.tsv", 2_490) else {
        return;
    };
    check_first(
        &train,
        "No Weapons of Mass Destruction Found in Iraq Yet.",
        Some("Weapons of Mass Destruction Found in Iraq."),
        "not_entailment",
    );
    assert_eq!(train.label_names, names(&["entailment", "not_entailment"]));
    assert_eq!(train.label_counts(), vec![1_249, 1_241]);
    let Some(dev) = load("rte", "dev.tsv", 277) else {
        return;
    };
    check_first(
        &dev,
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, \
         according to the Christopher Reeve Foundation.",
        Some("Christopher Reeve had an accident."),
        "not_entailment",
    );
    assert!(dev.examples.iter().all(|e| e.text_b.is_some()));
    // Inner quotes are literal text.
    let last = dev.examples.last().unwrap();
    assert!(
        last.text_a
            .starts_with("Danny Kennedy, Greenpeace campaigns director, said: \"The")
    );
    assert!(last.text_a.ends_with("his political opinions.\""));
}

#[test]
fn real_qnli() {
    let Some(dev) = load("qnli", "dev.tsv", 5_463) else {
        return;
    };
    check_first(
        &dev,
        "What came into force after the new constitution was herald?",
        Some("As of that day, the new constitution heralding the Second Republic came into force."),
        "entailment",
    );
    assert!(dev.examples.iter().all(|e| e.text_b.is_some()));
    assert_eq!(dev.label_counts(), vec![2_702, 2_761]);
}

#[test]
fn real_mpqa() {
    let Some(train) = load("mpqa", "train.tsv", 7_606) else {
        return;
    };
    check_first(&train, "debacle", None, "0");
    check_last(&train, "a great wall of china in the middle east", "0");
    let Some(dev) = load("mpqa", "dev.tsv", 997) else {
        return;
    };
    check_first(&dev, "in any doubt", None, "1");
    let Some(test) = load("mpqa", "test.tsv", 2_000) else {
        return;
    };
    check_first(&test, "real increase", None, "0");
}

#[test]
fn real_subj() {
    let Some(train) = load("subj", "train.tsv", 7_000) else {
        return;
    };
    check_first(
        &train,
        "the tucks have a secret , they 're immortal . they",
        None,
        "objective",
    );
    assert_eq!(train.label_names, names(&["objective", "subjective"]));
    assert_eq!(train.label_counts(), vec![3_461, 3_539]);
    let Some(dev) = load("subj", "dev.tsv", 1_000) else {
        return;
    };
    check_first(
        &dev,
        "shortly hereafter she encounters dieter , a charming young man .",
        None,
        "objective",
    );
    let Some(test) = load("subj", "test.tsv", 2_000) else {
        return;
    };
    assert_eq!(test.label_counts(), vec![1_033, 967]);
}

#[test]
fn real_trec() {
    let Some(train) = load("trec", "train.tsv", 4_952) else {
        return;
    };
    check_first(
        &train,
        "How did serfdom develop in and then leave Russia ?",
        None,
        "DESC",
    );
    assert_eq!(
        train.label_names,
        names(&["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])
    );
    assert_eq!(
        train.label_counts(),
        vec![76, 1_058, 1_149, 1_109, 755, 805]
    );
    let Some(dev) = load("trec", "dev.tsv", 500) else {
        return;
    };
    check_first(
        &dev,
        "What city would you be in if you were feeding the pigeons in the Piazza San Marco ?",
        None,
        "LOC",
    );
    let Some(test) = load("trec", "test.tsv", 500) else {
        return;
    };
    check_first(&test, "How far is it from Denver to Aspen ?", None, "NUM");
}

#[test]
fn real_unlabeled_test_splits_are_refused() {
    for dataset in ["sst-2", "cola", "mrpc", "rte", "qnli"] {
        let Some(path) = split(dataset, "test.tsv") else {
            continue;
        };
        let msg = err_msg(read_tsv(&path));
        assert_contains(&msg, &["test.tsv", dataset, "has no labels"]);
    }
}

#[test]
fn real_train_eval_pairs_share_labels() {
    for (dataset, train_n, eval_n) in [
        ("sst-2", 67_349, 872),
        ("cola", 8_551, 1_043),
        ("rte", 2_490, 277),
        ("trec", 4_952, 500),
    ] {
        let (Some(t), Some(e)) = (split(dataset, "train.tsv"), split(dataset, "dev.tsv")) else {
            continue;
        };
        let (train, eval) = read_train_eval(&t, &e).unwrap();
        assert_eq!((train.len(), eval.len()), (train_n, eval_n));
        assert_eq!(train.label_names, eval.label_names);
    }
}

#[test]
fn real_detect_by_folder_and_generic_header() {
    let Some(dir) = data_dir() else {
        return;
    };
    let expect = [
        ("sst-2", Layout::Sst2),
        ("mr", Layout::Mr),
        ("cola", Layout::Cola),
        ("mrpc", Layout::Mrpc),
        ("rte", Layout::Rte),
        ("qnli", Layout::Qnli),
        ("mpqa", Layout::Mpqa),
        ("subj", Layout::Subj),
        ("trec", Layout::Trec),
    ];
    for (folder, layout) in expect {
        assert_eq!(
            Layout::detect(&dir.join(folder).join("dev.tsv")).unwrap(),
            layout
        );
    }
    // The same content under an unknown folder name is read through its header.
    let tmp = tempfile::tempdir().unwrap();
    for (folder, count, pair) in [
        ("rte", 277, true),
        ("qnli", 5_463, true),
        ("mrpc", 408, true),
    ] {
        let bytes = fs::read(dir.join(folder).join("dev.tsv")).unwrap();
        let path = write(&tmp, &format!("copy-of-{folder}"), "dev.tsv", &bytes);
        let layout = Layout::detect(&path).unwrap();
        assert!(matches!(layout, Layout::Generic(_)), "{layout:?}");
        assert_eq!(layout.is_pair(), pair);
        let generic = read_tsv(&path).unwrap();
        let known = read_tsv(&dir.join(folder).join("dev.tsv")).unwrap();
        assert_eq!(generic.len(), count);
        assert_eq!(generic.label_names, known.label_names);
        assert_eq!(generic.examples, known.examples);
    }
}

// ---------------------------------------------------------------- layouts

#[test]
fn label_names_of_known_layouts() {
    assert_eq!(Layout::Sst2.label_names(), Some(names(&["0", "1"])));
    assert_eq!(Layout::Cola.label_names(), Some(names(&["0", "1"])));
    assert_eq!(Layout::Mrpc.label_names(), Some(names(&["0", "1"])));
    assert_eq!(
        Layout::Rte.label_names(),
        Some(names(&["entailment", "not_entailment"]))
    );
    assert_eq!(Layout::Qnli.label_names(), Layout::Rte.label_names());
    assert_eq!(
        Layout::Subj.label_names(),
        Some(names(&["objective", "subjective"]))
    );
    assert_eq!(
        Layout::Trec.label_names(),
        Some(names(&["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]))
    );
    let generic = GenericLayout::from_header(&["sentence", "label"]).unwrap();
    assert_eq!(Layout::Generic(generic).label_names(), None);
}

#[test]
fn folder_names_are_matched_loosely() {
    assert_eq!(Layout::from_name("SST-2"), Some(Layout::Sst2));
    assert_eq!(Layout::from_name("sst2"), Some(Layout::Sst2));
    assert_eq!(Layout::from_name("CoLA"), Some(Layout::Cola));
    assert_eq!(Layout::from_name("MRPC"), Some(Layout::Mrpc));
    assert_eq!(Layout::from_name("imdb"), None);
}

#[test]
fn generic_header_detection() {
    let g = GenericLayout::from_header(&["id", "Text", "Label"]).unwrap();
    assert_eq!((g.text_a, g.text_b, g.label), (1, None, Some(2)));
    let g = GenericLayout::from_header(&["index", "question", "sentence", "label"]).unwrap();
    assert_eq!((g.text_a, g.text_b, g.label), (1, Some(2), Some(3)));
    let g = GenericLayout::from_header(&["index", "sentence1", "sentence2"]).unwrap();
    assert_eq!((g.text_a, g.text_b, g.label), (1, Some(2), None));
    let g = GenericLayout::from_header(&["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
        .unwrap();
    assert_eq!((g.text_a, g.text_b, g.label), (3, Some(4), Some(0)));
    assert!(GenericLayout::from_header(&["a", "b"]).is_none());
}

#[test]
fn generic_labels_sorted_unique_numeric_aware() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "custom",
        "train.tsv",
        b"text\tlabel\nx\t10\ny\t2\nz\t0\nw\t2\n",
    );
    let ds = read_tsv(&p).unwrap();
    assert_eq!(ds.label_names, names(&["0", "2", "10"]));
    assert_eq!(
        ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(),
        vec![2, 1, 0, 1]
    );
    assert_eq!(ds.name, "custom");
    let p = write(
        &tmp,
        "custom2",
        "train.tsv",
        b"sentence\tlabel\na\tpos\nb\tneg\nc\tneutral\n",
    );
    assert_eq!(
        read_tsv(&p).unwrap().label_names,
        names(&["neg", "neutral", "pos"])
    );
}

#[test]
fn train_eval_share_train_label_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let train = write(
        &tmp,
        "custom",
        "train.tsv",
        b"sentence\tlabel\na\tneg\nb\tpos\nc\tneutral\n",
    );
    // Eval only has some labels, in another order: ids still follow the train file.
    let eval = write(
        &tmp,
        "custom",
        "dev.tsv",
        b"sentence\tlabel\nd\tpos\ne\tneg\n",
    );
    let (t, e) = read_train_eval(&train, &eval).unwrap();
    assert_eq!(t.label_names, names(&["neg", "neutral", "pos"]));
    assert_eq!(e.label_names, t.label_names);
    assert_eq!(e.examples[0].label, 2);
    assert_eq!(e.examples[1].label, 0);
    // A label unseen in train is an error naming the eval file.
    let eval = write(&tmp, "custom", "bad.tsv", b"sentence\tlabel\nd\tmixed\n");
    let msg = read_train_eval(&train, &eval).unwrap_err().to_string();
    assert_contains(&msg, &["bad.tsv:2", "\"mixed\"", "neg, neutral, pos"]);
    // Pair vs single-sentence files do not mix.
    let pair = write(
        &tmp,
        "custom",
        "pair.tsv",
        b"sentence1\tsentence2\tlabel\na\tb\tneg\n",
    );
    let msg = read_train_eval(&train, &pair).unwrap_err().to_string();
    assert_contains(&msg, &["train.tsv", "pair.tsv", "different layouts"]);
    // Two different known layouts do not mix either.
    let sst = write(&tmp, "sst-2", "train.tsv", b"sentence\tlabel\na\t1\n");
    let mpqa = write(&tmp, "mpqa", "dev.tsv", b"sentence\tlabel\na\t1\n");
    let msg = read_train_eval(&sst, &mpqa).unwrap_err().to_string();
    assert_contains(&msg, &["sst-2", "mpqa", "different layouts"]);
}

#[test]
fn read_with_explicit_layout_and_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "anything",
        "x.tsv",
        b"sentence\tlabel\nhello\t1\nbye\t0\n",
    );
    let ds = read_tsv_with(&p, &Layout::Sst2, None).unwrap();
    assert_eq!(ds.label_names, names(&["0", "1"]));
    assert_eq!(ds.examples[0].label, 1);
    let flipped = names(&["1", "0"]);
    let ds = read_tsv_with(&p, &Layout::Sst2, Some(&flipped)).unwrap();
    assert_eq!(ds.examples[0].label, 0);
    assert_eq!(ds.label_names, flipped);
}

// ---------------------------------------------------------------- messy input

#[test]
fn crlf_and_trailing_spaces() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "mr",
        "train.tsv",
        b"idx\tsentence\tlabel \r\n0\tit 's \"good\" .  \t1 \r\n\r\n1\t'bad' movie\t0\t\r\n",
    );
    // The last row ends in a tab: an extra (empty) column is an error, not whitespace.
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["train.tsv:4", "expected 3 columns, found 4"]);

    let p = write(
        &tmp,
        "mr",
        "dev.tsv",
        b"idx\tsentence\tlabel \r\n0\tit 's \"good\" .  \t1 \r\n\r\n   \r\n1\t'bad' movie\t0\r\n",
    );
    let ds = read_tsv(&p).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.examples[0].text_a, "it 's \"good\" .");
    assert_eq!(ds.examples[0].label, 1);
    assert_eq!(ds.examples[1].text_a, "'bad' movie");
    assert_eq!(ds.examples[1].label, 0);

    // Leading whitespace inside a text field is kept; trailing tabs/spaces in the
    // last field are trimmed; no final newline is fine.
    let p = write(
        &tmp,
        "sst-2",
        "dev.tsv",
        b"sentence\tlabel\n  indented \t 0 ",
    );
    let ds = read_tsv(&p).unwrap();
    assert_eq!(ds.examples[0].text_a, "  indented");
    assert_eq!(ds.examples[0].label, 0);
}

#[test]
fn bom_is_stripped_and_quotes_are_literal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut content = "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
        .as_bytes()
        .to_vec();
    content.extend_from_slice(b"1\t1\t2\t\"He said \" , ok\t\"unbalanced\r\n0\t3\t4\ta\tb\n");
    let p = write(&tmp, "mrpc", "train.tsv", &content);
    let ds = read_tsv(&p).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.examples[0].text_a, "\"He said \" , ok");
    assert_eq!(ds.examples[0].text_b.as_deref(), Some("\"unbalanced"));
    assert_eq!(ds.examples[0].label, 1);
    // A BOM also works for generic and header-less layouts.
    let p = write(
        &tmp,
        "cola",
        "train.tsv",
        "\u{feff}src\t0\t*\tBad sentence.\n".as_bytes(),
    );
    let ds = read_tsv(&p).unwrap();
    assert_eq!(ds.examples[0].text_a, "Bad sentence.");
    assert_eq!(ds.examples[0].label, 0);
    let p = write(
        &tmp,
        "other",
        "train.tsv",
        "\u{feff}text\tlabel\nx\ty\n".as_bytes(),
    );
    assert_eq!(read_tsv(&p).unwrap().label_names, names(&["y"]));
}

// ---------------------------------------------------------------- bad input

#[test]
fn wrong_column_count() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "rte",
        "train.tsv",
        b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n1\ta\tentailment\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["rte", "train.tsv:4", "expected 4 columns, found 3"]);
    let p = write(&tmp, "cola", "dev.tsv", b"s\t1\t\tok.\ns\t1\tok.\n");
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["dev.tsv:2", "expected 4 columns, found 3"]);
    match read_tsv(&p) {
        Err(DataError::ColumnCount {
            path,
            line,
            expected,
            found,
        }) => {
            assert_eq!(path, p);
            assert_eq!((line, expected, found), (2, 4, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_label() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "trec",
        "dev.tsv",
        b"sentence\tlabel\nWhat ?\tNUM\nWho ?\tPERSON\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(
        &msg,
        &["dev.tsv:3", "\"PERSON\"", "ABBR, DESC, ENTY, HUM, LOC, NUM"],
    );
    let p = write(&tmp, "sst-2", "dev.tsv", b"sentence\tlabel\ngood\t2\n");
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["dev.tsv:2", "\"2\"", "[0, 1]"]);
    // Labels are case-sensitive.
    let p = write(&tmp, "subj", "dev.tsv", b"sentence\tlabel\nx\tObjective\n");
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["\"Objective\"", "objective, subjective"]);
}

#[test]
fn empty_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "sst-2",
        "train.tsv",
        b"sentence\tlabel\nok\t1\n  \t0\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["train.tsv:3", "empty sentence field"]);
    let p = write(&tmp, "sst-2", "dev.tsv", b"sentence\tlabel\nok\t \n");
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["dev.tsv:2", "empty label field"]);
}

#[test]
fn unlabeled_files() {
    let tmp = tempfile::tempdir().unwrap();
    // GLUE-style test file under a known folder.
    let p = write(
        &tmp,
        "sst-2",
        "test.tsv",
        b"index\tsentence\n0\tsome text\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["test.tsv", "has no labels", "index, sentence"]);
    // Header-less known layout whose test file has a header without labels.
    let p = write(
        &tmp,
        "cola",
        "test.tsv",
        b"index\tsentence\n0\tSome text.\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["cola", "test.tsv", "has no labels"]);
    // Pair layout with the label column missing.
    let p = write(
        &tmp,
        "mrpc",
        "test.tsv",
        "\u{feff}index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n".as_bytes(),
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["test.tsv", "has no labels"]);
    // Generic file without a label column: detect works, reading refuses.
    let p = write(&tmp, "custom", "test.tsv", b"id\ttext\n0\tsome text\n");
    let layout = Layout::detect(&p).unwrap();
    assert!(matches!(&layout, Layout::Generic(g) if g.label.is_none()));
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["custom", "test.tsv", "has no labels"]);
    assert!(matches!(read_tsv(&p), Err(DataError::NoLabels { .. })));
}

#[test]
fn header_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    // Known layout, labelled but different columns (e.g. a header-less sst-2 file).
    let p = write(&tmp, "sst-2", "train.tsv", b"nice movie\t1\nbad movie\t0\n");
    let msg = err_msg(read_tsv(&p));
    assert_contains(
        &msg,
        &[
            "train.tsv:1",
            "header [nice movie, 1]",
            "sst-2 layout",
            "sentence, label",
        ],
    );
    let p = write(
        &tmp,
        "rte",
        "train.tsv",
        b"index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(
        &msg,
        &[
            "train.tsv:1",
            "index, premise, hypothesis, label",
            "rte layout",
            "index, sentence1, sentence2, label",
        ],
    );
    // A labelled header in the header-less cola layout.
    let p = write(
        &tmp,
        "cola",
        "train.tsv",
        b"source\tlabel\toriginal-label\tsentence\ns\t1\t\tok.\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["train.tsv:1", "cola layout", "no header row"]);
}

#[test]
fn unknown_generic_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(&tmp, "custom", "train.tsv", b"foo\tbar\n1\t2\n");
    let msg = Layout::detect(&p).unwrap_err().to_string();
    assert_contains(&msg, &["train.tsv", "cannot detect the layout", "foo, bar"]);
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["train.tsv", "cannot detect the layout"]);
}

#[test]
fn empty_file_and_header_only() {
    let tmp = tempfile::tempdir().unwrap();
    for (folder, content) in [
        ("sst-2", &b""[..]),
        ("custom", b"\n\r\n  \n"),
        ("cola", b""),
    ] {
        let p = write(&tmp, folder, "train.tsv", content);
        let msg = err_msg(read_tsv(&p));
        assert_contains(&msg, &[folder, "train.tsv", "file is empty"]);
    }
    let p = write(&tmp, "sst-2", "dev.tsv", b"sentence\tlabel\r\n\r\n");
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["dev.tsv", "no examples"]);
    let p = write(
        &tmp,
        "custom",
        "dev.tsv",
        "\u{feff}text\tlabel\n".as_bytes(),
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["dev.tsv", "no examples"]);
}

#[test]
fn missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    for folder in ["sst-2", "custom"] {
        let p = tmp.path().join(folder).join("nope.tsv");
        let msg = err_msg(read_tsv(&p));
        assert_contains(&msg, &[&p.display().to_string(), "not found"]);
    }
    let p = tmp.path().join("custom").join("nope.tsv");
    let msg = Layout::detect(&p).unwrap_err().to_string();
    assert_contains(&msg, &["nope.tsv", "not found"]);
    let msg = err_msg(read_tsv_with(&p, &Layout::Trec, None));
    assert_contains(&msg, &["nope.tsv", "not found"]);
    let good = write(&tmp, "custom", "train.tsv", b"text\tlabel\na\tb\n");
    let msg = read_train_eval(&good, &p).unwrap_err().to_string();
    assert_contains(&msg, &["nope.tsv", "not found"]);
}

#[test]
fn invalid_utf8() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        &tmp,
        "sst-2",
        "train.tsv",
        b"sentence\tlabel\nok\t1\nbad \xff\t0\n",
    );
    let msg = err_msg(read_tsv(&p));
    assert_contains(&msg, &["train.tsv:3", "invalid UTF-8"]);
}
