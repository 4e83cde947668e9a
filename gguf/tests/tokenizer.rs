//! The tokenizer built from `tokenizer.ggml.*` against transformers' GGUF loader on the
//! real SmolLM2 file (ids of tests/fixtures/smollm2.tokens.json, made by
//! make_tokenizer_fixture.py; needs FIBECFED_SMOLLM2_GGUF, prints "skipped" without it),
//! and, on small files written here, the keys it refuses, each named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use fibecfed_gguf::{Gguf, GgufError, tokenizer};

#[test]
fn smollm2_ids_match_transformers() {
    use std::io::Write as _;
    let Some(path) = std::env::var_os("FIBECFED_SMOLLM2_GGUF").map(PathBuf::from) else {
        let line = "skipped: smollm2_ids_match_transformers: FIBECFED_SMOLLM2_GGUF is not set\n";
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        return;
    };
    let g = Gguf::open(&path).unwrap();
    let tok = tokenizer(&g).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.tokens.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let rows = want["rows"].as_array().unwrap();
    assert!(rows.len() >= 8);
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let ids: Vec<u32> = row["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got.get_ids(), ids.as_slice(), "{text:?}");
        // Byte-level BPE loses nothing: the ids decode back to the text.
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
    }
    // The loader's BOS is the file's bos_token_id, and the file says not to add it.
    assert_eq!(g.get_u64("tokenizer.ggml.bos_token_id").unwrap(), 1);
    assert!(!g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    let with = rows[0]["ids_with_special"].as_array().unwrap();
    assert_eq!(with[0].as_u64(), Some(1));
}

// ---- small files written here ----

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// An array value: element type, length, encoded elements.
fn array(elem: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut v = elem.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    for i in items {
        v.extend(i);
    }
    v
}

fn strings(items: &[&str]) -> Vec<u8> {
    array(8, &items.iter().map(|s| gstr(s)).collect::<Vec<_>>())
}

fn ints(items: &[i32]) -> Vec<u8> {
    array(
        5,
        &items
            .iter()
            .map(|i| i.to_le_bytes().to_vec())
            .collect::<Vec<_>>(),
    )
}

/// A GGUF of metadata only: (key, value type id, encoded value).
fn file(meta: &[(&str, u32, Vec<u8>)]) -> Gguf {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, t, v) in meta {
        b.extend(gstr(k));
        b.extend(t.to_le_bytes());
        b.extend(v);
    }
    Gguf::from_bytes("tok.gguf", b).unwrap()
}

const TOKENS: [&str; 8] = ["<unk>", "<s>", "a", "b", "ab", "Ġ", "Ġab", "c"];

fn good() -> Vec<(&'static str, u32, Vec<u8>)> {
    vec![
        ("tokenizer.ggml.model", 8, gstr("gpt2")),
        ("tokenizer.ggml.tokens", 9, strings(&TOKENS)),
        ("tokenizer.ggml.merges", 9, strings(&["a b", "Ġ ab"])),
        (
            "tokenizer.ggml.token_type",
            9,
            ints(&[3, 3, 1, 1, 1, 1, 1, 1]),
        ),
        (
            "tokenizer.ggml.unknown_token_id",
            4,
            0u32.to_le_bytes().to_vec(),
        ),
    ]
}

#[test]
fn a_small_vocabulary_tokenizes_with_its_merges() {
    let tok = tokenizer(&file(&good())).unwrap();
    // "ab ab": "ab" merges; " ab" is Ġ + ab, merged by the second rule.
    assert_eq!(tok.encode("ab ab", false).unwrap().get_ids(), &[4, 6]);
    assert_eq!(tok.encode("abc", false).unwrap().get_ids(), &[4, 7]);
    // Control tokens in the text are one token each.
    assert_eq!(tok.encode("<s>ab", false).unwrap().get_ids(), &[1, 4]);
    assert_eq!(tok.decode(&[1, 4, 6], false).unwrap(), "<s>ab ab");
}

fn tokenizer_error(meta: &[(&'static str, u32, Vec<u8>)]) -> String {
    match tokenizer(&file(meta)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_tokenizer_keys_are_named() {
    let with = |key: &'static str, t: u32, v: Vec<u8>| {
        let mut m = good();
        m.retain(|e| e.0 != key);
        m.push((key, t, v));
        m
    };
    let cases = [
        (
            with("tokenizer.ggml.model", 8, gstr("llama")),
            "tok.gguf: tokenizer.ggml.model: \"llama\": only \"gpt2\" (byte-level BPE) is built",
        ),
        (
            with("tokenizer.ggml.merges", 9, strings(&["a b", "a z"])),
            "tok.gguf: tokenizer.ggml.merges: merge 1 (\"a z\") is not two tokens of the vocabulary",
        ),
        (
            with("tokenizer.ggml.merges", 9, strings(&["ab"])),
            "merge 0 (\"ab\") is not two tokens",
        ),
        (
            with("tokenizer.ggml.tokens", 9, strings(&["a", "b", "a"])),
            "tok.gguf: tokenizer.ggml.tokens: token \"a\" appears twice (ids 0 and 2)",
        ),
        (
            with("tokenizer.ggml.token_type", 9, ints(&[1, 1])),
            "tok.gguf: tokenizer.ggml.token_type: should be an array of 8 int32, found an array of 2",
        ),
        (
            with(
                "tokenizer.ggml.unknown_token_id",
                4,
                99u32.to_le_bytes().to_vec(),
            ),
            "tok.gguf: tokenizer.ggml.unknown_token_id: U32(99) is not a token id below 8",
        ),
        (
            with("tokenizer.ggml.tokens", 8, gstr("a")),
            "metadata key \"tokenizer.ggml.tokens\" should be an array of strings, found string",
        ),
    ];
    for (meta, want) in cases {
        let text = tokenizer_error(&meta);
        assert!(text.contains(want), "{text}\n  should contain: {want}");
    }
    let mut m = good();
    m.retain(|e| e.0 != "tokenizer.ggml.merges");
    let e = tokenizer(&file(&m)).unwrap_err();
    assert!(
        matches!(&e, GgufError::MissingKey { key, .. } if key == "tokenizer.ggml.merges"),
        "{e}"
    );
}
