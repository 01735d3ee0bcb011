//! The command line: which sizes, how many runs, where the JSON goes.

use std::path::PathBuf;

/// What the command line asked for.
pub struct Args {
    pub quick: bool,
    pub json: Option<PathBuf>,
    pub elements: Option<Vec<u64>>,
    pub runs: Option<usize>,
}

/// How many runs: warm-up and timed per kernel, and timed per shape when a ceiling picks
/// its fastest workgroup shape.
pub struct Runs {
    pub warm_up: usize,
    pub timed: usize,
    pub per_shape: usize,
}

/// The most timed runs: two timestamps a run, and a query set holds at most 4096.
pub const MAX_RUNS: usize = 2048;

impl Args {
    /// `--quick`, `--json PATH`, `--elements N[,N...]`, `--runs N` (timed runs per kernel,
    /// 10 to 2048); `--bench` (which cargo passes) is ignored, anything else is reported and
    /// ignored.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            quick: false,
            json: None,
            elements: None,
            runs: None,
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match flag.as_str() {
                "--quick" => parsed.quick = true,
                "--json" => parsed.json = Some(value("--json")?.into()),
                "--elements" => {
                    let list = value("--elements")?;
                    let sizes = list
                        .split(',')
                        .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| format!("--elements {list}: want N[,N...], each N > 0"))?;
                    parsed.elements = Some(sizes);
                }
                "--runs" => {
                    let n = value("--runs")?;
                    let runs = n
                        .parse::<usize>()
                        .ok()
                        .filter(|r| (10..=MAX_RUNS).contains(r));
                    parsed.runs =
                        Some(runs.ok_or_else(|| format!("--runs {n}: want 10 to {MAX_RUNS}"))?);
                }
                "--bench" => {}
                other => eprintln!("ignoring argument `{other}`"),
            }
        }
        Ok(parsed)
    }

    /// The sizes: `--elements`, else 256K and 1M with `--quick`, else 1M, 4M and 16M.
    pub fn sizes(&self) -> Vec<u64> {
        self.elements.clone().unwrap_or(if self.quick {
            vec![1 << 18, 1 << 20]
        } else {
            vec![1 << 20, 1 << 22, 1 << 24]
        })
    }

    pub fn runs(&self) -> Runs {
        let mut runs = if self.quick {
            Runs {
                warm_up: 2,
                timed: 10,
                per_shape: 3,
            }
        } else {
            Runs {
                warm_up: 3,
                timed: 30,
                per_shape: 8,
            }
        };
        if let Some(n) = self.runs {
            runs.timed = n;
        }
        runs
    }
}
