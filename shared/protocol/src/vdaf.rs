//! Prio3 through the `prio` crate, behind one type.
//!
//! Aggregations are configured at run time (Count, Sum, Histogram or SumVec), but `prio`'s Prio3
//! instances are distinct types. [`Prio3Vdaf`] holds one of them and exposes each role's steps on
//! encoded bytes, which is what the formats carry; a small macro expands the same step for each
//! concrete type so no step is written four times by hand.

use prio::codec::{Encode, ParameterizedDecode};
use prio::field::{Field128, FieldElementWithInteger};
use prio::vdaf::prio3::{Prio3Count, Prio3Histogram, Prio3Sum, Prio3SumVec};
use prio::vdaf::{
    Aggregatable, Aggregator, AggregatorWithNoise, Client, Collector, VerifyTransition,
};
use serde::{Deserialize, Serialize};

use crate::crypto::VerifyKey;
use crate::dp::DpStrategy;
use crate::error::VdafError;

/// Report ids are 16 random bytes; they are the VDAF nonce.
pub type ReportId = [u8; 16];

/// Which Prio3 variant an aggregation uses, with its parameters (the `vdaf` table in the config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum VdafSpec {
    /// Each measurement is 0 or 1; the result is how many were 1.
    Count {},
    /// Each measurement is an integer in `[0, max_measurement]`; the result is their sum.
    Sum { max_measurement: u64 },
    /// Each measurement is a bucket index in `[0, length)`; the result counts each bucket.
    Histogram { length: usize, chunk_length: usize },
    /// Each measurement is a vector of `length` integers in `[0, max_measurement]`; the result is
    /// their element-wise sum.
    SumVec {
        max_measurement: u64,
        length: usize,
        chunk_length: usize,
    },
}

/// A client's plaintext measurement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Measurement {
    Count(bool),
    Sum(u64),
    Histogram(usize),
    SumVec(Vec<u64>),
}

/// An aggregate result, as it appears in result JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AggregateValue {
    Scalar(u64),
    Vector(Vec<u64>),
}

impl std::fmt::Display for AggregateValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AggregateValue::Scalar(v) => write!(f, "{v}"),
            AggregateValue::Vector(v) => {
                let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Inner {
    Count(Prio3Count),
    Sum(Prio3Sum),
    Histogram(Prio3Histogram),
    SumVec(Prio3SumVec),
}

/// One configured Prio3 instance plus the application context string it is bound to.
#[derive(Clone, Debug)]
pub struct Prio3Vdaf {
    spec: VdafSpec,
    ctx: Vec<u8>,
    inner: Inner,
}

/// An aggregator's running aggregate share.
#[derive(Clone, Debug)]
pub enum Accumulator {
    Count(<Prio3Count as prio::vdaf::Vdaf>::AggregateShare),
    Sum(<Prio3Sum as prio::vdaf::Vdaf>::AggregateShare),
    Histogram(<Prio3Histogram as prio::vdaf::Vdaf>::AggregateShare),
    SumVec(<Prio3SumVec as prio::vdaf::Vdaf>::AggregateShare),
}

/// The state an aggregator keeps between `verify_init` and the combine step, and the verifier
/// share it sends to its peer, both encoded.
pub struct Prepared {
    pub state: Vec<u8>,
    pub verifier_share: Vec<u8>,
}

macro_rules! each_variant {
    ($self:expr, $v:ident => $body:expr) => {
        match &$self.inner {
            Inner::Count($v) => $body,
            Inner::Sum($v) => $body,
            Inner::Histogram($v) => $body,
            Inner::SumVec($v) => $body,
        }
    };
}

fn prio_err(step: &str) -> impl Fn(prio::vdaf::VdafError) -> VdafError + '_ {
    move |e| VdafError::Prio(format!("{step}: {e}"))
}

fn codec_err(what: &str) -> impl Fn(prio::codec::CodecError) -> VdafError + '_ {
    move |e| VdafError::Prio(format!("cannot decode {what}: {e}"))
}

impl Prio3Vdaf {
    /// Builds the Prio3 instance for `spec`. `context` binds shares to one application and
    /// aggregation (clients and both aggregators must use the same one).
    pub fn new(spec: &VdafSpec, context: &str) -> Result<Self, VdafError> {
        let param = |e: prio::vdaf::VdafError| VdafError::Parameters(e.to_string());
        let inner = match spec {
            VdafSpec::Count {} => Inner::Count(Prio3Count::new_count(2).map_err(param)?),
            VdafSpec::Sum { max_measurement } => {
                Inner::Sum(Prio3Sum::new_sum(2, *max_measurement).map_err(param)?)
            }
            VdafSpec::Histogram {
                length,
                chunk_length,
            } => Inner::Histogram(
                Prio3Histogram::new_histogram(2, *length, *chunk_length).map_err(param)?,
            ),
            VdafSpec::SumVec {
                max_measurement,
                length,
                chunk_length,
            } => Inner::SumVec(
                Prio3SumVec::new_sum_vec(2, u128::from(*max_measurement), *length, *chunk_length)
                    .map_err(param)?,
            ),
        };
        Ok(Prio3Vdaf {
            spec: spec.clone(),
            ctx: format!("millrace/{context}").into_bytes(),
            inner,
        })
    }

    pub fn spec(&self) -> &VdafSpec {
        &self.spec
    }

    /// Client: splits `measurement` into a public share and one input share per aggregator.
    pub fn shard(
        &self,
        measurement: &Measurement,
        report_id: &ReportId,
    ) -> Result<(Vec<u8>, [Vec<u8>; 2]), VdafError> {
        let mismatch = || {
            VdafError::Measurement(format!(
                "measurement {measurement:?} does not fit {:?}",
                self.spec
            ))
        };
        macro_rules! shard_with {
            ($v:expr, $m:expr) => {{
                let (public, inputs) = $v
                    .shard(&self.ctx, $m, report_id)
                    .map_err(|e| VdafError::Measurement(e.to_string()))?;
                let enc = |x: &dyn Fn() -> Result<Vec<u8>, prio::codec::CodecError>| {
                    x().map_err(|e| VdafError::Prio(e.to_string()))
                };
                let public = enc(&|| public.get_encoded())?;
                let first = enc(&|| inputs[0].get_encoded())?;
                let second = enc(&|| inputs[1].get_encoded())?;
                Ok((public, [first, second]))
            }};
        }
        match (&self.inner, measurement) {
            (Inner::Count(v), Measurement::Count(m)) => shard_with!(v, m),
            (Inner::Sum(v), Measurement::Sum(m)) => shard_with!(v, m),
            (Inner::Histogram(v), Measurement::Histogram(m)) => shard_with!(v, m),
            (Inner::SumVec(v), Measurement::SumVec(m)) => {
                let wide: Vec<u128> = m.iter().map(|x| u128::from(*x)).collect();
                shard_with!(v, &wide)
            }
            _ => Err(mismatch()),
        }
    }

    /// Aggregator `agg_id`: decodes this report's shares and runs `verify_init`.
    pub fn prepare(
        &self,
        verify_key: &VerifyKey,
        agg_id: usize,
        report_id: &ReportId,
        public_share: &[u8],
        input_share: &[u8],
    ) -> Result<Prepared, VdafError> {
        each_variant!(self, v => {
            let public = ParameterizedDecode::get_decoded_with_param(v, public_share)
                .map_err(codec_err("public share"))?;
            let input = ParameterizedDecode::get_decoded_with_param(&(v, agg_id), input_share)
                .map_err(codec_err("input share"))?;
            let (state, share) = v
                .verify_init(verify_key.bytes(), &self.ctx, agg_id, &(), report_id, &public, &input)
                .map_err(prio_err("verify_init"))?;
            Ok(Prepared {
                state: state.get_encoded().map_err(|e| VdafError::Prio(e.to_string()))?,
                verifier_share: share.get_encoded().map_err(|e| VdafError::Prio(e.to_string()))?,
            })
        })
    }

    /// An empty aggregate share.
    pub fn accumulator(&self) -> Accumulator {
        match &self.inner {
            Inner::Count(v) => Accumulator::Count(v.aggregate_init(&())),
            Inner::Sum(v) => Accumulator::Sum(v.aggregate_init(&())),
            Inner::Histogram(v) => Accumulator::Histogram(v.aggregate_init(&())),
            Inner::SumVec(v) => Accumulator::SumVec(v.aggregate_init(&())),
        }
    }

    /// Aggregator `agg_id`: combines both aggregators' verifier shares (index 0 first) with its own
    /// saved state, finishes verification and adds the output share to `acc`. An error means the
    /// report is invalid; both aggregators reach the same verdict because both compute the same
    /// verifier message.
    pub fn verify_and_accumulate(
        &self,
        agg_id: usize,
        state: &[u8],
        verifier_shares: [&[u8]; 2],
        acc: &mut Accumulator,
    ) -> Result<(), VdafError> {
        macro_rules! step {
            ($v:expr, $acc:expr) => {{
                let state = ParameterizedDecode::get_decoded_with_param(&($v, agg_id), state)
                    .map_err(codec_err("verify state"))?;
                let first = ParameterizedDecode::get_decoded_with_param(&state, verifier_shares[0])
                    .map_err(codec_err("verifier share 0"))?;
                let second =
                    ParameterizedDecode::get_decoded_with_param(&state, verifier_shares[1])
                        .map_err(codec_err("verifier share 1"))?;
                let message = $v
                    .verifier_shares_to_message(&self.ctx, &(), [first, second])
                    .map_err(prio_err("verifier_shares_to_message"))?;
                match $v
                    .verify_next(&self.ctx, state, message)
                    .map_err(prio_err("verify_next"))?
                {
                    VerifyTransition::Finish(output) => {
                        $acc.accumulate(&output).map_err(prio_err("accumulate"))
                    }
                    VerifyTransition::Continue(..) => Err(VdafError::Prio(
                        "Prio3 asked for another verification round".to_string(),
                    )),
                }
            }};
        }
        match (&self.inner, acc) {
            (Inner::Count(v), Accumulator::Count(a)) => step!(v, a),
            (Inner::Sum(v), Accumulator::Sum(a)) => step!(v, a),
            (Inner::Histogram(v), Accumulator::Histogram(a)) => step!(v, a),
            (Inner::SumVec(v), Accumulator::SumVec(a)) => step!(v, a),
            _ => Err(VdafError::Prio(
                "accumulator belongs to another VDAF".to_string(),
            )),
        }
    }

    /// Aggregator: adds this aggregator's differential privacy noise to its aggregate share (prio's
    /// `AggregatorWithNoise::add_noise_to_agg_share`, a fresh discrete Laplace draw per
    /// coordinate). Call it once, on the finished share, right before the share is released: each
    /// aggregator noises its own share, so the unsharded result carries both draws. Only Histogram
    /// and SumVec take noise; `dp` must have been made for this VDAF's parameters (its
    /// sensitivity is checked), so the noise has the scale its bound was computed for.
    pub fn add_noise(
        &self,
        dp: &DpStrategy,
        acc: &mut Accumulator,
        report_count: u64,
    ) -> Result<(), VdafError> {
        if crate::dp::sensitivity(&self.spec) != Some(dp.sensitivity()) {
            return Err(VdafError::Parameters(format!(
                "differential privacy ({dp}, sensitivity {}) was not set up for {:?}",
                dp.sensitivity(),
                self.spec
            )));
        }
        let strategy = dp
            .prio_strategy()
            .map_err(|e| VdafError::Parameters(e.to_string()))?;
        let n = usize::try_from(report_count)
            .map_err(|_| VdafError::Prio(format!("report count {report_count} too large")))?;
        match (&self.inner, acc) {
            (Inner::Histogram(v), Accumulator::Histogram(a)) => v
                .add_noise_to_agg_share(&strategy, &(), a, n)
                .map_err(prio_err("add_noise_to_agg_share")),
            (Inner::SumVec(v), Accumulator::SumVec(a)) => v
                .add_noise_to_agg_share(&strategy, &(), a, n)
                .map_err(prio_err("add_noise_to_agg_share")),
            _ => Err(VdafError::Prio(
                "accumulator belongs to another VDAF".to_string(),
            )),
        }
    }

    /// Encodes an aggregate share for a sum part.
    pub fn encode_accumulator(&self, acc: &Accumulator) -> Result<Vec<u8>, VdafError> {
        let out = match acc {
            Accumulator::Count(a) => a.get_encoded(),
            Accumulator::Sum(a) => a.get_encoded(),
            Accumulator::Histogram(a) => a.get_encoded(),
            Accumulator::SumVec(a) => a.get_encoded(),
        };
        out.map_err(|e| VdafError::Prio(e.to_string()))
    }

    /// Collector: decodes both aggregate shares and unshards them into the result.
    pub fn unshard(
        &self,
        aggregate_shares: [&[u8]; 2],
        report_count: u64,
    ) -> Result<AggregateValue, VdafError> {
        let n = usize::try_from(report_count)
            .map_err(|_| VdafError::Prio(format!("report count {report_count} too large")))?;
        macro_rules! unshard_with {
            ($v:expr) => {{
                let first =
                    ParameterizedDecode::get_decoded_with_param(&($v, &()), aggregate_shares[0])
                        .map_err(codec_err("aggregate share 0"))?;
                let second =
                    ParameterizedDecode::get_decoded_with_param(&($v, &()), aggregate_shares[1])
                        .map_err(codec_err("aggregate share 1"))?;
                $v.unshard(&(), [first, second], n)
                    .map_err(prio_err("unshard"))
            }};
        }
        // Histogram and SumVec count in Field128. Differential privacy noise can take a small
        // count below zero, which the field holds as `p - k`: a coordinate in the upper half of
        // the field is such a negative number, and is released as 0. Clamping is post-processing
        // (the result stays as private as the noise made it) and never moves a coordinate
        // further from the plaintext, which is never negative. Without noise no honest
        // coordinate gets there.
        let half = Field128::modulus() / 2;
        let narrow = |wide: Vec<u128>| -> Result<AggregateValue, VdafError> {
            wide.into_iter()
                .map(|x| {
                    if x > half {
                        return Ok(0);
                    }
                    u64::try_from(x)
                        .map_err(|_| VdafError::Prio(format!("result element {x} exceeds 64 bits")))
                })
                .collect::<Result<Vec<u64>, _>>()
                .map(AggregateValue::Vector)
        };
        match &self.inner {
            Inner::Count(v) => Ok(AggregateValue::Scalar(unshard_with!(v)?)),
            Inner::Sum(v) => Ok(AggregateValue::Scalar(unshard_with!(v)?)),
            Inner::Histogram(v) => narrow(unshard_with!(v)?),
            Inner::SumVec(v) => narrow(unshard_with!(v)?),
        }
    }

    /// The result computed directly from plaintext measurements: what the pipeline must reproduce.
    pub fn plaintext_aggregate<'a>(
        &self,
        measurements: impl IntoIterator<Item = &'a Measurement>,
    ) -> Result<AggregateValue, VdafError> {
        let mut scalar: u64 = 0;
        let mut vector: Vec<u64> = match &self.spec {
            VdafSpec::Histogram { length, .. } | VdafSpec::SumVec { length, .. } => {
                vec![0; *length]
            }
            _ => Vec::new(),
        };
        for m in measurements {
            match (&self.spec, m) {
                (VdafSpec::Count {}, Measurement::Count(b)) => scalar += u64::from(*b),
                (VdafSpec::Sum { .. }, Measurement::Sum(x)) => scalar += *x,
                (VdafSpec::Histogram { .. }, Measurement::Histogram(i)) => {
                    let slot = vector.get_mut(*i).ok_or_else(|| {
                        VdafError::Measurement(format!("bucket {i} out of range"))
                    })?;
                    *slot += 1;
                }
                (VdafSpec::SumVec { .. }, Measurement::SumVec(xs)) => {
                    if xs.len() != vector.len() {
                        return Err(VdafError::Measurement(format!(
                            "vector of length {} for SumVec of length {}",
                            xs.len(),
                            vector.len()
                        )));
                    }
                    for (slot, x) in vector.iter_mut().zip(xs) {
                        *slot += *x;
                    }
                }
                _ => {
                    return Err(VdafError::Measurement(format!(
                        "measurement {m:?} does not fit {:?}",
                        self.spec
                    )))
                }
            }
        }
        Ok(match self.spec {
            VdafSpec::Count {} | VdafSpec::Sum { .. } => AggregateValue::Scalar(scalar),
            _ => AggregateValue::Vector(vector),
        })
    }

    /// A random valid measurement, for simulated clients.
    pub fn random_measurement(&self, rng: &mut impl rand::Rng) -> Measurement {
        match &self.spec {
            VdafSpec::Count {} => Measurement::Count(rng.random_bool(0.5)),
            VdafSpec::Sum { max_measurement } => {
                Measurement::Sum(rng.random_range(0..=*max_measurement))
            }
            VdafSpec::Histogram { length, .. } => {
                Measurement::Histogram(rng.random_range(0..*length))
            }
            VdafSpec::SumVec {
                max_measurement,
                length,
                ..
            } => Measurement::SumVec(
                (0..*length)
                    .map(|_| rng.random_range(0..=*max_measurement))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn specs() -> Vec<VdafSpec> {
        vec![
            VdafSpec::Count {},
            VdafSpec::Sum {
                max_measurement: 1000,
            },
            VdafSpec::Histogram {
                length: 10,
                chunk_length: 3,
            },
            VdafSpec::SumVec {
                max_measurement: 255,
                length: 8,
                chunk_length: 3,
            },
        ]
    }

    fn run(
        spec: &VdafSpec,
        n: usize,
        tamper: Option<usize>,
    ) -> (AggregateValue, AggregateValue, u64) {
        let vdaf = Prio3Vdaf::new(spec, "test").unwrap();
        let key = VerifyKey::generate();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut accs = [vdaf.accumulator(), vdaf.accumulator()];
        let mut included = Vec::new();
        let mut count = 0;
        for i in 0..n {
            let m = vdaf.random_measurement(&mut rng);
            let id: ReportId = crate::crypto::random_bytes();
            let (public, mut inputs) = vdaf.shard(&m, &id).unwrap();
            if tamper == Some(i) {
                let last = inputs[0].len() - 1;
                inputs[0][last] ^= 1;
            }
            let p0 = vdaf.prepare(&key, 0, &id, &public, &inputs[0]);
            let p1 = vdaf.prepare(&key, 1, &id, &public, &inputs[1]).unwrap();
            let Ok(p0) = p0 else { continue };
            let shares = [p0.verifier_share.as_slice(), p1.verifier_share.as_slice()];
            let r0 = vdaf.verify_and_accumulate(0, &p0.state, shares, &mut accs[0]);
            let r1 = vdaf.verify_and_accumulate(1, &p1.state, shares, &mut accs[1]);
            assert_eq!(r0.is_ok(), r1.is_ok(), "both sides agree on validity");
            if r0.is_ok() {
                included.push(m);
                count += 1;
            }
        }
        let a0 = vdaf.encode_accumulator(&accs[0]).unwrap();
        let a1 = vdaf.encode_accumulator(&accs[1]).unwrap();
        let result = vdaf.unshard([&a0, &a1], count).unwrap();
        (result, vdaf.plaintext_aggregate(&included).unwrap(), count)
    }

    #[test]
    fn every_variant_reproduces_the_plaintext_result() {
        for spec in specs() {
            let (result, expected, count) = run(&spec, 25, None);
            assert_eq!(count, 25);
            assert_eq!(result, expected, "{spec:?}");
        }
    }

    #[test]
    fn a_tampered_share_is_excluded_by_both_aggregators() {
        for spec in specs() {
            let (result, expected, count) = run(&spec, 10, Some(3));
            assert_eq!(count, 9, "{spec:?}");
            assert_eq!(result, expected, "{spec:?}");
        }
    }

    #[test]
    fn a_measurement_of_the_wrong_kind_is_refused() {
        let vdaf = Prio3Vdaf::new(&VdafSpec::Count {}, "t").unwrap();
        assert!(vdaf.shard(&Measurement::Sum(3), &[0; 16]).is_err());
        let sum = Prio3Vdaf::new(
            &VdafSpec::Sum {
                max_measurement: 10,
            },
            "t",
        )
        .unwrap();
        assert!(sum.shard(&Measurement::Sum(11), &[0; 16]).is_err());
    }

    #[test]
    fn spec_parses_from_toml() {
        #[derive(Deserialize)]
        struct W {
            vdaf: VdafSpec,
        }
        let w: W = toml::from_str(
            "vdaf = { type = \"sumvec\", max_measurement = 3, length = 4, chunk_length = 2 }",
        )
        .unwrap();
        assert_eq!(
            w.vdaf,
            VdafSpec::SumVec {
                max_measurement: 3,
                length: 4,
                chunk_length: 2
            }
        );
        assert!(toml::from_str::<W>("vdaf = { type = \"count\", bogus = 1 }").is_err());
        assert_eq!(
            toml::from_str::<W>("vdaf = { type = \"count\" }")
                .unwrap()
                .vdaf,
            VdafSpec::Count {}
        );
    }
}
