//! Named components: the config file says `kind = "..."`, the registry builds it.
//!
//! An algorithm developer who writes a new difficulty scorer, ordering, pacing, layer
//! selector or aggregator implements the crate's trait, registers a constructor under
//! a new name in [`Registry::builtin`]'s result, and passes that registry to
//! [`crate::engine::Engine::new`]; the config then names it. Nothing else changes.
//!
//! ```
//! use fibecfed_sim::registry::Registry;
//! use fibecfed_fisher::{DifficultyScorer, SampleStats};
//!
//! /// Hardness = the head's share of the Fisher trace.
//! #[derive(Debug)]
//! struct HeadShare;
//! impl DifficultyScorer for HeadShare {
//!     fn name(&self) -> &'static str { "head_share" }
//!     fn score(&self, s: &SampleStats) -> f64 { s.head / s.fisher.max(f64::MIN_POSITIVE) }
//! }
//!
//! let mut registry = Registry::builtin();
//! registry.scorers.insert("head_share".into(), Box::new(|| Box::new(HeadShare)));
//! // A config with `[curriculum] scorer = "head_share"` now uses it.
//! assert!(registry.scorer("head_share").is_ok());
//! ```

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use fibecfed_aggregation::{Aggregator, FedAdam, FedAvg, FedYogi};
use fibecfed_curriculum::{EasyFirst, HardFirst, Ordering, Pacing, PacingConfig, RandomOrder};
use fibecfed_fisher::{
    AllLayers, ConsensusTopK, DifficultyScorer, FisherTrace, FixedLayers, LayerSelector, LossScore,
    NoLayers, RandomLayers, ReportWeighting, SelectEnd,
};
use serde::Deserialize;

pub type ScorerFn = Box<dyn Fn() -> Box<dyn DifficultyScorer> + Send + Sync>;
pub type OrderingFn = Box<dyn Fn() -> Box<dyn Ordering> + Send + Sync>;
pub type PacingFn = Box<dyn Fn(&toml::Table) -> Result<Box<dyn Pacing>> + Send + Sync>;
/// Gets the section and the run's seed (for selectors that draw).
pub type SelectorFn =
    Box<dyn Fn(&toml::Table, u64) -> Result<Box<dyn LayerSelector>> + Send + Sync>;
pub type AggregatorFn = Box<dyn Fn(&toml::Table) -> Result<Box<dyn Aggregator>> + Send + Sync>;

/// Constructors by name, one map per pluggable part.
pub struct Registry {
    pub scorers: BTreeMap<String, ScorerFn>,
    pub orderings: BTreeMap<String, OrderingFn>,
    pub pacings: BTreeMap<String, PacingFn>,
    pub selectors: BTreeMap<String, SelectorFn>,
    pub aggregators: BTreeMap<String, AggregatorFn>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |m: Vec<&String>| m.into_iter().cloned().collect::<Vec<_>>();
        f.debug_struct("Registry")
            .field("scorers", &names(self.scorers.keys().collect()))
            .field("orderings", &names(self.orderings.keys().collect()))
            .field("pacings", &names(self.pacings.keys().collect()))
            .field("selectors", &names(self.selectors.keys().collect()))
            .field("aggregators", &names(self.aggregators.keys().collect()))
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayersSection {
    layers: Vec<usize>,
}

/// Settings of `consensus_top_k`: the fraction g, which end of the ranking travels
/// (`"most"`, the default, or `"least"`), and how reports are weighted (`"samples"`,
/// the default, or `"equal"`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsensusSection {
    #[serde(default = "half")]
    fraction: f64,
    #[serde(default)]
    end: SelectEnd,
    #[serde(default)]
    weighting: ReportWeighting,
}

/// Settings of the selectors that keep a fraction g of the layers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FractionSection {
    #[serde(default = "half")]
    fraction: f64,
}

fn half() -> f64 {
    0.5
}

/// A section whose only key is `kind`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindOnly {}

/// The section's settings, `kind` aside: an unknown key is an error listing the valid
/// ones.
fn parse<'de, T: Deserialize<'de>>(section: &toml::Table, what: &str) -> Result<T> {
    let mut settings = section.clone();
    settings.remove("kind");
    T::deserialize(toml::Value::Table(settings)).map_err(|e| anyhow!("{what}: {}", e.message()))
}

fn kind_of<'a>(section: &'a toml::Table, what: &str) -> Result<&'a str> {
    section
        .get("kind")
        .and_then(toml::Value::as_str)
        .ok_or_else(|| anyhow!("{what}: needs `kind = \"...\"`"))
}

fn lookup<'a, T>(map: &'a BTreeMap<String, T>, name: &str, what: &str) -> Result<&'a T> {
    map.get(name).ok_or_else(|| {
        let known: Vec<&str> = map.keys().map(String::as_str).collect();
        anyhow!("unknown {what} {name:?}; registered: {}", known.join(", "))
    })
}

impl Registry {
    /// Everything FIBECFED.md names.
    pub fn builtin() -> Self {
        let mut r = Self {
            scorers: BTreeMap::new(),
            orderings: BTreeMap::new(),
            pacings: BTreeMap::new(),
            selectors: BTreeMap::new(),
            aggregators: BTreeMap::new(),
        };
        r.scorers
            .insert("fisher".into(), Box::new(|| Box::new(FisherTrace)));
        r.scorers
            .insert("loss".into(), Box::new(|| Box::new(LossScore)));
        r.orderings
            .insert("easy_first".into(), Box::new(|| Box::new(EasyFirst)));
        r.orderings
            .insert("hard_first".into(), Box::new(|| Box::new(HardFirst)));
        r.orderings
            .insert("random".into(), Box::new(|| Box::new(RandomOrder)));
        for name in ["linear", "root", "geometric", "step", "constant"] {
            r.pacings.insert(
                name.into(),
                Box::new(|t| {
                    // The pacing config is tagged by `kind` itself.
                    let config = PacingConfig::deserialize(toml::Value::Table(t.clone()))
                        .map_err(|e| anyhow!("curriculum.pacing: {}", e.message()))?;
                    Ok(config.build()?)
                }),
            );
        }
        r.register_selectors();
        r.register_aggregators();
        r
    }

    /// The layer selectors of FIBECFED.md §3 and the baselines.
    fn register_selectors(&mut self) {
        let r = self;
        r.selectors.insert(
            "consensus_top_k".into(),
            Box::new(|t, _| {
                let s: ConsensusSection = parse(t, "sharing.selector")?;
                Ok(Box::new(ConsensusTopK {
                    fraction: s.fraction,
                    end: s.end,
                    weighting: s.weighting,
                }))
            }),
        );
        r.selectors.insert(
            "random".into(),
            Box::new(|t, seed| {
                let s: FractionSection = parse(t, "sharing.selector")?;
                Ok(Box::new(RandomLayers {
                    fraction: s.fraction,
                    seed,
                }))
            }),
        );
        r.selectors.insert(
            "fixed".into(),
            Box::new(|t, _| {
                let s: LayersSection = parse(t, "sharing.selector")?;
                Ok(Box::new(FixedLayers { layers: s.layers }))
            }),
        );
        r.selectors.insert(
            "all".into(),
            Box::new(|t, _| {
                parse::<KindOnly>(t, "sharing.selector")?;
                Ok(Box::new(AllLayers))
            }),
        );
        r.selectors.insert(
            "none".into(),
            Box::new(|t, _| {
                parse::<KindOnly>(t, "sharing.selector")?;
                Ok(Box::new(NoLayers))
            }),
        );
    }

    /// The server rules.
    fn register_aggregators(&mut self) {
        let r = self;
        r.aggregators.insert(
            "fedavg".into(),
            Box::new(|t| {
                parse::<KindOnly>(t, "aggregator")?;
                Ok(Box::new(FedAvg))
            }),
        );
        r.aggregators.insert(
            "fedadam".into(),
            Box::new(|t| Ok(Box::new(FedAdam::new(parse(t, "aggregator")?)?))),
        );
        r.aggregators.insert(
            "fedyogi".into(),
            Box::new(|t| Ok(Box::new(FedYogi::new(parse(t, "aggregator")?)?))),
        );
    }

    pub fn scorer(&self, name: &str) -> Result<Box<dyn DifficultyScorer>> {
        Ok(lookup(&self.scorers, name, "curriculum.scorer")?())
    }

    pub fn ordering(&self, name: &str) -> Result<Box<dyn Ordering>> {
        Ok(lookup(&self.orderings, name, "curriculum.ordering")?())
    }

    pub fn pacing(&self, section: &toml::Table) -> Result<Box<dyn Pacing>> {
        let kind = kind_of(section, "curriculum.pacing")?;
        lookup(&self.pacings, kind, "curriculum.pacing kind")?(section)
    }

    pub fn selector(&self, section: &toml::Table, seed: u64) -> Result<Box<dyn LayerSelector>> {
        let kind = kind_of(section, "sharing.selector")?;
        lookup(&self.selectors, kind, "sharing.selector kind")?(section, seed)
    }

    pub fn aggregator(&self, section: &toml::Table) -> Result<Box<dyn Aggregator>> {
        let kind = kind_of(section, "aggregator")?;
        lookup(&self.aggregators, kind, "aggregator kind")?(section)
    }

    /// Builds every component a config names, so that a typo fails before any work.
    pub fn check(&self, config: &crate::config::RunConfig) -> Result<()> {
        self.scorer(&config.curriculum.scorer)?;
        self.ordering(&config.curriculum.ordering)?;
        self.pacing(&config.curriculum.pacing)?;
        self.selector(&config.sharing.selector, config.seed)?;
        self.aggregator(&config.aggregator)?;
        if config.sharing.factors.is_empty()
            && config.sharing.head != crate::config::HeadMode::Shared
            && kind_of(&config.sharing.selector, "sharing.selector")? != "none"
        {
            bail!(
                "sharing: no factor and no head is shared, so nothing travels; say `selector = {{ kind = \"none\" }}` for local-only training"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::kind_table;
    use fibecfed_fisher::FisherError;

    #[test]
    fn fixed_layers_are_sorted_checked_and_need_no_reports() -> Result<()> {
        let registry = Registry::builtin();
        let mut t = kind_table("fixed");
        t.insert("layers".into(), toml::Value::try_from(vec![5, 1, 5])?);
        let s = registry.selector(&t, 0)?;
        assert!(!s.needs_reports());
        assert_eq!(s.select(&[], 6)?, [1, 5]);
        let err = s.select(&[], 4).unwrap_err();
        assert!(
            matches!(
                err,
                FisherError::NoSuchLayer {
                    layer: 5,
                    n_layers: 4,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("layer 5 does not exist"), "{err}");
        let err = registry.selector(&kind_table("fixed"), 0).unwrap_err();
        assert!(err.to_string().contains("layers"), "{err}");
        Ok(())
    }

    #[test]
    fn aggregators_are_built_by_the_name_a_config_gives() -> Result<()> {
        let registry = Registry::builtin();
        for name in ["fedavg", "fedadam", "fedyogi"] {
            assert_eq!(registry.aggregator(&kind_table(name))?.name(), name);
        }
        let err = registry
            .aggregator(&kind_table("fedsgd"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("fedsgd") && err.contains("fedavg"), "{err}");
        Ok(())
    }
}
