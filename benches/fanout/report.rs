//! Result records: the per-scenario comparison table and the JSON-lines log.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{Context, Result};

/// Which direction of a figure is good, for the reader of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Better {
    Higher,
    Lower,
    /// Context only (e.g. how many connections were made).
    Neither,
}

/// One number a scenario reports.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    /// Stable JSON key.
    pub(crate) key: &'static str,
    /// Table label, unit included.
    pub(crate) label: &'static str,
    pub(crate) better: Better,
    pub(crate) value: f64,
}

pub(crate) fn fig(key: &'static str, label: &'static str, better: Better, value: f64) -> Figure {
    Figure {
        key,
        label,
        better,
        value,
    }
}

/// Outcome of one (scenario, target, round).
#[derive(Debug, Clone)]
pub(crate) struct RunRecord {
    pub(crate) scenario: &'static str,
    pub(crate) target: String,
    /// Publishers per room of `sweep` and `latency` (None for the other scenarios).
    pub(crate) publishers_per_room: Option<usize>,
    pub(crate) round: usize,
    pub(crate) figures: Vec<Figure>,
    /// Scenario-specific detail (ramp steps, parameters) for the JSON log.
    pub(crate) details: Value,
    pub(crate) error: Option<String>,
}

impl RunRecord {
    fn value(&self, key: &str) -> f64 {
        self.figures
            .iter()
            .find(|f| f.key == key)
            .map_or(f64::NAN, |f| f.value)
    }
}

/// Appends one JSON line for `rec` to `path`.
pub(crate) fn append_jsonl(path: &Path, rec: &RunRecord, context: &Value) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let figures: serde_json::Map<String, Value> = rec
        .figures
        .iter()
        .map(|f| (f.key.to_string(), json!(finite(f.value))))
        .collect();
    let line = json!({
        "timestamp": utc_timestamp(now),
        "unix_time": now,
        "bench": "fanout",
        "scenario": rec.scenario,
        "target": rec.target,
        "publishers_per_room": rec.publishers_per_room,
        "round": rec.round,
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "figures": figures,
        "error": rec.error,
        "details": rec.details,
        "run": context,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").ctx(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// JSON has no NaN: a figure that could not be measured is written as null.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (civil-from-days, H. Hinnant), to avoid a
/// date-time dependency for one timestamp.
fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Median of the finite values (NaN if none).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Compact rendering: enough significant digits for figures spanning 0.001 to 10^7.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_string();
    }
    let a = v.abs();
    if a >= 10_000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// One line per other target: the ratio of our median to its median for every compared
/// figure of the table (`figure ours/other`), for the closing summary.
pub(crate) fn ratio_lines(
    title: &str,
    records: &[RunRecord],
    targets: &[String],
    ours: &str,
) -> String {
    let mut out = String::new();
    let Some(template) = records.iter().find(|r| !r.figures.is_empty()) else {
        return out;
    };
    let med = |t: &str, key: &str| {
        median(
            &records
                .iter()
                .filter(|r| r.target == t)
                .map(|r| r.value(key))
                .collect::<Vec<_>>(),
        )
    };
    for other in targets.iter().filter(|t| t.as_str() != ours) {
        let parts: Vec<String> = template
            .figures
            .iter()
            .filter(|f| f.better != Better::Neither)
            .map(|f| {
                let ratio = med(ours, f.key) / med(other, f.key);
                let text = if ratio.is_finite() {
                    format!("{ratio:.2}x")
                } else {
                    "-".to_string()
                };
                format!("{} {text}", f.key)
            })
            .collect();
        let _ = writeln!(out, "{title} | {ours}/{other}: {}", parts.join(", "));
    }
    out
}

/// The comparison table of one scenario: every figure, per target, per round, with the
/// median over rounds and the ratio of our median to every other target's.
pub(crate) fn table(
    title: &str,
    records: &[RunRecord],
    targets: &[String],
    ours: &str,
    rounds: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n=== {title} ===");
    // Figure list (and order) from the first run that produced figures.
    let Some(template) = records.iter().find(|r| !r.figures.is_empty()) else {
        let _ = writeln!(out, "no figures: every run failed");
        for r in records {
            if let Some(e) = &r.error {
                let _ = writeln!(out, "  {} round {}: {e}", r.target, r.round);
            }
        }
        return out;
    };
    let _ = write!(out, "{:<34} {:<14}", "figure", "target");
    for r in 1..=rounds {
        let _ = write!(out, " {:>11}", format!("round {r}"));
    }
    let _ = writeln!(out, " {:>11}", "median");
    for f in &template.figures {
        let hint = match f.better {
            Better::Higher => " [+]",
            Better::Lower => " [-]",
            Better::Neither => "",
        };
        let mut medians = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let label = if i == 0 {
                format!("{}{hint}", f.label)
            } else {
                String::new()
            };
            let _ = write!(out, "{label:<34} {t:<14}");
            let mut vals = Vec::new();
            for round in 1..=rounds {
                let v = records
                    .iter()
                    .find(|r| &r.target == t && r.round == round)
                    .map_or(f64::NAN, |r| r.value(f.key));
                vals.push(v);
                let _ = write!(out, " {:>11}", num(v));
            }
            let m = median(&vals);
            medians.push((t, m));
            let _ = writeln!(out, " {:>11}", num(m));
        }
        // Ratios of context figures (connection counts, volumes) would only be noise.
        let comparable = f.better != Better::Neither;
        if let Some((_, our)) = medians
            .iter()
            .find(|(t, _)| comparable && t.as_str() == ours)
        {
            for (t, other) in medians.iter().filter(|(t, _)| t.as_str() != ours) {
                let ratio = our / other;
                let text = if ratio.is_finite() {
                    format!("{ratio:.2}x")
                } else {
                    "-".to_string()
                };
                let _ = writeln!(
                    out,
                    "{:<34} {:<14} {:>w$}",
                    "",
                    format!("{ours}/{t}"),
                    text,
                    w = 12 * rounds + 11
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "([+] higher is better, [-] lower is better; - = not measured)"
    );
    for t in targets {
        let of = |key: &str| {
            median(
                &records
                    .iter()
                    .filter(|r| &r.target == t)
                    .map(|r| r.value(key))
                    .collect::<Vec<_>>(),
            )
        };
        let (lg, srv) = (of("loadgen_us_per_delivery"), of("cpu_us_per_delivery"));
        if lg > srv {
            let _ = writeln!(
                out,
                "NOTE {t}: the load generator used more CPU per delivery ({} us) than the \
                 servers ({} us): this figure measures the load generator as much as {t}",
                num(lg),
                num(srv)
            );
        }
    }
    for r in records {
        if let Some(e) = &r.error {
            let _ = writeln!(out, "error: {} round {}: {e}", r.target, r.round);
        }
    }
    out
}
