//! Differential privacy per aggregation.
//!
//! An aggregation with an `[aggregation.dp]` table has each facilitator add noise to its own
//! aggregate share right before it releases it, with prio's `AggregatorWithNoise` and the
//! `PureDpDiscreteLaplace` strategy:
//!
//! ```toml
//! [aggregation.dp]
//! strategy = "pure-dp-discrete-laplace"
//! epsilon = { numerator = 1, denominator = 2 }   # ε = 1/2, a rational as in Janus's task config
//! ```
//!
//! For every coordinate of its share, prio draws an integer from the discrete Laplace
//! distribution with scale `t = Δ/ε`: `P(X = x) = (1 - q)/(1 + q) · q^|x|` with
//! `q = exp(-1/t) = exp(-ε/Δ)`. `Δ` is the L1 sensitivity of the aggregate when one client's
//! measurement is replaced by another (prio's substitution model): 2 for a Histogram (one bucket
//! loses a count, another gains one) and `(2^bits - 1) · length` for a SumVec, `bits` being the
//! bit length of `max_measurement`. One facilitator's noise alone makes the released result
//! ε-differentially private, so the guarantee holds while either facilitator is honest; the
//! result the collector unshards carries the sum of the two draws. prio implements this noise
//! for Histogram and SumVec only, so a DP table on a Count or Sum aggregation is a config error.
//!
//! Two draws make the result less exact than it would be, by an amount that depends only on ε and
//! `Δ`: [`DpStrategy::noise_bound`] is the largest per-coordinate difference between the released
//! result and the plaintext that an honest pair of facilitators exceeds with probability at most
//! [`NOISE_BOUND_FAILURE`]. `millrace demo` and `millrace status --expect` accept a difference
//! up to that bound for a DP aggregation ([`accepts`]), and none at all otherwise.

use std::fmt;

use prio::dp::distributions::PureDpDiscreteLaplace;
use prio::dp::{DifferentialPrivacyStrategy, PureDpBudget, Rational};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::vdaf::{AggregateValue, VdafSpec};

/// How often honest noise may exceed [`DpStrategy::noise_bound`], per coordinate of a result.
pub const NOISE_BOUND_FAILURE: f64 = 1e-9;

/// Why a DP setting was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DpError {
    #[error("dp.epsilon {numerator}/{denominator}: {reason}")]
    Epsilon {
        numerator: i64,
        denominator: i64,
        reason: &'static str,
    },
    #[error(
        "dp: a {variant} aggregation cannot take differential privacy noise (prio adds it to \
         Histogram and SumVec only)"
    )]
    Unsupported { variant: &'static str },
    #[error("dp: {0}")]
    Parameters(String),
}

/// The `strategy` of a `[aggregation.dp]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpStrategyName {
    /// prio's `PureDpDiscreteLaplace`: ε-DP by discrete Laplace noise with scale `Δ/ε`.
    PureDpDiscreteLaplace,
}

impl fmt::Display for DpStrategyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DpStrategyName::PureDpDiscreteLaplace => write!(f, "pure-dp-discrete-laplace"),
        }
    }
}

/// `epsilon = { numerator = 1, denominator = 2 }`: ε as a fraction of two positive integers.
/// Signed here only so that a negative number is refused with a message of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpsilonEntry {
    pub numerator: i64,
    pub denominator: i64,
}

/// The `[aggregation.dp]` table of the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpEntry {
    pub strategy: DpStrategyName,
    pub epsilon: EpsilonEntry,
}

/// ε, a positive fraction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epsilon {
    numerator: u64,
    denominator: u64,
}

impl Epsilon {
    pub fn new(numerator: i64, denominator: i64) -> Result<Self, DpError> {
        let refuse = |reason| DpError::Epsilon {
            numerator,
            denominator,
            reason,
        };
        if denominator == 0 {
            return Err(refuse("the denominator is zero"));
        }
        if numerator == 0 {
            return Err(refuse("epsilon must be greater than zero"));
        }
        match (u64::try_from(numerator), u64::try_from(denominator)) {
            (Ok(numerator), Ok(denominator)) => Ok(Epsilon {
                numerator,
                denominator,
            }),
            _ => Err(refuse(
                "numerator and denominator must both be positive integers",
            )),
        }
    }

    pub fn numerator(&self) -> u64 {
        self.numerator
    }

    pub fn denominator(&self) -> u64 {
        self.denominator
    }

    pub fn as_f64(&self) -> f64 {
        self.numerator as f64 / self.denominator as f64
    }
}

impl fmt::Display for Epsilon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.numerator, self.denominator)
    }
}

/// The L1 sensitivity prio calibrates its noise to, for the variants it can noise (`None` for
/// Count and Sum). Mirrors `prio::flp::types::dp`: 2 for a Histogram; `(2^bits - 1) · length`
/// for a SumVec, with `bits` the bit length of `max_measurement`.
pub fn sensitivity(spec: &VdafSpec) -> Option<u128> {
    match spec {
        VdafSpec::Count {} | VdafSpec::Sum { .. } => None,
        VdafSpec::Histogram { .. } => Some(2),
        VdafSpec::SumVec {
            max_measurement,
            length,
            ..
        } => {
            let bits = 64 - max_measurement.leading_zeros();
            let largest = (1u128 << bits) - 1;
            largest.checked_mul(u128::try_from(*length).ok()?)
        }
    }
}

fn variant_name(spec: &VdafSpec) -> &'static str {
    match spec {
        VdafSpec::Count {} => "Count",
        VdafSpec::Sum { .. } => "Sum",
        VdafSpec::Histogram { .. } => "Histogram",
        VdafSpec::SumVec { .. } => "SumVec",
    }
}

/// One aggregation's differential privacy, checked against its VDAF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpStrategy {
    name: DpStrategyName,
    epsilon: Epsilon,
    sensitivity: u128,
    bound: u64,
}

impl DpStrategy {
    /// The strategy `name` with `epsilon` for an aggregation of `spec`: refused for a variant
    /// prio cannot noise.
    pub fn new(name: DpStrategyName, epsilon: Epsilon, spec: &VdafSpec) -> Result<Self, DpError> {
        let sensitivity = sensitivity(spec).ok_or(DpError::Unsupported {
            variant: variant_name(spec),
        })?;
        let rate = epsilon.as_f64() / sensitivity as f64;
        let bound = bound_for_rate(rate).ok_or_else(|| {
            DpError::Parameters(format!(
                "epsilon {epsilon} with sensitivity {sensitivity} makes noise too large to \
                 bound in 64 bits"
            ))
        })?;
        Ok(DpStrategy {
            name,
            epsilon,
            sensitivity,
            bound,
        })
    }

    /// Parses a `[aggregation.dp]` table for an aggregation of `spec`.
    pub fn from_entry(entry: &DpEntry, spec: &VdafSpec) -> Result<Self, DpError> {
        let epsilon = Epsilon::new(entry.epsilon.numerator, entry.epsilon.denominator)?;
        Self::new(entry.strategy, epsilon, spec)
    }

    pub fn name(&self) -> DpStrategyName {
        self.name
    }

    pub fn epsilon(&self) -> Epsilon {
        self.epsilon
    }

    /// The L1 sensitivity the noise is calibrated to (see [`sensitivity`]).
    pub fn sensitivity(&self) -> u128 {
        self.sensitivity
    }

    /// The largest difference, per coordinate, between a released result and the plaintext
    /// result that is accepted: honest noise of both facilitators exceeds it with probability at
    /// most [`NOISE_BOUND_FAILURE`] (see [`two_draw_tail`]).
    pub fn noise_bound(&self) -> u64 {
        self.bound
    }

    /// prio's strategy object for this setting.
    pub(crate) fn prio_strategy(&self) -> Result<PureDpDiscreteLaplace, DpError> {
        let prio = |e: prio::dp::DpError| DpError::Parameters(e.to_string());
        let epsilon = Rational::from_unsigned(self.epsilon.numerator, self.epsilon.denominator)
            .map_err(prio)?;
        let budget = PureDpBudget::new(epsilon).map_err(prio)?;
        Ok(match self.name {
            DpStrategyName::PureDpDiscreteLaplace => PureDpDiscreteLaplace::from_budget(budget),
        })
    }
}

impl fmt::Display for DpStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, epsilon {}", self.name, self.epsilon)
    }
}

/// `P(|X₀ + X₁| > b)` for two independent discrete Laplace draws with `q = exp(-rate)`
/// (`rate = ε/Δ`, the inverse of prio's scale): the probability that the noise both
/// facilitators add to one coordinate moves it by more than `b`.
///
/// Derivation. One draw has `P(X = x) = c·q^|x|` with `c = (1 - q)/(1 + q)`. For the sum
/// `S = X₀ + X₁` and `s ≥ 0`, `P(S = s) = c² Σₓ q^(|x| + |s - x|)`: each `x` in `0..=s` contributes
/// `q^s`, and each `x = -k` or `x = s + k` (`k ≥ 1`) contributes `q^s·q^(2k)`, so
/// `P(S = s) = c²·q^s·(s + 1 + 2q²/(1 - q²))`. Summing the geometric series, with `u = 1 - q`,
///
/// `P(S ≥ m) = q^m·(m·u + 1 + 2q²/(1 + q)) / (1 + q)²` for `m ≥ 0`
///
/// (as a check, `P(S ≥ 0) + P(S ≥ 1) = 1`, as the symmetry of `S` requires), and by symmetry
/// `P(|S| > b) = 2·P(S ≥ b + 1)`. It is computed in logarithms, `ln q = -rate` exactly, so a
/// tiny rate (a huge scale) loses no precision.
pub fn two_draw_tail(rate: f64, b: u64) -> f64 {
    two_draw_tail_ln(rate, b).exp()
}

fn two_draw_tail_ln(rate: f64, b: u64) -> f64 {
    let q = (-rate).exp();
    let u = -(-rate).exp_m1();
    let m = b as f64 + 1.0;
    std::f64::consts::LN_2 - m * rate + (m * u + 1.0 + 2.0 * q * q / (1.0 + q)).ln()
        - 2.0 * (1.0 + q).ln()
}

/// The smallest `b` with `two_draw_tail(rate, b) ≤ NOISE_BOUND_FAILURE` (`None` if it would not
/// fit in 62 bits). The tail falls as `b` grows, so a doubling search then a bisection finds it.
fn bound_for_rate(rate: f64) -> Option<u64> {
    if !(rate.is_finite() && rate > 0.0) {
        return None;
    }
    let target = NOISE_BOUND_FAILURE.ln();
    let within = |b: u64| two_draw_tail_ln(rate, b) <= target;
    if within(0) {
        return Some(0);
    }
    let mut high: u64 = 1;
    while !within(high) {
        high = high.checked_mul(2).filter(|h| *h < 1 << 62)?;
    }
    let mut low = high / 2; // not within (either 0 or a value the doubling passed)
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if within(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Some(high)
}

/// A released result minus the plaintext result, coordinate by coordinate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    scalar: bool,
    values: Vec<i128>,
}

impl Difference {
    /// `released - plaintext`; `None` if the two have different shapes.
    pub fn between(released: &AggregateValue, plaintext: &AggregateValue) -> Option<Self> {
        let values = match (released, plaintext) {
            (AggregateValue::Scalar(r), AggregateValue::Scalar(p)) => {
                vec![i128::from(*r) - i128::from(*p)]
            }
            (AggregateValue::Vector(r), AggregateValue::Vector(p)) if r.len() == p.len() => r
                .iter()
                .zip(p)
                .map(|(r, p)| i128::from(*r) - i128::from(*p))
                .collect(),
            _ => return None,
        };
        Some(Difference {
            scalar: matches!(released, AggregateValue::Scalar(_)),
            values,
        })
    }

    pub fn values(&self) -> &[i128] {
        &self.values
    }

    /// The largest absolute difference of any coordinate.
    pub fn largest(&self) -> u128 {
        self.values
            .iter()
            .map(|v| v.unsigned_abs())
            .max()
            .unwrap_or(0)
    }

    pub fn is_zero(&self) -> bool {
        self.largest() == 0
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let signed = |v: &i128| {
            if *v > 0 {
                format!("+{v}")
            } else {
                v.to_string()
            }
        };
        if self.scalar {
            write!(f, "{}", self.values.first().map(signed).unwrap_or_default())
        } else {
            let parts: Vec<String> = self.values.iter().map(signed).collect();
            write!(f, "[{}]", parts.join(", "))
        }
    }
}

/// Whether `released` is an acceptable release of `plaintext`: equal to it when `bound` is
/// `None` (no differential privacy); otherwise of the same shape with every coordinate within
/// `bound` of it ([`DpStrategy::noise_bound`]).
pub fn accepts(bound: Option<u64>, released: &AggregateValue, plaintext: &AggregateValue) -> bool {
    match bound {
        None => released == plaintext,
        Some(bound) => Difference::between(released, plaintext)
            .is_some_and(|d| d.largest() <= u128::from(bound)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::VerifyKey;
    use crate::vdaf::{Accumulator, Measurement, Prio3Vdaf, ReportId};
    use prio::field::{Field128, FieldElementWithInteger};
    use rand::SeedableRng;

    fn histogram(length: usize) -> VdafSpec {
        VdafSpec::Histogram {
            length,
            chunk_length: 4,
        }
    }

    fn strategy(numerator: i64, denominator: i64, spec: &VdafSpec) -> DpStrategy {
        let epsilon = Epsilon::new(numerator, denominator).unwrap();
        DpStrategy::new(DpStrategyName::PureDpDiscreteLaplace, epsilon, spec).unwrap()
    }

    /// The coordinates of an aggregate share as integers: a field element in the upper half of
    /// the field is a negative number.
    fn signed(acc: &Accumulator) -> Vec<i128> {
        let field: &[Field128] = match acc {
            Accumulator::Histogram(a) => a.as_ref(),
            Accumulator::SumVec(a) => a.as_ref(),
            other => panic!("no noise on {other:?}"),
        };
        let p = Field128::modulus();
        field
            .iter()
            .map(|f| {
                let x = u128::from(*f);
                if x > p / 2 {
                    -((p - x) as i128)
                } else {
                    x as i128
                }
            })
            .collect()
    }

    /// `n` single draws of one facilitator's noise, taken from real noised shares (fresh empty
    /// accumulators, so the share is the noise).
    fn noise_samples(spec: &VdafSpec, dp: &DpStrategy, n: usize) -> Vec<i128> {
        let vdaf = Prio3Vdaf::new(spec, "dp-test").unwrap();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let mut acc = vdaf.accumulator();
            vdaf.add_noise(dp, &mut acc, 0).unwrap();
            out.extend(signed(&acc));
        }
        out.truncate(n);
        out
    }

    /// Each frequency check below is wrong (an honest sample fails it) with probability at most
    /// this; see [`spread_check`].
    const CHECK_FAILURE: f64 = 1e-8;

    /// Hoeffding's half-width for a frequency of `n` independent indicators: the observed
    /// frequency `p̂` of an event of probability `p` has `P(|p̂ - p| ≥ δ) ≤ 2·exp(-2nδ²)`, which
    /// is `CHECK_FAILURE` for `δ = sqrt(ln(2/CHECK_FAILURE) / 2n)`.
    fn half_width(n: usize) -> f64 {
        ((2.0 / CHECK_FAILURE).ln() / (2.0 * n as f64)).sqrt()
    }

    /// Checks that `samples`, independent single draws of one facilitator's noise, spread as the
    /// discrete Laplace with `q = exp(-rate)` does, and that sums of two of them have the tail
    /// [`two_draw_tail`] (the one the accepted bound is computed from).
    ///
    /// With `t = 1/rate` (prio's scale `Δ/ε`), it compares:
    /// - the frequency of `|X| ≥ k` with `P(|X| ≥ k) = 2q^k/(1 + q)` for `k` in `1, ⌈t⌉, ⌈3t⌉`
    ///   (`P(X ≥ k) = Σ_{x≥k} c·q^x = q^k/(1 + q)` for `k ≥ 1`);
    /// - pairing consecutive draws into `n/2` independent sums `S`, the frequency of `|S| > k`
    ///   with [`two_draw_tail`] for `k` in `⌈t⌉, ⌈3t⌉`.
    ///
    /// The thresholds depend only on the assumed rate, never on the data, so each frequency is a
    /// mean of independent indicators and Hoeffding applies ([`half_width`]): each of the five
    /// comparisons fails an honest sample with probability at most `CHECK_FAILURE = 1e-8`, so the
    /// whole check at most `5e-8`.
    fn spread_check(samples: &[i128], rate: f64) -> Result<(), String> {
        let q = (-rate).exp();
        let t = 1.0 / rate;
        let thresholds = [1, t.ceil() as u128, (3.0 * t).ceil() as u128];
        let mut problems = Vec::new();
        let n = samples.len();
        let delta = half_width(n);
        for k in thresholds {
            let expected = 2.0 * q.powf(k as f64) / (1.0 + q);
            let hits = samples.iter().filter(|x| x.unsigned_abs() >= k).count();
            let observed = hits as f64 / n as f64;
            if (observed - expected).abs() >= delta {
                problems.push(format!(
                    "P(|X| >= {k}): observed {observed:.4}, expected {expected:.4} ± {delta:.4}"
                ));
            }
        }
        let sums: Vec<i128> = samples.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        let delta = half_width(sums.len());
        for k in &thresholds[1..] {
            let expected = two_draw_tail(rate, *k as u64);
            let hits = sums.iter().filter(|s| s.unsigned_abs() > *k).count();
            let observed = hits as f64 / sums.len() as f64;
            if (observed - expected).abs() >= delta {
                problems.push(format!(
                    "P(|X0 + X1| > {k}): observed {observed:.4}, expected {expected:.4} ± \
                     {delta:.4}"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// How unlikely it is that `spread_check` passes honest samples of `rate_true` against a
    /// wrong `rate_assumed`: it can only pass if at the single-draw threshold with the largest
    /// gap `g = |p_true - p_assumed|` the observed frequency is within `δ` of `p_assumed`, so at
    /// least `g - δ` from `p_true`, which by Hoeffding has probability at most
    /// `2·exp(-2n(g - δ)²)`.
    fn false_pass_probability(n: usize, rate_true: f64, rate_assumed: f64) -> f64 {
        let (qt, qa) = ((-rate_true).exp(), (-rate_assumed).exp());
        let t = 1.0 / rate_assumed;
        let gap = [1.0, t.ceil(), (3.0 * t).ceil()]
            .iter()
            .map(|k| (2.0 * qt.powf(*k) / (1.0 + qt) - 2.0 * qa.powf(*k) / (1.0 + qa)).abs())
            .fold(0.0, f64::max);
        let margin = (gap - half_width(n)).max(0.0);
        2.0 * (-2.0 * n as f64 * margin * margin).exp()
    }

    const SAMPLES: usize = 100_000;

    /// Statistical (never timed). Honest noise passes its own check with probability at least
    /// `1 - 5e-8`; each wrong epsilon passes with the probability asserted (below `1e-9`).
    #[test]
    fn histogram_noise_spreads_as_epsilon_says_and_a_wrong_epsilon_is_caught() {
        let spec = histogram(1000);
        let dp = strategy(1, 2, &spec);
        assert_eq!(dp.sensitivity(), 2);
        let samples = noise_samples(&spec, &dp, SAMPLES);
        let rate = |dp: &DpStrategy| dp.epsilon().as_f64() / dp.sensitivity() as f64;
        spread_check(&samples, rate(&dp)).unwrap();
        // The same noise judged as if epsilon were 5/8 or 2/5: both must be refused.
        for (n, d) in [(5, 8), (2, 5)] {
            let wrong = strategy(n, d, &spec);
            let p = false_pass_probability(SAMPLES, rate(&dp), rate(&wrong));
            assert!(p < 1e-9, "epsilon {n}/{d} is too close to tell apart: {p}");
            let verdict = spread_check(&samples, rate(&wrong));
            assert!(verdict.is_err(), "epsilon {n}/{d} passed for noise of 1/2");
        }
    }

    /// Statistical, like the test above: SumVec noise follows prio's sensitivity
    /// `(2^bits - 1)·length` (here 3·40 = 120), not `max_measurement·length` (2·40 = 80).
    #[test]
    fn sumvec_noise_spreads_with_prios_sensitivity() {
        let spec = VdafSpec::SumVec {
            max_measurement: 2,
            length: 40,
            chunk_length: 4,
        };
        let dp = strategy(1, 1, &spec);
        assert_eq!(dp.sensitivity(), 120);
        let samples = noise_samples(&spec, &dp, SAMPLES);
        spread_check(&samples, 1.0 / 120.0).unwrap();
        let p = false_pass_probability(SAMPLES, 1.0 / 120.0, 1.0 / 80.0);
        assert!(p < 1e-9, "{p}");
        assert!(spread_check(&samples, 1.0 / 80.0).is_err());
    }

    #[test]
    fn the_two_draw_tail_matches_a_direct_sum_and_the_bound_is_the_smallest() {
        for rate in [0.05f64, 0.25, 0.5, 1.0, 3.0] {
            let q: f64 = (-rate).exp();
            let c = (1.0 - q) / (1.0 + q);
            // The pmf of one draw on [-m, m]; the mass left out is 2q^(m+1)/(1+q) < 1e-30.
            let m = (70.0 / rate).ceil() as i64;
            let one: Vec<f64> = (-m..=m).map(|x| c * q.powi(x.abs() as i32)).collect();
            // The sum of two draws, by convolution: index i is s = i - 2m.
            let mut two = vec![0.0; one.len() * 2 - 1];
            for (i, a) in one.iter().enumerate() {
                for (j, b) in one.iter().enumerate() {
                    two[i + j] += a * b;
                }
            }
            for b in [0u64, 1, 2, 5, (2.0 / rate) as u64, (10.0 / rate) as u64] {
                let direct: f64 = two
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (*i as i64 - 2 * m).unsigned_abs() > b)
                    .map(|(_, p)| p)
                    .sum();
                let closed = two_draw_tail(rate, b);
                assert!(
                    (direct - closed).abs() <= 1e-12 + 1e-9 * direct,
                    "rate {rate}, b {b}: direct {direct}, closed form {closed}"
                );
            }
            let bound = bound_for_rate(rate).unwrap();
            assert!(two_draw_tail(rate, bound) <= NOISE_BOUND_FAILURE);
            assert!(bound == 0 || two_draw_tail(rate, bound - 1) > NOISE_BOUND_FAILURE);
        }
        // The default DP aggregation's numbers: a Histogram with epsilon 1/2.
        assert_eq!(strategy(1, 2, &histogram(10)).noise_bound(), 93);
    }

    /// One window through Prio3 on both sides: the two aggregate shares (optionally noised) and
    /// the plaintext result.
    fn run(vdaf: &Prio3Vdaf, dp: Option<&DpStrategy>, n: usize) -> ([Vec<u8>; 2], AggregateValue) {
        let key = VerifyKey::generate();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut accs = [vdaf.accumulator(), vdaf.accumulator()];
        let mut measurements: Vec<Measurement> = Vec::new();
        for _ in 0..n {
            let m = vdaf.random_measurement(&mut rng);
            let id: ReportId = crate::crypto::random_bytes();
            let (public, inputs) = vdaf.shard(&m, &id).unwrap();
            let p0 = vdaf.prepare(&key, 0, &id, &public, &inputs[0]).unwrap();
            let p1 = vdaf.prepare(&key, 1, &id, &public, &inputs[1]).unwrap();
            let shares = [p0.verifier_share.as_slice(), p1.verifier_share.as_slice()];
            vdaf.verify_and_accumulate(0, &p0.state, shares, &mut accs[0])
                .unwrap();
            vdaf.verify_and_accumulate(1, &p1.state, shares, &mut accs[1])
                .unwrap();
            measurements.push(m);
        }
        let [mut a0, mut a1] = accs;
        if let Some(dp) = dp {
            let plain = vdaf.encode_accumulator(&a0).unwrap();
            vdaf.add_noise(dp, &mut a0, n as u64).unwrap();
            vdaf.add_noise(dp, &mut a1, n as u64).unwrap();
            // Every one of the 20 coordinates drew 0 with probability
            // ((1 - q)/(1 + q))^20 = 0.124^20 < 1e-18 (q = exp(-1/4)).
            assert_ne!(vdaf.encode_accumulator(&a0).unwrap(), plain);
        }
        let shares = [
            vdaf.encode_accumulator(&a0).unwrap(),
            vdaf.encode_accumulator(&a1).unwrap(),
        ];
        (shares, vdaf.plaintext_aggregate(&measurements).unwrap())
    }

    #[test]
    fn a_noised_release_differs_from_the_plaintext_within_the_bound_and_without_dp_is_exact() {
        let spec = histogram(20);
        let vdaf = Prio3Vdaf::new(&spec, "dp-test").unwrap();
        let dp = strategy(1, 2, &spec);

        let ([s0, s1], plaintext) = run(&vdaf, None, 60);
        let released = vdaf.unshard([&s0, &s1], 60).unwrap();
        assert_eq!(released, plaintext);
        assert!(accepts(None, &released, &plaintext));

        let ([s0, s1], plaintext) = run(&vdaf, Some(&dp), 60);
        let released = vdaf.unshard([&s0, &s1], 60).unwrap();
        let difference = Difference::between(&released, &plaintext).unwrap();
        // Exceeding the bound in one of the 20 coordinates: at most 20 · 1e-9.
        assert!(
            accepts(Some(dp.noise_bound()), &released, &plaintext),
            "{difference} exceeds ±{}",
            dp.noise_bound()
        );
        // The plaintext itself is not what an exact comparison accepts here: the difference
        // is all zero with probability below 1e-18 (see `run`).
        assert!(!difference.is_zero());
        assert!(!accepts(None, &released, &plaintext));
    }

    #[test]
    fn a_negative_noised_count_is_released_as_zero() {
        let spec = histogram(50);
        let vdaf = Prio3Vdaf::new(&spec, "dp-test").unwrap();
        let dp = strategy(1, 10, &spec);
        let mut noised = vdaf.accumulator();
        vdaf.add_noise(&dp, &mut noised, 0).unwrap();
        let noise = signed(&noised);
        // A draw is negative with probability q/(1 + q) > 0.49 (q = exp(-1/20)): all 50
        // non-negative has probability below 1e-14.
        assert!(noise.iter().any(|x| *x < 0), "{noise:?}");
        let zero = vdaf.encode_accumulator(&vdaf.accumulator()).unwrap();
        let released = vdaf
            .unshard([&vdaf.encode_accumulator(&noised).unwrap(), &zero], 0)
            .unwrap();
        let clamped: Vec<u64> = noise.iter().map(|x| (*x).max(0) as u64).collect();
        assert_eq!(released, AggregateValue::Vector(clamped));
    }

    #[test]
    fn epsilon_must_be_a_positive_fraction() {
        assert_eq!(Epsilon::new(1, 2).unwrap().to_string(), "1/2");
        assert!((Epsilon::new(3, 4).unwrap().as_f64() - 0.75).abs() < 1e-12);
        for (n, d, needle) in [
            (0, 1, "greater than zero"),
            (1, 0, "denominator is zero"),
            (-1, 2, "positive"),
            (1, -2, "positive"),
        ] {
            let err = Epsilon::new(n, d).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn only_histogram_and_sumvec_take_noise() {
        let epsilon = Epsilon::new(1, 1).unwrap();
        for (spec, variant) in [
            (VdafSpec::Count {}, "Count"),
            (
                VdafSpec::Sum {
                    max_measurement: 10,
                },
                "Sum",
            ),
        ] {
            let err = DpStrategy::new(DpStrategyName::PureDpDiscreteLaplace, epsilon, &spec)
                .unwrap_err()
                .to_string();
            assert!(err.contains(variant), "{err}");
            // Nor does the VDAF layer noise one, whatever strategy it is handed.
            let vdaf = Prio3Vdaf::new(&spec, "dp-test").unwrap();
            let mut acc = vdaf.accumulator();
            assert!(vdaf
                .add_noise(&strategy(1, 1, &histogram(4)), &mut acc, 0)
                .is_err());
        }
        // A strategy made for another VDAF is refused rather than noising with the wrong scale.
        let vdaf = Prio3Vdaf::new(&histogram(4), "dp-test").unwrap();
        let other = strategy(
            1,
            1,
            &VdafSpec::SumVec {
                max_measurement: 1,
                length: 4,
                chunk_length: 2,
            },
        );
        assert!(vdaf.add_noise(&other, &mut vdaf.accumulator(), 0).is_err());
    }

    #[test]
    fn sensitivity_follows_prio() {
        assert_eq!(sensitivity(&histogram(10)), Some(2));
        let sumvec = |max_measurement, length| VdafSpec::SumVec {
            max_measurement,
            length,
            chunk_length: 3,
        };
        assert_eq!(sensitivity(&sumvec(15, 8)), Some(15 * 8));
        assert_eq!(sensitivity(&sumvec(16, 8)), Some(31 * 8));
        assert_eq!(sensitivity(&sumvec(1, 50)), Some(50));
        assert_eq!(sensitivity(&VdafSpec::Count {}), None);
    }

    #[test]
    fn an_exact_comparison_without_dp_and_a_bounded_one_with_it() {
        let plain = AggregateValue::Vector(vec![10, 0, 5]);
        let noisy = AggregateValue::Vector(vec![13, 2, 0]);
        let d = Difference::between(&noisy, &plain).unwrap();
        assert_eq!(d.to_string(), "[+3, +2, -5]");
        assert_eq!(d.largest(), 5);
        assert!(accepts(None, &plain, &plain));
        assert!(!accepts(None, &noisy, &plain));
        assert!(accepts(Some(5), &noisy, &plain));
        assert!(!accepts(Some(4), &noisy, &plain));
        let shorter = AggregateValue::Vector(vec![10, 0]);
        assert!(!accepts(Some(1000), &shorter, &plain));
        assert!(!accepts(Some(1000), &AggregateValue::Scalar(10), &plain));
        let scalar = Difference::between(&AggregateValue::Scalar(7), &AggregateValue::Scalar(9));
        assert_eq!(scalar.unwrap().to_string(), "-2");
    }
}
