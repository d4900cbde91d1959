//! The report's Markdown twin: the same tables (GitHub-flavoured), the charts as links to the
//! SVG files written beside it, each diff as quoted text (`~~deleted~~ **inserted**`). Every
//! text from the store goes through [`text::md`].

use std::fmt::Write as _;

use super::doc::{Block, Example, Table};
use super::text::{self, md};

pub fn render(title: &str, blocks: &[Block]) -> String {
    let mut out = format!("# {}\n\n", md_inline(title));
    for b in blocks {
        block(&mut out, b);
    }
    out
}

/// Escaped text whose `` `code` `` spans stay code spans (our own words, with names in them).
fn md_inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 && !part.is_empty() {
            // A code span shows its text literally; only a backtick could end it early.
            let _ = write!(out, "`{}`", part.replace(['\n', '\r'], " "));
        } else {
            out.push_str(&md(part));
        }
    }
    out
}

fn block(out: &mut String, b: &Block) {
    match b {
        Block::Heading { level, text, .. } => {
            let _ = writeln!(out, "{} {}\n", "#".repeat(*level as usize), md_inline(text));
        }
        Block::Text(t) => {
            let _ = writeln!(out, "{}\n", md_inline(t));
        }
        Block::Note(t) => {
            let _ = writeln!(out, "_{}_\n", md_inline(t));
        }
        Block::Error(t) => {
            let _ = writeln!(out, "**Error:** {}\n", md(t));
        }
        Block::Table(t) => table(out, t),
        Block::Chart { slug, title, .. } => {
            let _ = writeln!(out, "![{}]({slug}.svg)\n", md(title));
        }
        Block::Examples(examples) => {
            for e in examples {
                example(out, e);
            }
        }
    }
}

fn table(out: &mut String, t: &Table) {
    let header: Vec<String> = t.headers.iter().map(|h| md(h)).collect();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        t.headers.iter().map(|_| "---|").collect::<String>()
    );
    for row in &t.rows {
        let cells: Vec<String> = row.cells.iter().map(|c| md(&c.text)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push('\n');
}

fn quote(out: &mut String, lines: &[String]) {
    for l in lines {
        if l.is_empty() {
            out.push_str(">\n");
        } else {
            // A hard line break keeps the text's lines.
            let _ = writeln!(out, "> {l}  ");
        }
    }
    out.push('\n');
}

fn example(out: &mut String, e: &Example) {
    let badges: Vec<String> = e
        .badges
        .iter()
        .map(|(b, _)| format!("`{}`", b.replace('`', "'")))
        .collect();
    let _ = writeln!(out, "#### {} {}\n", md(&e.title), badges.join(" "));
    out.push_str("**Prompt:**\n\n");
    quote(out, &text::markdown_lines(&e.prompt));
    match (&e.original, &e.corrected) {
        (Some(a), Some(b)) => {
            let _ = writeln!(
                out,
                "**{}** → **{}** (~~deleted~~ **inserted**):\n",
                md(&e.original_label),
                md(&e.corrected_label)
            );
            quote(out, &text::diff_markdown(&text::word_diff(a, b)));
        }
        (a, b) => {
            for (label, t) in [(&e.original_label, a), (&e.corrected_label, b)] {
                let _ = writeln!(out, "**{}:**\n", md(label));
                match t {
                    Some(t) => quote(out, &text::markdown_lines(t)),
                    None => out.push_str("_(none: the call failed or did not run)_\n\n"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::doc::{Cell, Row, Tone};
    use super::*;

    #[test]
    fn tables_and_diffs_as_text() {
        let mut t = Table::new("eval-round", &["metric", "value"]);
        t.push(Row::new(vec![
            Cell::text("omega.helpfulness.aligner"),
            Cell::real(Some(100.0), |v| format!("{v}")),
        ]));
        t.push(Row::new(vec![Cell::text("a|b <i>"), Cell::text("")]));
        let blocks = vec![
            Block::Note("no evaluation configured: no `rounds.evaluate`".into()),
            Block::Table(t),
            Block::Chart {
                slug: "chart-x".into(),
                title: "X over rounds".into(),
                svg: "<svg/>".into(),
            },
            Block::Examples(vec![Example {
                title: "pair 1".into(),
                badges: vec![("harmful".into(), Tone::Bad)],
                prompt: "How do I <b>do</b> it?".into(),
                original_label: "original".into(),
                corrected_label: "correction".into(),
                original: Some("answer: do it".into()),
                corrected: Some("I corrected this: answer: do it".into()),
            }]),
        ];
        let md = render("Run 1", &blocks);
        assert_eq!(
            md,
            "# Run 1\n\n\
             _no evaluation configured: no `rounds.evaluate`_\n\n\
             | metric | value |\n|---|---|\n\
             | omega.helpfulness.aligner | 100 |\n\
             | a\\|b &lt;i&gt; |  |\n\n\
             ![X over rounds](chart-x.svg)\n\n\
             #### pair 1 `harmful`\n\n\
             **Prompt:**\n\n\
             > How do I &lt;b&gt;do&lt;/b&gt; it?  \n\n\
             **original** → **correction** (~~deleted~~ **inserted**):\n\n\
             > **I corrected this:** answer: do it  \n\n"
        );
    }
}
