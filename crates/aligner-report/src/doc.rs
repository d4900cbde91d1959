//! The report as a document model: headings, tables, charts and examples that the HTML and the
//! Markdown renderers both draw, so the two always hold the same tables.

/// How a table cell reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Plain,
    /// A number: right-aligned.
    Num,
    Good,
    Bad,
    Muted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// What a reader sees (rounded numbers).
    pub text: String,
    /// The stored value, exactly (Rust's shortest round-trip form of the stored REAL), kept in
    /// the HTML as `data-value` so nothing is lost to rounding.
    pub exact: Option<String>,
    pub tone: Tone,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell {
            text: s.into(),
            exact: None,
            tone: Tone::Plain,
        }
    }

    pub fn tone(mut self, tone: Tone) -> Cell {
        self.tone = tone;
        self
    }

    /// An integer count.
    pub fn int(v: i64) -> Cell {
        Cell {
            text: v.to_string(),
            exact: Some(v.to_string()),
            tone: Tone::Num,
        }
    }

    /// A stored REAL shown through `pretty` (empty when NULL).
    pub fn real(v: Option<f64>, pretty: fn(f64) -> String) -> Cell {
        Cell {
            text: v.map(pretty).unwrap_or_default(),
            exact: Some(v.map(|v| v.to_string()).unwrap_or_default()),
            tone: Tone::Num,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `data-*` attributes of the HTML row (name without the prefix), to find it by.
    pub data: Vec<(&'static str, String)>,
    pub cells: Vec<Cell>,
}

impl Row {
    pub fn new(cells: Vec<Cell>) -> Row {
        Row {
            data: Vec::new(),
            cells,
        }
    }

    pub fn data(mut self, name: &'static str, value: impl Into<String>) -> Row {
        self.data.push((name, value.into()));
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The HTML table's `class` (and a name for tests to find it by).
    pub kind: &'static str,
    pub headers: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn new(kind: &'static str, headers: &[&str]) -> Table {
        Table {
            kind,
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }
}

/// A prompt with an original answer and its correction, shown side by side as a word diff.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub title: String,
    /// Short labels: `harmful`, `kept`, `dropped: identical`, `refusal`...
    pub badges: Vec<(String, Tone)>,
    pub prompt: String,
    pub original_label: String,
    pub corrected_label: String,
    /// `None` when that side failed or is missing.
    pub original: Option<String>,
    pub corrected: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Heading {
        level: u8,
        text: String,
        id: String,
    },
    Text(String),
    /// A remark in a quieter voice (nothing to show, caps, caveats).
    Note(String),
    /// Something that failed.
    Error(String),
    Table(Table),
    Chart {
        /// File name stem of the Markdown twin's SVG.
        slug: String,
        title: String,
        svg: String,
    },
    Examples(Vec<Example>),
}
