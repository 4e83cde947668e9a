//! One file per checkpoint: a safetensors file whose tensors are the run's arrays (f32
//! parameters and moments, f64 Fisher momentum) and whose metadata holds the rest as
//! JSON. One file, written through a rename, so a run killed at any instant leaves
//! either the previous checkpoint or the new one, never half of each.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::ArrayD;
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::output::write_atomic;

/// The metadata key of the JSON state.
const STATE_KEY: &str = "fibecfed_state";

/// What a checkpoint holds.
#[derive(Debug, Default, Clone)]
pub struct Contents {
    /// JSON text of the run state.
    pub state: String,
    pub f32: BTreeMap<String, ArrayD<f32>>,
    pub f64: BTreeMap<String, ArrayD<f64>>,
}

struct Raw<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

impl View for &Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw_f32(a: &ArrayD<f32>) -> Raw<'static> {
    Raw {
        dtype: Dtype::F32,
        shape: a.shape().to_vec(),
        bytes: Cow::Owned(a.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

fn raw_f64(a: &ArrayD<f64>) -> Raw<'static> {
    Raw {
        dtype: Dtype::F64,
        shape: a.shape().to_vec(),
        bytes: Cow::Owned(a.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// Writes `contents` to `path` atomically.
pub fn save(path: &Path, contents: &Contents) -> Result<()> {
    let mut raws: Vec<(String, Raw<'static>)> = Vec::new();
    for (name, a) in &contents.f32 {
        raws.push((name.clone(), raw_f32(a)));
    }
    for (name, a) in &contents.f64 {
        if contents.f32.contains_key(name) {
            bail!("checkpoint: tensor {name} is both f32 and f64");
        }
        raws.push((name.clone(), raw_f64(a)));
    }
    let metadata = HashMap::from([(STATE_KEY.to_owned(), contents.state.clone())]);
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), Some(metadata))
        .map_err(|e| anyhow!("checkpoint {}: {e}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Reads a checkpoint written by [`save`]; errors name the file and the tensor.
pub fn load(path: &Path) -> Result<Contents> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let bad = |what: String| anyhow!("checkpoint {} is damaged: {what}", path.display());
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| bad(format!("no {STATE_KEY} metadata")))?
        .clone();
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = Contents {
        state,
        ..Contents::default()
    };
    for (name, view) in tensors.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        match view.dtype() {
            Dtype::F32 => {
                let v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let a =
                    ArrayD::from_shape_vec(shape, v).map_err(|e| bad(format!("{name}: {e}")))?;
                out.f32.insert(name, a);
            }
            Dtype::F64 => {
                let v: Vec<f64> = data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect();
                let a =
                    ArrayD::from_shape_vec(shape, v).map_err(|e| bad(format!("{name}: {e}")))?;
                out.f64.insert(name, a);
            }
            other => return Err(bad(format!("tensor {name} has dtype {other:?}"))),
        }
    }
    Ok(out)
}
