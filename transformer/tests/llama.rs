//! The LLaMA decoder's forward pass against transformers' LlamaForCausalLM on
//! SmolLM2-135M-Instruct loaded from the same GGUF (float32, dequantised):
//! tests/fixtures/smollm2.logits.json, made by make_llama_fixture.py. Needs the file
//! (FIBECFED_SMOLLM2_GGUF, which `cargo xtask test` sets); prints "skipped" without it.
//! Also its per-sample LoRA gradients against PyTorch + PEFT (smollm2.grads.json, made
//! by make_llama_grad_fixture.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use fibecfed_lora::{LoraConfig, LoraParams, SiteId};
use fibecfed_transformer::{
    Adapter, Batch, LlamaModel, ModelError, Reduction, SiteHook, SiteTrace, cross_entropy,
};
use ndarray::{Array2, s};
use rand_chacha::rand_core::SeedableRng;

/// A JSON array of token ids.
fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn model_file(test: &str) -> Option<PathBuf> {
    use std::io::Write as _;
    let file = std::env::var_os("FIBECFED_SMOLLM2_GGUF").map(PathBuf::from);
    if file.is_none() {
        let line = format!("skipped: {test}: FIBECFED_SMOLLM2_GGUF is not set\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    file
}

/// Logits within 1e-4 of the reference: normwise over every sampled entry of every
/// position of 8 sentences, and each row's norm and sum over the whole vocabulary; the
/// last position's arg-max the same where it is not a near-tie.
#[test]
fn smollm2_logits_match_transformers() {
    let Some(file) = model_file("smollm2_logits_match_transformers") else {
        return;
    };
    let model = LlamaModel::<f32>::load(&file).unwrap();
    assert_eq!(model.config.layers, 30);
    assert_eq!((model.config.heads, model.config.kv_heads), (9, 3));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.logits.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let stride = want["stride"].as_u64().unwrap() as usize;
    let rows = want["rows"].as_array().unwrap();
    assert!(rows.len() >= 8);
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let ids: Vec<u32> = ids(&row["ids"]);
        let logits = model.logits(&ids).unwrap();
        assert_eq!(logits.nrows(), ids.len(), "{text:?}");
        let vocab = logits.ncols();
        for (p, sampled) in row["sampled"].as_array().unwrap().iter().enumerate() {
            let got = logits.row(p);
            for (i, w) in sampled.as_array().unwrap().iter().enumerate() {
                let (g, w) = (f64::from(got[i * stride]), w.as_f64().unwrap());
                diff2 += (g - w) * (g - w);
                ref2 += w * w;
            }
            let norm: f64 = got
                .iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt();
            let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
            let want_norm = row["row_norm"][p].as_f64().unwrap();
            let want_sum = row["row_sum"][p].as_f64().unwrap();
            assert!(
                (norm - want_norm).abs() <= 1e-4 * want_norm,
                "{text:?} position {p}: norm {norm} vs {want_norm}"
            );
            assert!(
                (sum - want_sum).abs() <= 1e-4 * want_norm * (vocab as f64).sqrt(),
                "{text:?} position {p}: sum {sum} vs {want_sum}"
            );
        }
        let last = logits.row(ids.len() - 1);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let want_top = row["argmax_last"].as_u64().unwrap() as usize;
        if last[order[0]] - last[order[1]] > 1e-3 {
            assert_eq!(order[0], want_top, "{text:?}: arg-max at the last position");
        }
    }
    let rel = (diff2 / ref2).sqrt();
    eprintln!("smollm2 logits: normwise relative error {rel:.2e} over the sampled entries");
    assert!(rel <= 1e-4, "normwise relative error {rel:e}");
}

#[test]
fn bad_inputs_are_errors() {
    let Some(file) = model_file("bad_inputs_are_errors") else {
        return;
    };
    let model = LlamaModel::<f32>::load(&file).unwrap();
    assert!(matches!(model.logits(&[]), Err(ModelError::Input(_))));
    let e = model.logits(&[1, 49152]).unwrap_err();
    assert!(
        e.to_string()
            .contains("token id 49152 (sequence 0, position 1)"),
        "{e}"
    );
    // A file that is not a model: its missing keys are named.
    let small = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gguf/tests/fixtures/small.gguf");
    let e = LlamaModel::<f32>::load(&small).unwrap_err();
    assert!(e.to_string().contains("llama.embedding_length"), "{e}");
}

/// The adapter of make_llama_grad_fixture.py: entry (i, j) of A and B of kind k (PEFT's
/// order q, k, v, o, gate, up, down) in layer l, in f64 then rounded to f32.
fn formula_adapter(model: &LlamaModel<f32>, layers: &[usize], rank: usize) -> LoraParams<f32> {
    use fibecfed_lora::SiteKind;
    let kinds = SiteKind::LLAMA;
    let sites: Vec<SiteId> = layers
        .iter()
        .flat_map(|&l| kinds.map(|k| SiteId::new(l, k)))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let cfg = LoraConfig::new(rank, 2.0 * rank as f32, &["q_proj"]);
    let mut p = LoraParams::init(&cfg, &model.site_shapes(&sites), 0, 0, &mut rng);
    for (site, w) in &mut p.sites {
        let k = kinds.iter().position(|&x| x == site.kind).unwrap() as f64;
        let l = site.layer as f64;
        w.a = Array2::from_shape_fn(w.a.dim(), |(i, j)| {
            (0.05 * (0.9 + 0.37 * i as f64 + 0.011 * j as f64 + 1.3 * k + 0.7 * l).sin()) as f32
        });
        w.b = Array2::from_shape_fn(w.b.dim(), |(i, j)| {
            (0.02 * (0.4 + 0.29 * i as f64 + 0.017 * j as f64 + 0.8 * k + 0.3 * l).cos()) as f32
        });
    }
    p
}

/// Per-sample gradients formed from the hook's traces, as the Fisher pass forms them.
struct PerSample {
    grads: Vec<LoraParams<f32>>,
}

impl SiteHook<f32> for PerSample {
    fn site(&mut self, t: &SiteTrace<'_, f32>) {
        for (b, g) in self.grads.iter_mut().enumerate() {
            let rows = s![b * t.seq_len..(b + 1) * t.seq_len, ..];
            let w = g.sites.get_mut(&t.site).unwrap();
            w.a += &(t.db.slice(rows).t().dot(&t.x.slice(rows)) * t.scale);
            w.b += &(t.delta.slice(rows).t().dot(&t.u.slice(rows)) * t.scale);
        }
    }
}

/// Per-sample LoRA gradients of a right-padded batch of 4 prompts, formed from the
/// per-site hook, against PEFT's gradients of each prompt run alone
/// (tests/fixtures/smollm2.grads.json, made by make_llama_grad_fixture.py): every
/// site's Frobenius norm, and normwise over every sampled entry of every site and
/// prompt, within 1e-4; the label logits within 1e-4 of their size.
#[test]
fn smollm2_lora_gradients_match_peft() {
    let Some(file) = model_file("smollm2_lora_gradients_match_peft") else {
        return;
    };
    let model = LlamaModel::<f32>::load(&file).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.grads.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let rank = want["rank"].as_u64().unwrap() as usize;
    let stride = want["stride"].as_u64().unwrap() as usize;
    let words: Vec<u32> = ids(&want["word_ids"]);
    let rows = want["rows"].as_array().unwrap();
    let seqs: Vec<Vec<u32>> = rows.iter().map(|r| ids(&r["ids"])).collect();
    let labels: Vec<usize> = rows
        .iter()
        .map(|r| r["label"].as_u64().unwrap() as usize)
        .collect();
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (vec![0u32; seqs.len() * t], vec![false; seqs.len() * t]);
    for (b, s) in seqs.iter().enumerate() {
        ids[b * t..b * t + s.len()].copy_from_slice(s);
        mask[b * t..b * t + s.len()].fill(true);
    }
    let n = ids.len();
    let batch = Batch::from_parts(seqs.len(), t, ids, vec![0; n], mask).unwrap();
    let params = formula_adapter(&model, &[0, 14, 29], rank);
    let alpha = want["alpha"].as_f64().unwrap() as f32;
    let adapter = Adapter {
        params: &params,
        scale: alpha / rank as f32,
    };
    let fwd = model.forward(&batch, adapter, None, &words).unwrap();
    // Summed losses: each sample's gradient is that of its own loss.
    let (_, d) = cross_entropy(&fwd.logits, &labels, Reduction::Sum).unwrap();
    let mut hook = PerSample {
        grads: vec![params.zeros_like(); seqs.len()],
    };
    model
        .backward(&batch, adapter, &fwd, &d, &mut hook)
        .unwrap();
    let (mut diff2, mut ref2, mut worst_norm) = (0.0f64, 0.0f64, 0.0f64);
    for (b, row) in rows.iter().enumerate() {
        for (c, w) in row["logits"].as_array().unwrap().iter().enumerate() {
            let (g, w) = (f64::from(fwd.logits[[b, c]]), w.as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "prompt {b} logit {c}: {g} vs {w}"
            );
        }
        for g in row["grads"].as_array().unwrap() {
            let layer = g["layer"].as_u64().unwrap() as usize;
            // PEFT's module name, e.g. "q_proj", ends the kind's LLaMA path.
            let name = g["kind"].as_str().unwrap();
            let kind = fibecfed_lora::SiteKind::LLAMA
                .into_iter()
                .find(|k| k.llama_suffix().ends_with(&format!(".{name}")))
                .unwrap_or_else(|| panic!("kind {name}"));
            let w = &hook.grads[b].sites[&SiteId::new(layer, kind)];
            let m = if g["factor"] == "A" { &w.a } else { &w.b };
            let shape: Vec<usize> = g["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(m.shape(), &shape[..]);
            let flat: Vec<f64> = m.iter().map(|&v| f64::from(v)).collect();
            let norm = flat.iter().map(|v| v * v).sum::<f64>().sqrt();
            let want_norm = g["norm"].as_f64().unwrap();
            let rel = (norm - want_norm).abs() / want_norm;
            worst_norm = worst_norm.max(rel);
            assert!(
                rel <= 1e-4,
                "prompt {b} layer {layer} {kind:?} {}: norm {norm} vs {want_norm}",
                g["factor"]
            );
            for (i, w) in g["sampled"].as_array().unwrap().iter().enumerate() {
                let (x, w) = (flat[i * stride], w.as_f64().unwrap());
                diff2 += (x - w) * (x - w);
                ref2 += w * w;
            }
        }
    }
    let rel = (diff2 / ref2).sqrt();
    eprintln!(
        "smollm2 per-sample LoRA gradients: normwise relative error {rel:.2e} over the sampled entries, worst norm {worst_norm:.2e}"
    );
    assert!(rel <= 1e-4, "normwise relative error {rel:e}");
}

/// The prompted encoder (the template's text and each example tokenised piece by piece)
/// gives the ids transformers' GGUF tokenizer gives the whole prompt string, for the
/// fixture's prompts; the label words are single tokens with those ids.
#[test]
fn smollm2_prompts_tokenise_as_transformers_does() {
    use fibecfed_transformer::{PromptTemplate, TextEncoder};
    let Some(file) = model_file("smollm2_prompts_tokenise_as_transformers_does") else {
        return;
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.grads.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let template = PromptTemplate::parse(
        want["template"]
            .as_str()
            .unwrap()
            .replace("{}", "{a}")
            .as_str(),
    )
    .unwrap();
    let tok = TextEncoder::from_gguf(&file, 64, template).unwrap();
    for row in want["rows"].as_array().unwrap() {
        let ids: Vec<u32> = ids(&row["ids"]);
        let got = tok.encode(row["text"].as_str().unwrap(), None).unwrap();
        assert_eq!(got.ids, ids, "{:?}", row["text"]);
    }
    let words: Vec<String> = want["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .collect();
    let ids: Vec<u32> = ids(&want["word_ids"]);
    assert_eq!(tok.label_ids(&words).unwrap(), ids);
    // A long text is cut from its end; the template's tail stays.
    let short =
        TextEncoder::from_gguf(&file, 8, PromptTemplate::parse("{a} . It was").unwrap()).unwrap();
    let long = short
        .encode("one two three four five six seven eight nine ten", None)
        .unwrap();
    assert_eq!(long.ids.len(), 8);
    // The template around an empty text is the template's own tokens.
    let tail = tok.encode("", None).unwrap().ids;
    assert!(
        !tail.is_empty() && long.ids.ends_with(&tail),
        "{long:?} {tail:?}"
    );
    assert!(
        short.encode("a", Some("b")).is_err(),
        "a pair into a one-text prompt"
    );
    assert!(tok.label_ids(&[" xqzvkjw".to_owned()]).is_err());
}
