//! Output: the table on stdout, the JSON of `bench-output.md`, and a progress bar on stderr
//! when stderr is a terminal (nothing otherwise, and never in the JSON).

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::steps::Pattern;
use crate::timing::Quartiles;

/// One row of the table and of the JSON, as `bench-output.md` names the fields.
#[derive(Serialize)]
pub struct Row {
    pub kernel: String,
    pub elements: u64,
    pub tensors: u64,
    pub bytes: u64,
    pub median_ms: f64,
    pub gbps: f64,
    /// Median paired ratio of GB/s to the copy's; `None` for ceiling rows.
    pub ceiling_ratio: Option<f64>,
    pub ratio_iqr: Option<[f64; 2]>,
    /// Median paired ratio of GB/s to the traffic kernel's.
    pub traffic_ratio: Option<f64>,
    /// Multi-tensor rows: median paired time ratio to the one-tensor twin.
    pub vs_one_tensor: Option<f64>,
    /// Rows with features or other dtypes: median paired time ratio to the plain f32 step on
    /// as many tensors.
    pub vs_plain: Option<f64>,
    pub param_dtype: &'static str,
    pub grad_dtype: &'static str,
    pub exp_avg_dtype: &'static str,
    pub exp_avg_sq_dtype: &'static str,
    /// With 16-bit parameters: whether the optimizer steps an f32 master copy of them.
    pub master_weights: bool,
    pub features: Vec<String>,
    pub host_us: Option<f64>,
    pub record_us: Option<f64>,
    /// For the table only: the interquartile ranges of `traffic_ratio`, `vs_one_tensor` and
    /// `vs_plain`.
    #[serde(skip)]
    pub traffic_iqr: Option<[f64; 2]>,
    #[serde(skip)]
    pub vs_one_iqr: Option<[f64; 2]>,
    #[serde(skip)]
    pub vs_plain_iqr: Option<[f64; 2]>,
    /// For the table only: a ceiling's workgroup shape.
    #[serde(skip)]
    pub note: String,
    /// For the table only: `Pattern::label` (`f32`, `f32,f32,bf16,bf16`, ...).
    #[serde(skip)]
    pub dtypes: String,
}

impl Row {
    /// A row of an fp32 plain step (or a ceiling) with its median time; ratios unset, no
    /// features.
    pub fn f32(kernel: &str, elements: u64, tensors: u64, bytes: u64, median_ms: f64) -> Self {
        Row {
            kernel: kernel.into(),
            elements,
            tensors,
            bytes,
            median_ms,
            gbps: bytes as f64 / (median_ms * 1e-3) / 1e9,
            ceiling_ratio: None,
            ratio_iqr: None,
            traffic_ratio: None,
            vs_one_tensor: None,
            vs_plain: None,
            param_dtype: "f32",
            grad_dtype: "f32",
            exp_avg_dtype: "f32",
            exp_avg_sq_dtype: "f32",
            master_weights: false,
            features: Vec::new(),
            host_us: None,
            record_us: None,
            traffic_iqr: None,
            vs_one_iqr: None,
            vs_plain_iqr: None,
            note: String::new(),
            dtypes: "f32".into(),
        }
    }

    /// The row in the dtypes of `pattern`: a step's own, or those of the steps a ceiling is
    /// the ceiling of.
    pub fn with_pattern(mut self, pattern: &Pattern) -> Self {
        self.param_dtype = pattern.param.name();
        self.grad_dtype = pattern.grad.name();
        self.exp_avg_dtype = pattern.exp_avg.name();
        self.exp_avg_sq_dtype = pattern.exp_avg_sq.name();
        self.master_weights = pattern.master;
        self.dtypes = pattern.label();
        self
    }
}

/// `(median, [q1, q3])`.
pub fn split(q: Quartiles) -> (Option<f64>, Option<[f64; 2]>) {
    (Some(q.median), Some([q.q1, q.q3]))
}

#[derive(Serialize)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    pub device_type: String,
}

#[derive(Serialize)]
pub struct Report<'a> {
    pub adapter: Adapter,
    pub timer: &'static str,
    pub results: &'a [Row],
}

impl Report<'_> {
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

pub fn header() -> String {
    format!(
        "{:<14} {:<26} {:<26} {:>10} {:>7} {:>8} {:>10} {:>6}  {:>5} {:>11}  {:>5} {:>11}  {:>5} {:>11}  {:>5} {:>11}  {:>7} {:>7}  note",
        "kernel",
        "features",
        "dtypes (p,g,m,v)",
        "elements",
        "tensors",
        "MB/step",
        "median ms",
        "GB/s",
        "copy",
        "(IQR)",
        "traf",
        "(IQR)",
        "vs 1",
        "(IQR)",
        "plain",
        "(IQR)",
        "host us",
        "rec us"
    )
}

pub fn line(r: &Row) -> String {
    let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
    let iqr = |x: Option<[f64; 2]>| x.map_or(String::new(), |[a, b]| format!("{a:.3}-{b:.3}"));
    let us = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
    format!(
        "{:<14} {:<26} {:<26} {:>10} {:>7} {:>8.1} {:>10.3} {:>6.2}  {:>5} {:>11}  {:>5} {:>11}  {:>5} {:>11}  {:>5} {:>11}  {:>7} {:>7}  {}",
        r.kernel,
        if r.features.is_empty() {
            "-".into()
        } else {
            r.features.join(",")
        },
        r.dtypes,
        r.elements,
        r.tensors,
        r.bytes as f64 / 1e6,
        r.median_ms,
        r.gbps,
        ratio(r.ceiling_ratio),
        iqr(r.ratio_iqr),
        ratio(r.traffic_ratio),
        iqr(r.traffic_iqr),
        ratio(r.vs_one_tensor),
        iqr(r.vs_one_iqr),
        ratio(r.vs_plain),
        iqr(r.vs_plain_iqr),
        us(r.host_us),
        us(r.record_us),
        r.note
    )
}

/// A progress bar on stderr, counting the bytes the planned runs move; hidden unless stderr
/// is a terminal. Lines printed through it do not tear the bar.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(total: u64) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {percent:>3}% (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        Progress(Some(bar))
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    pub fn message(&self, msg: String) {
        if let Some(bar) = &self.0 {
            bar.set_message(msg);
        }
    }

    /// Prints `line` on stdout.
    pub fn println(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
