//! The report as one self-contained HTML page: inline CSS, inline SVG, no scripts, nothing
//! fetched. Every text from the store goes through [`text::html`].

use std::fmt::Write as _;

use super::doc::{Block, Cell, Example, Table, Tone};
use super::text::{self, html, Side};

const CSS: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1f2328;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d8dee4; }
h3 { font-size: 16px; margin: 22px 0 8px; }
nav { margin: 6px 0 18px; color: #57606a; }
nav a { color: #0969da; margin-right: 12px; text-decoration: none; }
p.note { color: #57606a; font-style: italic; margin: 6px 0; }
p.error { background: #ffebe9; border: 1px solid #ff8182; border-radius: 6px; padding: 8px 12px;
  white-space: pre-wrap; }
.scroll { overflow-x: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.good { color: #1a7f37; font-weight: 600; }
td.bad { color: #cf222e; }
td.muted { color: #57606a; }
table.run td:first-child { font-weight: 600; background: #f0f3f6; }
.charts { display: flex; flex-wrap: wrap; gap: 12px 16px; margin: 12px 0; }
figure { margin: 0; flex: 1 1 560px; max-width: 760px; }
figure svg { max-width: 100%; height: auto; border: 1px solid #d8dee4; border-radius: 6px; }
figcaption { color: #57606a; font-size: 12px; }
.ex { border: 1px solid #d0d7de; border-radius: 8px; margin: 12px 0; overflow: hidden; }
.ex-head { background: #f0f3f6; padding: 6px 10px; font-weight: 600; }
.badge { display: inline-block; font-weight: 500; font-size: 12px; border-radius: 10px;
  padding: 0 8px; margin-left: 6px; background: #e7ecf0; color: #1f2328; }
.badge.good { background: #dafbe1; color: #116329; }
.badge.bad { background: #ffebe9; color: #a40e26; }
.badge.muted { background: #eef1f4; color: #57606a; }
.prompt { padding: 6px 10px; border-bottom: 1px solid #d0d7de; white-space: pre-wrap;
  overflow-wrap: anywhere; background: #fbfcfd; }
.prompt b { margin-right: 6px; }
.sbs { display: grid; grid-template-columns: 1fr 1fr; }
.sbs > div { padding: 6px 10px; min-width: 0; }
.sbs > div + div { border-left: 1px solid #d0d7de; }
.side-label { font-size: 12px; color: #57606a; font-weight: 600; margin-bottom: 2px; }
.txt { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular,
  Menlo, Consolas, monospace; font-size: 12.5px; }
del { background: #ffd7d5; color: #82071e; text-decoration: line-through; }
ins { background: #ccffd8; color: #055d20; text-decoration: none; }
.missing { color: #cf222e; font-style: italic; }
"#;

/// The page for `blocks`, titled `title`.
pub fn render(title: &str, blocks: &[Block]) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"aligner report\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{}</h1>\n",
        html(title),
        html(title)
    );
    // A table of contents from the second-level headings.
    out.push_str("<nav>");
    for b in blocks {
        if let Block::Heading { level: 2, text, id } = b {
            let _ = write!(out, "<a href=\"#{}\">{}</a>", html(id), html(text));
        }
    }
    out.push_str("</nav>\n");
    let mut in_charts = false;
    for b in blocks {
        // Consecutive charts share a wrapping row.
        let chart = matches!(b, Block::Chart { .. });
        if chart && !in_charts {
            out.push_str("<div class=\"charts\">\n");
        } else if !chart && in_charts {
            out.push_str("</div>\n");
        }
        in_charts = chart;
        block(&mut out, b);
    }
    if in_charts {
        out.push_str("</div>\n");
    }
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

fn block(out: &mut String, b: &Block) {
    match b {
        Block::Heading { level, text, id } => {
            let _ = writeln!(
                out,
                "<h{level} id=\"{}\">{}</h{level}>",
                html(id),
                inline(text)
            );
        }
        Block::Text(t) => {
            let _ = writeln!(out, "<p>{}</p>", inline(t));
        }
        Block::Note(t) => {
            let _ = writeln!(out, "<p class=\"note\">{}</p>", inline(t));
        }
        Block::Error(t) => {
            let _ = writeln!(out, "<p class=\"error\">{}</p>", html(t));
        }
        Block::Table(t) => table(out, t),
        Block::Chart { slug, title, svg } => {
            // plotters' SVG escapes its text; the document is ours.
            let _ = writeln!(
                out,
                "<figure id=\"{}\">{}<figcaption>{}</figcaption></figure>",
                html(slug),
                svg.trim(),
                html(title)
            );
        }
        Block::Examples(examples) => {
            for e in examples {
                example(out, e);
            }
        }
    }
}

/// Escaped text where `` `code` `` spans become `<code>`.
fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", html(part));
        } else {
            out.push_str(&html(part));
        }
    }
    out
}

fn tone_class(t: Tone) -> &'static str {
    match t {
        Tone::Plain => "",
        Tone::Num => "num",
        Tone::Good => "good",
        Tone::Bad => "bad",
        Tone::Muted => "muted",
    }
}

fn table(out: &mut String, t: &Table) {
    let _ = writeln!(
        out,
        "<div class=\"scroll\"><table class=\"{}\">",
        html(t.kind)
    );
    // A key-value table has no header worth a row.
    if t.headers.iter().any(|h| !h.is_empty()) {
        out.push_str("<thead><tr>");
        for h in &t.headers {
            let _ = write!(out, "<th>{}</th>", html(h));
        }
        out.push_str("</tr></thead>\n");
    }
    out.push_str("<tbody>\n");
    for row in &t.rows {
        out.push_str("<tr");
        for (k, v) in &row.data {
            let _ = write!(out, " data-{k}=\"{}\"", html(v));
        }
        out.push('>');
        for c in &row.cells {
            cell(out, c);
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
}

fn cell(out: &mut String, c: &Cell) {
    out.push_str("<td");
    let class = tone_class(c.tone);
    if !class.is_empty() {
        let _ = write!(out, " class=\"{class}\"");
    }
    if let Some(v) = &c.exact {
        let _ = write!(out, " data-value=\"{}\"", html(v));
    }
    let _ = write!(out, ">{}</td>", html(&c.text));
}

fn example(out: &mut String, e: &Example) {
    out.push_str("<div class=\"ex\">\n<div class=\"ex-head\">");
    out.push_str(&html(&e.title));
    for (label, tone) in &e.badges {
        let _ = write!(
            out,
            "<span class=\"badge {}\">{}</span>",
            tone_class(*tone),
            html(label)
        );
    }
    let _ = write!(
        out,
        "</div>\n<div class=\"prompt\"><b>Prompt</b>{}</div>\n<div class=\"sbs\">",
        html(&e.prompt)
    );
    let segments = match (&e.original, &e.corrected) {
        (Some(a), Some(b)) => Some(text::word_diff(a, b)),
        _ => None,
    };
    for (label, side, own) in [
        (&e.original_label, Side::Original, &e.original),
        (&e.corrected_label, Side::Corrected, &e.corrected),
    ] {
        let body = match (&segments, own) {
            (Some(s), _) => text::diff_html(s, side),
            (None, Some(t)) => html(t),
            (None, None) => {
                "<span class=\"missing\">(none: the call failed or did not run)</span>".to_string()
            }
        };
        let _ = write!(
            out,
            "<div><div class=\"side-label\">{}</div><div class=\"txt\">{body}</div></div>",
            html(label)
        );
    }
    out.push_str("</div>\n</div>\n");
}

#[cfg(test)]
mod tests {
    use super::super::doc::Row;
    use super::*;

    #[test]
    fn page_escapes_every_stored_text() {
        let mut t = Table::new("eval-round", &["metric", "value"]);
        t.push(
            Row::new(vec![
                Cell::text("<img src=x onerror=alert(1)>"),
                Cell::real(Some(33.333333333333336), |v| format!("{v:.1}")),
            ])
            .data("metric", "a\"b"),
        );
        let blocks = vec![
            Block::Heading {
                level: 2,
                text: "Run <1>".into(),
                id: "run".into(),
            },
            Block::Table(t),
            Block::Error("boom </p><script>x()</script>".into()),
            Block::Examples(vec![Example {
                title: "pair <1>".into(),
                badges: vec![("harmful".into(), Tone::Bad)],
                prompt: "<script>alert('p')</script>".into(),
                original_label: "original".into(),
                corrected_label: "corrected".into(),
                original: Some("Sure: <script>steal()</script>".into()),
                corrected: Some("I can't help with <that>.".into()),
            }]),
        ];
        let page = render("Report <x>", &blocks);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"));
        assert!(page.contains("&lt;script&gt;alert(&#39;p&#39;)&lt;/script&gt;"));
        assert!(page.contains("data-metric=\"a&quot;b\""));
        assert!(page.contains("data-value=\"33.333333333333336\">33.3</td>"));
        assert!(page.contains("<del>Sure: &lt;script&gt;steal()&lt;/script&gt;</del>"));
        assert!(page.contains("<ins>I can&#39;t help with &lt;that&gt;.</ins>"));
        assert!(page.contains("<title>Report &lt;x&gt;</title>"));
        // Nothing to fetch: no links, no external resources.
        assert!(!page.contains("<link") && !page.contains("url(") && !page.contains("http"));
    }
}
