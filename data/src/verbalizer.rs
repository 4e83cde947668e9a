//! The prompt templates and label words of the authors' code (FIBECFED.md §7; their
//! `data/process.py` processors, read as facts), for a decoder that classifies by the
//! LM head's logits of the label words after the prompt's last token.
//!
//! The authors' templates hold a `<mask>` whose preceding token's logits are read; a
//! causal model sees nothing after it. So each template here is theirs cut at the
//! `<mask>`. Two of theirs put the `<mask>` before the text (TREC `<mask> : {s}`, QNLI
//! `{q} ? <mask> , {s}`), which hides the text from a causal read; for those the
//! template of the same file's other path (TREC `{s} : <mask> .`) or of the pair tasks
//! (`{s1} ? {s2} These two sentences are <mask> .`) is used instead. Words carry their
//! leading space and must each be one token of the model's vocabulary.

/// A template (`{a}`, optional `{b}`) and the word of each label name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verbalizer {
    pub template: &'static str,
    /// (label name as the data crate reads it, word).
    pub words: &'static [(&'static str, &'static str)],
}

const SENTIMENT: &[(&str, &str)] = &[("0", " terrible"), ("1", " great")];
const PAIR: &str = "{a} ? {b} These two sentences are";

/// The authors' verbalizer for one of the nine datasets, by its folder name
/// (compared as the data crate compares layouts: case and `-`/`_` ignored).
pub fn authors_verbalizer(dataset: &str) -> Option<Verbalizer> {
    let key: String = dataset
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_lowercase();
    let (template, words): (&'static str, &'static [(&'static str, &'static str)]) =
        match key.as_str() {
            "sst2" | "mr" | "mpqa" => ("{a} . It was", SENTIMENT),
            "cola" => (
                "{a} . It was",
                &[("0", " unacceptable"), ("1", " acceptable")],
            ),
            "subj" => (
                "{a} . It was",
                &[("subjective", " subjective"), ("objective", " objective")],
            ),
            "trec" => (
                "{a} :",
                &[
                    ("DESC", " Description"),
                    ("ENTY", " Entity"),
                    ("ABBR", " Expression"),
                    ("HUM", " Human"),
                    ("LOC", " Location"),
                    ("NUM", " Number"),
                ],
            ),
            "mrpc" => (PAIR, &[("0", " No"), ("1", " Yes")]),
            "rte" | "qnli" => (PAIR, &[("entailment", " Yes"), ("not_entailment", " No")]),
            _ => return None,
        };
    Some(Verbalizer { template, words })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tsv::Layout;

    /// Every known layout has a verbalizer whose label names are exactly the layout's.
    #[test]
    fn every_dataset_has_its_labels_worded() {
        for name in [
            "sst-2", "mr", "cola", "mrpc", "rte", "qnli", "mpqa", "subj", "trec",
        ] {
            let v = authors_verbalizer(name).unwrap_or_else(|| panic!("{name}"));
            let layout = Layout::from_name(name).unwrap_or_else(|| panic!("{name}"));
            let mut want = layout.label_names().unwrap_or_default();
            let mut got: Vec<String> = v.words.iter().map(|w| w.0.to_owned()).collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "{name}");
            assert!(v.words.iter().all(|w| w.1.starts_with(' ')), "{name}");
            assert_eq!(v.template.contains("{b}"), layout.is_pair(), "{name}");
        }
        assert_eq!(authors_verbalizer("SST2"), authors_verbalizer("sst-2"));
        assert!(authors_verbalizer("imdb").is_none());
    }
}
