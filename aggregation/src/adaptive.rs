//! FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization"): the
//! server treats Δ = mean − global as a pseudo-gradient and takes one adaptive step.

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

use crate::{AggregationError, Aggregator, Tensors, Update, mean_f64};

/// Server optimiser settings; the defaults are the paper's: η = 1e-2, β1 = 0.9,
/// β2 = 0.99, τ = 1e-3.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerOptConfig {
    /// Server learning rate η.
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// Adaptivity τ: added to √v, and τ² is the second moment's starting value.
    pub tau: f64,
}

impl Default for ServerOptConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

impl ServerOptConfig {
    /// Refuses lr ≤ 0, betas outside [0, 1), τ ≤ 0, and anything not finite.
    pub fn validate(&self) -> Result<(), AggregationError> {
        let bad = |field: &str, value: f64, expected: &str| {
            Err(AggregationError::Config(format!(
                "server optimiser `{field}` is {value}, expected {expected}"
            )))
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr, "a finite value > 0");
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(field, beta, "a value in [0, 1)");
            }
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad("tau", self.tau, "a finite value > 0");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecondMoment {
    /// v ← β2 v + (1−β2) Δ².
    Adam,
    /// v ← v − (1−β2) Δ² sign(v − Δ²): v moves towards Δ² by a step that does not
    /// grow with v, so it forgets a large past second moment more slowly than Adam.
    Yogi,
}

/// The code FedAdam and FedYogi share; moments are kept in f32 so that `state()`
/// holds them exactly, while each element is computed in f64.
#[derive(Debug, Clone)]
struct Adaptive {
    config: ServerOptConfig,
    rule: SecondMoment,
    m: Tensors,
    v: Tensors,
}

impl Adaptive {
    fn new(config: ServerOptConfig, rule: SecondMoment) -> Result<Self, AggregationError> {
        config.validate()?;
        Ok(Self {
            config,
            rule,
            m: Tensors::new(),
            v: Tensors::new(),
        })
    }

    fn aggregate(
        &mut self,
        global: &Tensors,
        updates: &[Update],
    ) -> Result<Tensors, AggregationError> {
        let mean = mean_f64(global, updates)?;
        // Checked before any moment changes, so a refused round leaves the state as it was.
        for (name, x) in global {
            for (kind, moments) in [("m", &self.m), ("v", &self.v)] {
                if let Some(moment) = moments.get(name).filter(|t| t.shape() != x.shape()) {
                    return Err(AggregationError::State(format!(
                        "`{kind}/{name}` has shape {:?}, but the global tensor has {:?}",
                        moment.shape(),
                        x.shape()
                    )));
                }
            }
        }
        let (c, rule) = (self.config, self.rule);
        let mut out = Tensors::new();
        for (name, x) in global {
            // Moments start when a tensor first takes part: m at 0, v at τ² (the
            // paper's v_{-1} ≥ τ²); tensors left out of a round keep theirs.
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(x.raw_dim()));
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| ArrayD::from_elem(x.raw_dim(), (c.tau * c.tau) as f32));
            let mut new = x.clone();
            Zip::from(&mut new)
                .and(m)
                .and(v)
                .and(&mean[name])
                .for_each(|x, m, v, &avg| {
                    let delta = avg - f64::from(*x);
                    let m1 = c.beta1 * f64::from(*m) + (1.0 - c.beta1) * delta;
                    let (v0, d2) = (f64::from(*v), delta * delta);
                    let v1 = match rule {
                        SecondMoment::Adam => c.beta2 * v0 + (1.0 - c.beta2) * d2,
                        SecondMoment::Yogi => v0 - (1.0 - c.beta2) * d2 * sign(v0 - d2),
                    };
                    *x = (f64::from(*x) + c.lr * m1 / (v1.sqrt() + c.tau)) as f32;
                    *m = m1 as f32;
                    *v = v1 as f32;
                });
            out.insert(name.clone(), new);
        }
        Ok(out)
    }

    fn state(&self) -> Tensors {
        let tagged = |kind: &'static str, moments: &'_ Tensors| {
            moments
                .iter()
                .map(move |(name, t)| (format!("{kind}/{name}"), t.clone()))
                .collect::<Vec<_>>()
        };
        tagged("m", &self.m)
            .into_iter()
            .chain(tagged("v", &self.v))
            .collect()
    }

    fn load_state(&mut self, state: &Tensors) -> Result<(), AggregationError> {
        let err = |msg: String| Err(AggregationError::State(msg));
        let (mut m, mut v) = (Tensors::new(), Tensors::new());
        for (key, t) in state {
            let (moments, name) = match key.split_once('/') {
                Some(("m", name)) => (&mut m, name),
                Some(("v", name)) => (&mut v, name),
                _ => return err(format!("`{key}` is not `m/<tensor>` or `v/<tensor>`")),
            };
            if !t.iter().all(|x| x.is_finite()) {
                return err(format!("`{key}` holds a NaN or infinite value"));
            }
            moments.insert(name.to_string(), t.clone());
        }
        for (name, vt) in &v {
            if vt.iter().any(|&x| x < 0.0) {
                return err(format!("`v/{name}` holds a negative second moment"));
            }
        }
        for (name, mt) in &m {
            match v.get(name) {
                None => return err(format!("`m/{name}` has no matching `v/{name}`")),
                Some(vt) if vt.shape() != mt.shape() => {
                    return err(format!(
                        "`m/{name}` has shape {:?} but `v/{name}` has {:?}",
                        mt.shape(),
                        vt.shape()
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(name) = v.keys().find(|name| !m.contains_key(*name)) {
            return err(format!("`v/{name}` has no matching `m/{name}`"));
        }
        (self.m, self.v) = (m, v);
        Ok(())
    }
}

/// sign with sign(0) = 0 (f64::signum gives ±1 at zero): at v = Δ² Yogi leaves v alone.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

macro_rules! adaptive_rule {
    ($(#[$doc:meta])* $ty:ident, $rule:expr, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $ty(Adaptive);

        impl $ty {
            /// A fresh optimiser (no moments yet); refuses invalid settings.
            pub fn new(config: ServerOptConfig) -> Result<Self, AggregationError> {
                Adaptive::new(config, $rule).map(Self)
            }

            pub fn config(&self) -> ServerOptConfig {
                self.0.config
            }
        }

        impl Aggregator for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn aggregate(
                &mut self,
                global: &Tensors,
                updates: &[Update],
            ) -> Result<Tensors, AggregationError> {
                self.0.aggregate(global, updates)
            }

            /// `m/<tensor>` and `v/<tensor>` for every tensor seen so far. No step count:
            /// without bias correction the update does not depend on it.
            fn state(&self) -> Tensors {
                self.0.state()
            }

            fn load_state(&mut self, state: &Tensors) -> Result<(), AggregationError> {
                self.0.load_state(state)
            }
        }
    };
}

adaptive_rule!(
    /// FedAdam: Δ = mean − x; m ← β1 m + (1−β1) Δ; v ← β2 v + (1−β2) Δ²;
    /// x ← x + η m / (√v + τ), without bias correction (as in the paper).
    FedAdam,
    SecondMoment::Adam,
    "fedadam"
);

adaptive_rule!(
    /// FedYogi: FedAdam with Yogi's second moment v ← v − (1−β2) Δ² sign(v − Δ²).
    FedYogi,
    SecondMoment::Yogi,
    "fedyogi"
);
