//! Progress bars on stderr for long stages (done / total, rate, ETA). Hidden when stderr is
//! not a terminal or with `--json`.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use aligner_engine::{Observer, Stage};

pub struct Bars {
    quiet: bool,
    bar: Mutex<Option<(ProgressBar, u64)>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Bars {
            quiet,
            bar: Mutex::new(None),
        }
    }

    pub fn clear(&self) {
        if let Some((bar, _)) = self.bar.lock().unwrap().take() {
            bar.finish_and_clear();
        }
    }

    fn say(&self, line: &str) {
        if self.quiet {
            return;
        }
        match &*self.bar.lock().unwrap() {
            // A bar drawn on a terminal prints the line above itself; a hidden one (stderr
            // is not a terminal) would drop it.
            Some((bar, _)) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl Observer for Bars {
    fn stage_started(&self, round: u32, stage: Stage, total: u64, already_done: u64) {
        self.clear();
        let target = if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>18} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("round {round} {}", stage.as_str()));
        bar.set_position(already_done);
        *self.bar.lock().unwrap() = Some((bar, 0));
        if already_done > 0 {
            self.say(&format!(
                "round {round} {}: resuming, {already_done} already done",
                stage.as_str()
            ));
        }
    }

    fn advanced(&self, ok: u64, failed: u64) {
        if let Some((bar, failures)) = &mut *self.bar.lock().unwrap() {
            bar.inc(ok + failed);
            if failed > 0 {
                *failures += failed;
                bar.set_message(format!("({failures} failed)"));
            }
        }
    }

    fn stage_finished(&self, round: u32, stage: Stage, ok: u64, failed: u64) {
        self.clear();
        let (a, b) = if stage == Stage::Synthesize {
            ("kept", "dropped")
        } else {
            ("ok", "failed")
        };
        self.say(&format!(
            "round {round} {}: {ok} {a}, {failed} {b}",
            stage.as_str()
        ));
    }

    fn note(&self, message: &str) {
        self.say(message);
    }
}
