//! Evaluation: accuracy and loss of a model with an adapter over labelled samples, in
//! length-sorted batches. Federated evaluation adds the counts up over clients.

use anyhow::{Result, bail};
use fibecfed_data::{Sample, batch_of, by_length};
use fibecfed_transformer::{Adapter, Classifier, Reduction, cross_entropy};

/// Accuracy and mean loss over `samples`; batches are formed by length so that
/// little compute goes to padding (order does not change the result).
pub fn evaluate(
    model: &Classifier<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    batch_size: usize,
) -> Result<(f64, f64)> {
    if samples.is_empty() {
        bail!("the evaluation set is empty");
    }
    let c = evaluate_counts(model, adapter, samples, batch_size)?;
    if c.non_finite > 0 {
        bail!(
            "the model's outputs are not finite for {} of {} evaluation samples (training diverged? try a lower --lr)",
            c.non_finite,
            samples.len()
        );
    }
    Ok((
        c.correct as f64 / samples.len() as f64,
        c.loss_sum / samples.len() as f64,
    ))
}

/// What an evaluation pass counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalCounts {
    pub correct: usize,
    /// Σ loss over the samples whose logits are finite.
    pub loss_sum: f64,
    /// Samples whose logits are not finite (a diverged model): counted wrong, left out
    /// of the loss.
    pub non_finite: usize,
}

/// Correct predictions and the summed loss over `samples` (federated evaluation adds
/// these up over clients).
pub fn evaluate_counts(
    model: &Classifier<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    batch_size: usize,
) -> Result<EvalCounts> {
    let mut c = EvalCounts::default();
    for chunk in by_length(samples).chunks(batch_size.max(1)) {
        let batch = batch_of(samples, chunk, model.pad_token_id())?;
        let logits = model.logits(&batch, adapter)?;
        let finite: Vec<usize> = (0..chunk.len())
            .filter(|&r| logits.row(r).iter().all(|v| v.is_finite()))
            .collect();
        c.non_finite += chunk.len() - finite.len();
        if finite.is_empty() {
            continue;
        }
        let rows = logits.select(ndarray::Axis(0), &finite);
        let labels: Vec<usize> = finite.iter().map(|&r| samples[chunk[r]].label).collect();
        let (losses, _) = cross_entropy(&rows, &labels, Reduction::Sum)?;
        c.loss_sum += losses.sum();
        for (row, &y) in rows.rows().into_iter().zip(&labels) {
            let pred = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (j, &v)| {
                    if v > best.1 { (j, v) } else { best }
                })
                .0;
            c.correct += usize::from(pred == y);
        }
    }
    Ok(c)
}
