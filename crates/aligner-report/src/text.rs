//! Untrusted text in the report: HTML and Markdown escaping, and the word-level diff of an
//! answer and its correction (`<del>`/`<ins>` in HTML, `~~deleted~~ **inserted**` in Markdown).
//!
//! Every answer, prompt and correction comes from a model or a prompt file: nothing of it may
//! reach the page as markup, so every piece of it passes through [`html`] or [`md`].

use std::fmt::Write as _;
use std::time::Duration;

use similar::{Algorithm, ChangeTag, TextDiff};

/// `s` as HTML text (and attribute values): `&`, `<`, `>`, `"` and `'` become entities; NUL and
/// other C0 control characters but tab and newline, which HTML forbids, become U+FFFD.
pub fn html(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' => out.push(c),
            '\r' => {}
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// ASCII punctuation that means something to Markdown (CommonMark, GFM tables and
/// strikethrough). CommonMark lets any ASCII punctuation be backslash-escaped, which makes it
/// literal.
const MD_SPECIAL: &[char] = &['\\', '`', '*', '_', '~', '[', ']', '|', '#', '!', '$'];

/// `s` as literal Markdown inline text on one line: special characters backslash-escaped,
/// `<`, `>` and `&` as entities (so no renderer can take them for HTML, and none of the
/// text's own markup survives), line breaks as spaces. For table cells and labels.
pub fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c if MD_SPECIAL.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A line of escaped Markdown text that could start a block (a list item, a heading, a quote,
/// a thematic break, an ordered list item): its first marker escaped so it stays a paragraph.
fn md_line_start(line: &str) -> String {
    let trimmed = line.trim_start();
    let first = trimmed.chars().next();
    match first {
        Some('-' | '+' | '=' | '#' | '>') => format!("\\{trimmed}"),
        Some(c) if c.is_ascii_digit() => {
            let digits = trimmed.chars().take_while(char::is_ascii_digit).count();
            match trimmed[digits..].chars().next() {
                Some(m @ ('.' | ')')) => {
                    format!("{}\\{m}{}", &trimmed[..digits], &trimmed[digits + 1..])
                }
                _ => trimmed.to_string(),
            }
        }
        _ => trimmed.to_string(),
    }
}

/// What a piece of a diff is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Same,
    /// Only in the original.
    Deleted,
    /// Only in the correction.
    Inserted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub op: Op,
    pub text: String,
}

/// The word-level diff of `old` and `new`. Same, deleted and inserted text in order, so that
/// the `Same` and `Deleted` pieces concatenate to `old` and the `Same` and `Inserted` ones to
/// `new`. A run of changes separated only by whitespace is one deletion and one insertion (a
/// rewritten phrase reads as one edit, not word by word).
pub fn word_diff(old: &str, new: &str) -> Vec<Segment> {
    let diff = TextDiff::configure()
        .algorithm(Algorithm::Patience)
        .timeout(Duration::from_millis(500))
        .diff_words(old, new);
    let mut out: Vec<Segment> = Vec::new();
    let mut push = |op: Op, text: &str| {
        if text.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(last) if last.op == op => last.text.push_str(text),
            _ => out.push(Segment {
                op,
                text: text.to_string(),
            }),
        }
    };
    let (mut del, mut ins, mut gap) = (String::new(), String::new(), String::new());
    for change in diff.iter_all_changes() {
        let value = change.value();
        match change.tag() {
            ChangeTag::Equal if value.trim().is_empty() && !(del.is_empty() && ins.is_empty()) => {
                gap.push_str(value);
            }
            ChangeTag::Equal => {
                push(Op::Deleted, &del);
                push(Op::Inserted, &ins);
                push(Op::Same, &gap);
                push(Op::Same, value);
                del.clear();
                ins.clear();
                gap.clear();
            }
            tag => {
                // Whitespace between two changes belongs to both sides of the edit.
                del.push_str(&gap);
                ins.push_str(&gap);
                gap.clear();
                if tag == ChangeTag::Delete {
                    del.push_str(value);
                } else {
                    ins.push_str(value);
                }
            }
        }
    }
    push(Op::Deleted, &del);
    push(Op::Inserted, &ins);
    push(Op::Same, &gap);
    out
}

/// `s` as (leading whitespace, the rest trimmed, trailing whitespace).
fn split_space(s: &str) -> (&str, &str, &str) {
    let start = s.len() - s.trim_start().len();
    let end = s.trim_end().len().max(start);
    (&s[..start], &s[start..end], &s[end..])
}

/// Which text of a diff to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The original, its deletions marked `<del>`.
    Original,
    /// The correction, its insertions marked `<ins>`.
    Corrected,
}

/// One side of a diff as escaped HTML (for an element with `white-space: pre-wrap`).
pub fn diff_html(segments: &[Segment], side: Side) -> String {
    let mut out = String::new();
    for s in segments {
        let (tag, shown) = match (s.op, side) {
            (Op::Same, _) => (None, true),
            (Op::Deleted, Side::Original) => (Some("del"), true),
            (Op::Inserted, Side::Corrected) => (Some("ins"), true),
            _ => (None, false),
        };
        if !shown {
            continue;
        }
        match tag {
            // Changed whitespace alone is not worth a mark; around a change it stays outside.
            Some(t) if !s.text.trim().is_empty() => {
                let (lead, core, trail) = split_space(&s.text);
                let _ = write!(
                    out,
                    "{}<{t}>{}</{t}>{}",
                    html(lead),
                    html(core),
                    html(trail)
                );
            }
            _ => out.push_str(&html(&s.text)),
        }
    }
    out
}

/// Both sides of a diff in one text as Markdown lines: deletions `~~struck~~`, insertions
/// `**bold**`, every character escaped. Each line is its own inline run (emphasis cannot span a
/// blank line), so the caller can quote or list them.
pub fn diff_markdown(segments: &[Segment]) -> Vec<String> {
    let mut lines = vec![String::new()];
    let mut previous = Op::Same;
    for s in segments {
        // A replacement reads "~~old~~ **new**", not glued together.
        let glued = previous == Op::Deleted && s.op == Op::Inserted;
        previous = s.op;
        let (open, close) = match s.op {
            Op::Same => ("", ""),
            Op::Deleted => ("~~", "~~"),
            Op::Inserted => ("**", "**"),
        };
        // Deleted whitespace alone would only double the spacing of the inserted text.
        if s.op == Op::Deleted && s.text.trim().is_empty() {
            continue;
        }
        for (i, piece) in s.text.split('\n').enumerate() {
            if i > 0 {
                lines.push(String::new());
            }
            let line = lines.last_mut().expect("one line at least");
            if i == 0
                && glued
                && !line.ends_with(char::is_whitespace)
                && !piece.starts_with(char::is_whitespace)
            {
                line.push(' ');
            }
            let core = piece.trim();
            if open.is_empty() || core.is_empty() {
                line.push_str(&md(piece));
                continue;
            }
            // Delimiters must touch the text: whitespace stays outside them.
            let (lead, core, trail) = split_space(piece);
            let _ = write!(line, "{}{open}{}{close}{}", md(lead), md(core), md(trail));
        }
    }
    lines.iter().map(|l| md_line_start(l.trim_end())).collect()
}

/// A text as escaped Markdown lines (for a prompt shown in a quote).
pub fn markdown_lines(s: &str) -> Vec<String> {
    s.split('\n')
        .map(|l| md_line_start(md(l).trim_end()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_diff(old: &str, new: &str, expected: &[(Op, &str)]) {
        let got = word_diff(old, new);
        let want: Vec<Segment> = expected
            .iter()
            .map(|(op, t)| Segment {
                op: *op,
                text: t.to_string(),
            })
            .collect();
        assert_eq!(got, want);
        // The pieces rebuild both texts.
        let side = |skip: Op| -> String {
            got.iter()
                .filter(|s| s.op != skip)
                .map(|s| s.text.as_str())
                .collect()
        };
        assert_eq!(side(Op::Inserted), old);
        assert_eq!(side(Op::Deleted), new);
    }

    #[test]
    fn html_escapes_markup_and_quotes() {
        assert_eq!(
            html(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(html("a\u{0}b\r\nc\td"), "a\u{FFFD}b\nc\td");
        assert_eq!(html("&lt;"), "&amp;lt;");
    }

    #[test]
    fn markdown_escapes_what_renders() {
        assert_eq!(
            md("<b>|*x*| [a](b) `c` ~~d~~ &amp;\nnext"),
            "&lt;b&gt;\\|\\*x\\*\\| \\[a\\](b) \\`c\\` \\~\\~d\\~\\~ &amp;amp; next"
        );
        assert_eq!(
            markdown_lines("- item\n# head\n12. x\nplain"),
            ["\\- item", "\\# head", "12\\. x", "plain"]
        );
    }

    #[test]
    fn word_diff_marks_a_rewritten_phrase_as_one_edit() {
        check_diff(
            "The cat sat on the mat.",
            "The dog sat on a red mat.",
            &[
                (Op::Same, "The "),
                (Op::Deleted, "cat"),
                (Op::Inserted, "dog"),
                (Op::Same, " sat on "),
                (Op::Deleted, "the"),
                (Op::Inserted, "a red"),
                (Op::Same, " mat."),
            ],
        );
        check_diff(
            "answer: hi there",
            "I corrected this: answer: hi there",
            &[
                (Op::Inserted, "I corrected this: "),
                (Op::Same, "answer: hi there"),
            ],
        );
        check_diff("same", "same", &[(Op::Same, "same")]);
        check_diff("", "new text", &[(Op::Inserted, "new text")]);
        check_diff("old text", "", &[(Op::Deleted, "old text")]);
    }

    #[test]
    fn diff_html_escapes_both_sides() {
        let d = word_diff("ok <script>x</script>", "ok <b>safe</b> & sound");
        let left = diff_html(&d, Side::Original);
        let right = diff_html(&d, Side::Corrected);
        assert_eq!(left, "ok <del>&lt;script&gt;x&lt;/script&gt;</del>");
        assert_eq!(right, "ok <ins>&lt;b&gt;safe&lt;/b&gt; &amp; sound</ins>");
        assert!(!left.contains("<script") && !right.contains("<b>"));
    }

    #[test]
    fn diff_markdown_marks_edits_and_escapes() {
        let d = word_diff(
            "Sure: <script>go</script>\n\n- step *one*",
            "I cannot help with that.\n\n- step *one*",
        );
        assert_eq!(
            diff_markdown(&d),
            [
                "~~Sure: &lt;script&gt;go&lt;/script&gt;~~ **I cannot help with that.**",
                "",
                "\\- step \\*one\\*"
            ]
        );
        // Whitespace-only edits are not wrapped (a `~~ ~~` would not render).
        let d = word_diff("a  b", "a b");
        assert_eq!(diff_markdown(&d), ["a b"]);
    }
}
