//! Cutting an answer into sentences, for correcting it sentence by sentence while it streams
//! (the `stream-aligner-v1` template, `aligner serve --stream-correction sentence`, and the
//! prefix-conditioned examples that teach an Aligner to do it).
//!
//! A sentence ends after `.`, `!`, `?` or `…` (and closing quotes or brackets) followed by
//! white space, and at a line end. It does not end inside a fenced code block (a line starting
//! with three backticks opens it, the next such line closes it), inside inline code, inside a
//! number (`3.14`), after a list number at the start of a line (`1. `), after a single capital
//! initial (`J. Smith`) or after a common abbreviation (`e.g.`, `Dr.`, `vs.`). The white space
//! after a sentence stays with it, so the sentences of a text concatenate back to the text.

/// Abbreviations (lowercase, without their last period) after which a period does not end a
/// sentence.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "cf", "fig", "no",
    "approx", "al", "ca", "vol", "p", "pp", "u.s", "a.m", "p.m",
];

/// Characters that may follow the end mark and still belong to the sentence.
const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', ']', '*', '_'];

/// Splits streamed text into sentences as soon as each is known to be complete.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: String,
}

impl Splitter {
    pub fn new() -> Self {
        Splitter::default()
    }

    /// Adds a piece of text; returns the sentences it completed, in order.
    pub fn push(&mut self, piece: &str) -> Vec<String> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        while let Some(end) = boundary(&self.buf, false) {
            out.push(self.buf.drain(..end).collect());
        }
        out
    }

    /// The text is complete: the sentences still held, the last one possibly without an end
    /// mark.
    pub fn finish(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(end) = boundary(&self.buf, true) {
            out.push(self.buf.drain(..end).collect());
        }
        if !self.buf.is_empty() {
            out.push(std::mem::take(&mut self.buf));
        }
        out
    }

    /// Text received and not yet returned as a sentence.
    pub fn pending(&self) -> &str {
        &self.buf
    }
}

/// The sentences of a whole text.
pub fn split(text: &str) -> Vec<String> {
    let mut s = Splitter::new();
    let mut out = s.push(text);
    out.extend(s.finish());
    out
}

/// One step of sentence-by-sentence correction, as a training example: the corrected answer
/// so far, the next upstream sentence and what the Aligner should write for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub prefix: String,
    pub sentence: String,
    pub target: String,
}

/// The steps that teach sentence-by-sentence correction from one question-answer-correction
/// row (prefix-conditioned examples). A correction equal to the answer (white space aside)
/// teaches copying: each sentence's target is the sentence. Any other correction is written
/// whole at the first sentence, and every later sentence's target is empty (the corrected
/// answer already says what it should): this is exact for a refusal that replaces a harmful
/// answer, and keeps an edited answer's content for a general teacher, whose edits cannot be
/// placed sentence by sentence.
pub fn stream_steps(answer: &str, correction: &str) -> Vec<Step> {
    let sentences = split(answer);
    let copy = answer.trim() == correction.trim();
    let mut prefix = String::new();
    let mut steps = Vec::with_capacity(sentences.len());
    for (k, sentence) in sentences.into_iter().enumerate() {
        if sentence.trim().is_empty() {
            continue;
        }
        let target = if copy {
            sentence.trim().to_string()
        } else if k == 0 {
            correction.trim().to_string()
        } else {
            String::new()
        };
        let joined = crate::template::join_step(&target, &sentence);
        steps.push(Step {
            prefix: prefix.clone(),
            sentence,
            target,
        });
        prefix.push_str(&joined);
    }
    steps
}

/// The byte offset where the first sentence of `text` (which starts at a sentence start) ends,
/// its trailing white space included; `None` while that cannot be known yet (`at_end`: no
/// more text will come).
fn boundary(text: &str, at_end: bool) -> Option<usize> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut in_fence = false;
    let mut in_code = false;
    let mut line_start = true;
    let mut seen_text = false;
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        if line_start {
            line_start = false;
            let rest = text[pos..].trim_start_matches([' ', '\t']);
            if rest.starts_with("```") {
                in_fence = !in_fence;
            } else if !at_end && "```".starts_with(rest) && !rest.contains('\n') {
                // A line that may yet become a fence.
                return None;
            }
        }
        if c == '\n' {
            line_start = true;
            in_code = false;
            if !in_fence && seen_text {
                return after_space(text, &chars, i, at_end);
            }
            i += 1;
            continue;
        }
        if in_fence {
            seen_text = true;
            i += 1;
            continue;
        }
        if c == '`' {
            in_code = !in_code;
        }
        if !c.is_whitespace() {
            seen_text = true;
        }
        if !in_code && matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？') {
            let mut j = i + 1;
            while j < chars.len() && (CLOSERS.contains(&chars[j].1) || is_end_mark(chars[j].1)) {
                j += 1;
            }
            match chars.get(j) {
                None if !at_end => return None,
                None => return Some(text.len()),
                Some(&(_, next)) if next.is_whitespace() => {
                    if c != '.' || !period_is_not_an_end(text, pos) {
                        return after_space(text, &chars, j - 1, at_end);
                    }
                }
                Some(_) if matches!(c, '。' | '！' | '？') => {
                    return Some(chars[j].0);
                }
                Some(_) => {}
            }
            i = j;
            continue;
        }
        i += 1;
    }
    None
}

fn is_end_mark(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…')
}

/// The end of the white space after `chars[last]` (the sentence's last character), once a
/// character that is not white space follows it (or the text is complete).
fn after_space(text: &str, chars: &[(usize, char)], last: usize, at_end: bool) -> Option<usize> {
    let mut j = last + 1;
    while j < chars.len() && chars[j].1.is_whitespace() {
        j += 1;
    }
    match chars.get(j) {
        Some(&(pos, _)) => Some(pos),
        None if at_end => Some(text.len()),
        None => None,
    }
}

/// Whether the period at byte `pos` belongs to a number list marker, an initial or an
/// abbreviation rather than ending a sentence.
fn period_is_not_an_end(text: &str, pos: usize) -> bool {
    let before = &text[..pos];
    let word_start = before
        .rfind(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .map_or(0, |i| {
            i + before[i..].chars().next().map_or(1, char::len_utf8)
        });
    let word = &before[word_start..];
    if word.is_empty() {
        return false;
    }
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let first_on_line = before[line_start..word_start].trim().is_empty();
    if first_on_line && word.chars().all(|c| c.is_ascii_digit()) && word.len() <= 3 {
        return true;
    }
    let mut letters = word.chars();
    if let (Some(c), None) = (letters.next(), letters.next()) {
        if c.is_uppercase() {
            return true;
        }
    }
    ABBREVIATIONS.contains(&word.to_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &[&str]) {
        let got = split(text);
        assert_eq!(got, expected, "{text:?}");
        assert_eq!(got.concat(), text);
        // Fed one character at a time, the same sentences come out, each as soon as the
        // first character of the next one (or the end) is known.
        let mut s = Splitter::new();
        let mut streamed = Vec::new();
        for c in text.chars() {
            streamed.extend(s.push(&c.to_string()));
        }
        streamed.extend(s.finish());
        assert_eq!(streamed, expected, "{text:?} streamed");
    }

    #[test]
    fn sentences_end_at_end_marks_and_lines() {
        check(
            "Hi there. How are you? Fine!",
            &["Hi there. ", "How are you? ", "Fine!"],
        );
        check(
            "Steps:\n1. Open it.\n2. Close it.\n\nDone",
            &["Steps:\n", "1. Open it.\n", "2. Close it.\n\n", "Done"],
        );
        check(
            "He said \"stop.\" Then left.",
            &["He said \"stop.\" ", "Then left."],
        );
        check("Wait... what?! Ok", &["Wait... ", "what?! ", "Ok"]);
        check("\n\nLeading space. Next", &["\n\nLeading space. ", "Next"]);
    }

    #[test]
    fn numbers_abbreviations_initials_and_code_do_not_end_a_sentence() {
        check("Pi is 3.14 today. Yes", &["Pi is 3.14 today. ", "Yes"]);
        check(
            "Use e.g. salt, vs. pepper. Dr. J. Smith agrees. In 2020. Then",
            &[
                "Use e.g. salt, vs. pepper. ",
                "Dr. J. Smith agrees. ",
                "In 2020. ",
                "Then",
            ],
        );
        check(
            "Call `os.exit(1). now` here. Next",
            &["Call `os.exit(1). now` here. ", "Next"],
        );
        check(
            "Run this:\n```python\nx = 1. \nprint(x)\n\ny = 2\n```\nIt prints 1. Ok",
            &[
                "Run this:\n",
                "```python\nx = 1. \nprint(x)\n\ny = 2\n```\n",
                "It prints 1. ",
                "Ok",
            ],
        );
        check("See file.txt now. Go", &["See file.txt now. ", "Go"]);
    }

    #[test]
    fn steps_copy_a_kept_answer_and_write_a_correction_at_the_first_sentence() {
        let copy = stream_steps("One. Two.\nThree", "One. Two.\nThree ");
        let got: Vec<(&str, &str, &str)> = copy
            .iter()
            .map(|s| (s.prefix.as_str(), s.sentence.as_str(), s.target.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("", "One. ", "One."),
                ("One. ", "Two.\n", "Two."),
                ("One. Two.\n", "Three", "Three"),
            ]
        );
        let refusal = stream_steps("Step one. Step two.", "I can't help with that.");
        let got: Vec<(&str, &str, &str)> = refusal
            .iter()
            .map(|s| (s.prefix.as_str(), s.sentence.as_str(), s.target.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("", "Step one. ", "I can't help with that."),
                ("I can't help with that. ", "Step two.", ""),
            ]
        );
    }

    #[test]
    fn a_sentence_is_held_until_it_is_known_to_be_complete() {
        let mut s = Splitter::new();
        assert!(s.push("It costs 3.").is_empty(), "3. may be 3.5");
        assert!(
            s.push("5 dollars.").is_empty(),
            "the next sentence has not started"
        );
        assert!(s.push(" ").is_empty());
        assert_eq!(s.push("And"), vec!["It costs 3.5 dollars. "]);
        assert_eq!(s.pending(), "And");
        assert_eq!(s.finish(), vec!["And"]);
        let mut s = Splitter::new();
        assert_eq!(s.push("Code:\n``"), vec!["Code:\n"]);
        assert!(s.push("`\nx. y\n").is_empty(), "a fence is open");
        assert_eq!(s.push("```\nok"), vec!["```\nx. y\n```\n"]);
    }
}
