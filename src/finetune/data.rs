//! Labelled text for sequence classification: `.tsv` / `.csv` files with a header naming a
//! `text` (or `sentence`) column and a `label` column, or `.jsonl` with one
//! `{"text": ..., "label": ...}` object per line. Labels are names or integers.
//!
//! Reading keeps each label as written ([`RawLabel`]); a [`LabelSet`] then turns them into
//! class ids, either taken from the training file (a new head) or from a model's `label2id`
//! (a head that is trained further). Every problem is an [`Error::Data`] naming the file and,
//! where there is one, the line.

use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A label as the file wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawLabel {
    Name(String),
    Id(u64),
}

impl std::fmt::Display for RawLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawLabel::Name(s) => write!(f, "`{s}`"),
            RawLabel::Id(i) => write!(f, "{i}"),
        }
    }
}

/// One row of a data file, before its label is mapped to a class id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawExample {
    pub text: String,
    pub label: RawLabel,
    /// Line of the file the row starts on, from 1 (the header is line 1 of a table).
    pub line: usize,
}

/// One example with its class id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

fn data_err(path: &Path, line: Option<usize>, reason: impl Into<String>) -> Error {
    Error::Data {
        file: path.display().to_string(),
        line,
        reason: reason.into(),
    }
}

/// Reads every row of `path`; the format comes from the extension (`.tsv`, `.csv`, `.jsonl`).
/// A file without rows is an error.
pub fn read_file(path: &Path) -> Result<Vec<RawExample>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|e| data_err(path, None, format!("not UTF-8 text: {e}")))?;
    // A byte-order mark would otherwise glue itself to the first column's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let rows = match ext.as_str() {
        "tsv" => read_table(path, text, b'\t')?,
        "csv" => read_table(path, text, b',')?,
        "jsonl" => read_jsonl(path, text)?,
        _ => {
            return Err(data_err(
                path,
                None,
                "unknown format: the file name must end in .tsv, .csv or .jsonl",
            ))
        }
    };
    if rows.is_empty() {
        return Err(data_err(path, None, "no examples (the file is empty)"));
    }
    Ok(rows)
}

/// Integers are ids, anything else a name (surrounding spaces dropped).
fn parse_label(s: &str) -> Option<RawLabel> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    Some(match s.parse::<u64>() {
        Ok(i) => RawLabel::Id(i),
        Err(_) => RawLabel::Name(s.to_string()),
    })
}

fn read_table(path: &Path, text: &str, delimiter: u8) -> Result<Vec<RawExample>> {
    // TSV files are read without quoting (a `"` is an ordinary character, as in most
    // tab-separated corpora); CSV follows RFC 4180 quoting.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(delimiter != b'\t')
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| data_err(path, Some(1), e.to_string()))?
        .clone();
    if headers.iter().all(|h| h.trim().is_empty()) {
        return Err(data_err(path, None, "no examples (the file is empty)"));
    }
    let column = |names: &[&str]| {
        headers
            .iter()
            .position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()))
    };
    let found: Vec<&str> = headers.iter().collect();
    let text_col = column(&["text", "sentence"]).ok_or_else(|| {
        data_err(
            path,
            Some(1),
            format!("the header has no `text` or `sentence` column (columns: {found:?})"),
        )
    })?;
    let label_col = column(&["label"]).ok_or_else(|| {
        data_err(
            path,
            Some(1),
            format!("the header has no `label` column (columns: {found:?})"),
        )
    })?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            let reason = match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => format!("{len} field(s) where the header has {expected_len}"),
                _ => e.to_string(),
            };
            data_err(path, line, format!("malformed row: {reason}"))
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let label = parse_label(&record[label_col])
            .ok_or_else(|| data_err(path, Some(line), "malformed row: empty label"))?;
        rows.push(RawExample {
            text: record[text_col].to_string(),
            label,
            line,
        });
    }
    Ok(rows)
}

fn read_jsonl(path: &Path, text: &str) -> Result<Vec<RawExample>> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |reason: String| data_err(path, Some(line), format!("malformed row: {reason}"));
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        let text = obj
            .get("text")
            .or_else(|| obj.get("sentence"))
            .ok_or_else(|| err("no `text` (or `sentence`) field".into()))?
            .as_str()
            .ok_or_else(|| err("`text` is not a string".into()))?;
        let label = match obj.get("label") {
            None => return Err(err("no `label` field".into())),
            Some(serde_json::Value::String(s)) => {
                parse_label(s).ok_or_else(|| err("empty label".into()))?
            }
            Some(serde_json::Value::Number(n)) => RawLabel::Id(
                n.as_u64()
                    .ok_or_else(|| err(format!("label {n} is not a non-negative integer")))?,
            ),
            Some(other) => return Err(err(format!("label {other} is not a string or integer"))),
        };
        rows.push(RawExample {
            text: text.to_string(),
            label,
            line,
        });
    }
    Ok(rows)
}

/// The classes of a classification head: `names[id]` is class `id`'s name (HF's `id2label`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSet {
    pub names: Vec<String>,
}

/// The most classes a new head may get from a file of integer labels (a typo such as a label
/// of 10⁹ would otherwise ask for a head of that size).
pub const MAX_CLASSES: usize = 4096;

impl LabelSet {
    /// The label set of a new head, from the training rows: sorted names, or, when every
    /// label is an integer, classes `0..=max` named `LABEL_i` as Hugging Face names them.
    pub fn from_training(path: &Path, rows: &[RawExample]) -> Result<LabelSet> {
        let ids: Option<Vec<u64>> = rows
            .iter()
            .map(|r| match r.label {
                RawLabel::Id(i) => Some(i),
                RawLabel::Name(_) => None,
            })
            .collect();
        let names: Vec<String> = match ids {
            Some(ids) => {
                let max = ids.iter().copied().max().unwrap_or(0);
                if max >= MAX_CLASSES as u64 {
                    let row = rows.iter().find(|r| r.label == RawLabel::Id(max));
                    return Err(data_err(
                        path,
                        row.map(|r| r.line),
                        format!("label {max}: integer labels must be below {MAX_CLASSES}"),
                    ));
                }
                (0..=max).map(|i| format!("LABEL_{i}")).collect()
            }
            None => rows
                .iter()
                .map(|r| match &r.label {
                    RawLabel::Name(s) => s.clone(),
                    RawLabel::Id(i) => i.to_string(),
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        if names.len() < 2 {
            return Err(data_err(
                path,
                None,
                format!(
                    "only one label ({}) in the training data; a classifier needs at least two",
                    names.first().map_or("", String::as_str)
                ),
            ));
        }
        Ok(LabelSet { names })
    }

    /// The label set of an existing head, from a config's `id2label` (`num_labels` classes).
    pub fn from_id2label(id2label: &BTreeMap<usize, String>, num_labels: usize) -> LabelSet {
        LabelSet {
            names: (0..num_labels)
                .map(|i| id2label.get(&i).cloned().unwrap_or(format!("LABEL_{i}")))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Class id of a label: a name is looked up among the names, an integer is an id when it
    /// is below the number of classes (or, written as text, matches a name).
    pub fn id_of(&self, label: &RawLabel) -> Option<usize> {
        match label {
            RawLabel::Name(s) => self.names.iter().position(|n| n == s),
            RawLabel::Id(i) => {
                let as_name = i.to_string();
                if let Some(p) = self.names.iter().position(|n| *n == as_name) {
                    return Some(p);
                }
                (*i < self.names.len() as u64).then_some(*i as usize)
            }
        }
    }

    /// Maps every row to its class id; an unknown label is an error naming file and line.
    pub fn assign(&self, path: &Path, rows: Vec<RawExample>) -> Result<Vec<Example>> {
        rows.into_iter()
            .map(|r| match self.id_of(&r.label) {
                Some(label) => Ok(Example {
                    text: r.text,
                    label,
                }),
                None => Err(data_err(
                    path,
                    Some(r.line),
                    format!(
                        "unknown label {} (the model's labels: {})",
                        r.label,
                        self.names.join(", ")
                    ),
                )),
            })
            .collect()
    }

    /// `id2label` as Hugging Face writes it (string keys).
    pub fn id2label_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), serde_json::Value::from(n.clone())))
                .collect(),
        )
    }

    /// `label2id` as Hugging Face writes it.
    pub fn label2id_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), serde_json::Value::from(i)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cuattn-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn err_text(r: Result<Vec<RawExample>>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn tsv_with_names_reads_rows_and_lines() {
        let p = write(
            "a.tsv",
            "text\tlabel\ngood \"film\"\tpositive\nbad one\tnegative\n",
        );
        let rows = read_file(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].text, "good \"film\"");
        assert_eq!(rows[0].label, RawLabel::Name("positive".into()));
        assert_eq!((rows[0].line, rows[1].line), (2, 3));
        let set = LabelSet::from_training(&p, &rows).unwrap();
        assert_eq!(set.names, ["negative", "positive"]);
        let ex = set.assign(&p, rows).unwrap();
        assert_eq!((ex[0].label, ex[1].label), (1, 0));
    }

    #[test]
    fn csv_quotes_sentence_column_and_column_order() {
        let p = write(
            "b.csv",
            "label,id,sentence\n1,a,\"Hello, world\"\n0,b,plain\n2,c,\"multi\nline\"\n",
        );
        let rows = read_file(&p).unwrap();
        assert_eq!(rows[0].text, "Hello, world");
        assert_eq!(rows[2].text, "multi\nline");
        let set = LabelSet::from_training(&p, &rows).unwrap();
        assert_eq!(set.names, ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(set.assign(&p, rows).unwrap()[0].label, 1);
    }

    #[test]
    fn jsonl_accepts_number_and_name_labels_and_skips_blank_lines() {
        let p = write(
            "c.jsonl",
            "{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": \"0\"}\n",
        );
        let rows = read_file(&p).unwrap();
        assert_eq!(rows[0].label, RawLabel::Id(1));
        assert_eq!(rows[1].label, RawLabel::Id(0));
        assert_eq!(rows[1].line, 3);
    }

    #[test]
    fn missing_columns_name_the_file_and_header_line() {
        let p = write("d.tsv", "sentence\ttarget\nx\t1\n");
        let e = err_text(read_file(&p));
        assert!(
            e.contains("d.tsv") && e.contains("line 1") && e.contains("`label`"),
            "{e}"
        );
        let p = write("e.tsv", "words\tlabel\nx\t1\n");
        let e = err_text(read_file(&p));
        assert!(e.contains("`text` or `sentence`"), "{e}");
    }

    #[test]
    fn malformed_rows_name_their_line() {
        let p = write("f.tsv", "text\tlabel\nok\tpos\nno label here\nfine\tneg\n");
        let e = err_text(read_file(&p));
        assert!(
            e.contains("f.tsv") && e.contains("line 3") && e.contains("malformed"),
            "{e}"
        );
        let p = write("g.tsv", "text\tlabel\nok\t \n");
        let e = err_text(read_file(&p));
        assert!(e.contains("line 2") && e.contains("empty label"), "{e}");
        let p = write(
            "h.jsonl",
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"\n",
        );
        let e = err_text(read_file(&p));
        assert!(e.contains("line 2") && e.contains("not valid JSON"), "{e}");
        let p = write("i.jsonl", "{\"text\": \"a\", \"label\": -1}\n");
        let e = err_text(read_file(&p));
        assert!(e.contains("line 1") && e.contains("non-negative"), "{e}");
        let p = write("j.jsonl", "{\"label\": 1}\n");
        let e = err_text(read_file(&p));
        assert!(e.contains("no `text`"), "{e}");
    }

    #[test]
    fn empty_files_and_unknown_formats_are_errors() {
        for (name, body) in [
            ("k.tsv", ""),
            ("l.tsv", "text\tlabel\n"),
            ("m.jsonl", "\n\n"),
        ] {
            let p = write(name, body);
            let e = err_text(read_file(&p));
            assert!(e.contains(name) && e.contains("empty"), "{name}: {e}");
        }
        let p = write("n.txt", "text\tlabel\na\tb\n");
        assert!(err_text(read_file(&p)).contains(".tsv, .csv or .jsonl"));
        let e = err_text(read_file(Path::new("/nonexistent/o.tsv")));
        assert!(e.contains("/nonexistent/o.tsv"), "{e}");
    }

    #[test]
    fn unknown_label_names_line_and_known_labels() {
        let p = write("p.tsv", "text\tlabel\na\tpositive\nb\tneutral\n");
        let rows = read_file(&p).unwrap();
        let set = LabelSet {
            names: vec!["negative".into(), "positive".into()],
        };
        let e = set.assign(&p, rows).unwrap_err().to_string();
        assert!(
            e.contains("p.tsv") && e.contains("line 3") && e.contains("`neutral`"),
            "{e}"
        );
        assert!(e.contains("negative, positive"), "{e}");
        // An integer maps to its id when the head has that many classes, not beyond.
        assert_eq!(set.id_of(&RawLabel::Id(1)), Some(1));
        assert_eq!(set.id_of(&RawLabel::Id(2)), None);
    }

    #[test]
    fn one_label_or_huge_integer_label_cannot_make_a_head() {
        let p = write("q.tsv", "text\tlabel\na\tpos\nb\tpos\n");
        let rows = read_file(&p).unwrap();
        let e = LabelSet::from_training(&p, &rows).unwrap_err().to_string();
        assert!(e.contains("only one label"), "{e}");
        let p = write("r.tsv", "text\tlabel\na\t0\nb\t1000000000\n");
        let rows = read_file(&p).unwrap();
        let e = LabelSet::from_training(&p, &rows).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("below"), "{e}");
    }
}
